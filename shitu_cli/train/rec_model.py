"""The train-rec network: ppcls's RecModel (backbone -> BNNeck -> FC), pretrained weights read as arrays
only, the embedding wrapper that is exported, and re-parameterisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shitu_cli.artifacts import sha256_file
from shitu_cli.errors import BadInput
from shitu_cli.train.rec_settings import RecSettings


def rec_arch(settings: RecSettings, class_num: int) -> dict[str, Any]:
    """ppcls's RecModel config: backbone (last conv = embedding size) -> flatten -> BNNeck -> FC."""
    size = settings.embedding_size
    return {
        "name": "RecModel",
        "Backbone": {"name": settings.backbone, "pretrained": False, "class_expand": size},
        "BackboneStopLayer": {"name": "flatten"},
        # PP-ShiTuV2 freezes the BNNeck bias at zero (a vanishing learning rate).
        "Neck": {"name": "BNNeck", "num_features": size,
                 "bias_attr": {"initializer": {"name": "Constant", "value": 0.0}, "learning_rate": 1e-20}},
        "Head": {"name": "FC", "embedding_size": size, "class_num": class_num,
                 "weight_attr": {"initializer": {"name": "Normal", "std": 0.001}}, "bias_attr": False},
    }


def build_rec_model(settings: RecSettings, class_num: int, pretrained: Path | str | None = None):
    """ppcls's RecModel, or with `pretrained` an .onnx file, its converted network as the backbone
    (the ONNX weights are loaded here; load_pretrained then only reports them)."""
    from shitu_cli.models.onnx_import import is_onnx_file
    from shitu_cli.models.ppcls import build_arch

    if is_onnx_file(pretrained):
        from shitu_cli.train.rec_onnx import build_onnx_rec_model

        model = build_onnx_rec_model(settings, class_num, pretrained)
    else:
        onnx_only = [f"--{n.replace('_', '-')}" for n in ("pretrained_output", "pretrained_mean", "pretrained_std")
                     if getattr(settings, n) is not None]
        if onnx_only:
            raise BadInput(f"{', '.join(onnx_only)} applies to an ONNX backbone only",
                           hint="pass --pretrained model.onnx, or leave these options out")
        model = build_arch(rec_arch(settings, class_num))
    scale_backbone_lr(model, settings.backbone_lr_scale)
    return model


def scale_backbone_lr(model, scale: float) -> None:
    """The backbone learns at `scale` x the schedule's lr (Paddle reads each parameter's own
    learning_rate); 0 freezes it. Pretrained features survive a fresh head's first steps that way."""
    if scale == 1.0:
        return
    for param in model.backbone.parameters():
        if scale == 0:
            param.stop_gradient = True
        else:
            param.optimize_attr["learning_rate"] = scale


def pretrained_reference(pretrained: Path | str | None) -> str | None:
    """How recipe.yaml records --pretrained: a file as its absolute path, a model name as the name,
    so that reproduce resolves it again from the model cache."""
    if not pretrained:
        return None
    from shitu_cli.models.registry import OFFICIAL_MODELS, read_registry

    text = str(pretrained)
    if not Path(text).expanduser().exists() and (text in OFFICIAL_MODELS or text in read_registry()):
        return text
    return Path(text).expanduser().resolve().as_posix()


def _size_dependent(key: str) -> bool:
    # Layers whose shapes follow the embedding size or class count: re-initialised, not errors.
    return key.startswith(("head.", "neck.", "backbone.last_conv.", "backbone.fc."))


def _shitu_only(key: str, backbone: str) -> bool:
    # PPLCNetV2_base_ShiTu's last stage runs at stride 1 and so has one more depthwise branch than
    # PPLCNetV2_base: ImageNet PP-LCNetV2 weights fit all but that branch, which starts fresh.
    return backbone == "PPLCNetV2_base_ShiTu" and key.startswith("backbone.stages.3.") and ".dw_conv_list." in key


def load_pretrained(model, path: Path | str, backbone: str) -> dict[str, Any]:
    """Load a local .pdparams: a whole RecModel checkpoint or backbone-only (ImageNet/SSLD) weights."""
    from shitu_cli.models.legacy import load_weights
    from shitu_cli.models.registry import resolve_training_weights

    if getattr(model, "pretrained_info", None) is not None:
        return model.pretrained_info  # an ONNX backbone: converted and loaded by build_rec_model
    # a .pdparams path, or a name: PPLCNet_x1_0-pretrained, or PP-ShiTuV2-rec for its training weights
    path = resolve_training_weights(path)
    state = load_weights(path)  # arrays only: a downloaded pickle never runs code
    if not isinstance(state, dict) or not state:
        raise BadInput("holds no named weights", hint="pass a .pdparams file saved from a state_dict", path=path)
    if not any(str(k).startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}  # backbone-only ImageNet weights
    target = model.state_dict()
    loaded, reinitialised, missing, mismatched = {}, [], [], []
    for key, param in target.items():
        if key not in state:
            (reinitialised if _size_dependent(key) or _shitu_only(key, backbone) else missing).append(key)
            continue
        have, want = list(state[key].shape), list(param.shape)
        if have == want:
            loaded[key] = state[key]
        elif _size_dependent(key):
            reinitialised.append(key)
        else:
            mismatched.append(f"{key} {have} != {want}")
    if missing or mismatched:
        problems = [f"shape {m}" for m in mismatched] + [f"missing {k}" for k in missing]
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise BadInput(f"weights do not fit backbone {backbone}: {shown}",
                       hint=f"pass weights of {backbone} (or choose the --backbone they were trained for)", path=path)
    model.set_state_dict({**target, **loaded})
    return {"path": path.resolve().as_posix(), "sha256": sha256_file(path), "loaded": len(loaded),
            "reinitialised": len(reinitialised)}


def embedding_layer(model):
    """The export wrapper: RecModel without its FC head, image -> BNNeck features, not L2-normalised
    (the index normalises). Shares the model's sublayers, so it sees its weights."""
    import paddle

    class RecEmbedding(paddle.nn.Layer):
        def __init__(self, rec_model):
            super().__init__()
            self.backbone = rec_model.backbone
            self.neck = rec_model.neck

        def forward(self, x):
            return self.neck(self.backbone(x))

    return RecEmbedding(model)


def re_parameterize(layer) -> int:
    """Fold PPLCNetV2's multi-branch depthwise convs into one conv (as before export). Returns how many."""
    import paddle

    count = 0
    with paddle.no_grad():
        for sub in layer.sublayers():
            if hasattr(sub, "re_parameterize") and getattr(sub, "use_rep", False):
                sub.re_parameterize()
                count += 1
    return count
