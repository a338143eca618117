"""train-rec from an ONNX backbone: the converted network (shitu_cli.models.onnx_import) in place of
ppcls's backbone, then (optional linear projection) -> BNNeck -> FC, trained with CE + triplet.

The shitu pipeline feeds every rec model ImageNet-normalised pixels (train, eval, export manifest,
build-index, predict). The ONNX model may want another normalisation (e.g. mean = std = 0.5), so a
per-channel affine inside the backbone turns one into the other: the export stays a normal rec model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from shitu_cli.errors import BadInput
from shitu_cli.models.manifest import IMAGENET_MEAN, IMAGENET_STD
from shitu_cli.train.rec_settings import RecSettings

ONNX_ARCH = "RecModel/onnx"


def build_onnx_rec_model(settings: RecSettings, class_num: int, onnx_path: Path | str):
    """The ONNX network (converted, checked against onnxruntime) -> BNNeck -> FC, as a RecModel-shaped
    layer: forward returns {"backbone", "neck", "features", "logits"} like ppcls's RecModel."""
    from shitu_cli.models.onnx_import import choose_output, import_onnx

    imported = import_onnx(onnx_path, run_size=settings.input_size)
    image = imported.image
    output = choose_output(image, settings.pretrained_output)
    index = image.output_names.index(output)
    dim = _feature_dim(imported, index, output, settings.input_size)
    mean, std = settings.pretrained_mean or IMAGENET_MEAN, settings.pretrained_std or IMAGENET_STD
    backbone = OnnxBackbone(imported.net, index, len(image.outputs), mean, std, dim, settings.embedding_size)
    model = OnnxRecModel(backbone, settings, class_num)
    model.backbone_name = f"onnx:{image.path.name}"  # what train-rec reports as the backbone
    model.pretrained_info = {
        "path": image.path.resolve().as_posix(), "sha256": image.sha256, "format": "onnx", "output": output,
        "output_dim": dim, "projection": dim != settings.embedding_size, "converter_cache": imported.cache_dir.as_posix(),
        "onnxruntime_max_abs_diff": imported.max_abs_diff, "checked_at": list(imported.check_size),
        "loaded": len(imported.net.state_dict()), "reinitialised": 0,
    }
    model.manifest_extra = {
        "backbone": f"onnx:{image.path.name}",
        "pretrained_onnx": {"file": image.path.name, "sha256": image.sha256, "output": output,
                            "onnx_input_mean": list(mean), "onnx_input_std": list(std)},
        "input_adapter": "ImageNet-normalised input re-normalised inside the model to the ONNX model's own",
    }
    return model


def _feature_dim(imported, index: int, output: str, size: int) -> int:
    """The chosen output's length per image at the training size; it must be a feature vector."""
    import numpy as np

    from shitu_cli.models.onnx_import import net_outputs

    shape = list(net_outputs(imported.net, np.zeros((1, 3, size, size), "float32"))[index].shape)
    if len(shape) == 2 or (len(shape) == 4 and shape[2:] == [1, 1]):
        return int(shape[1])
    raise BadInput(f"output {output!r} is {shape} per batch, not one feature vector per image", path=imported.image.path,
                   hint="choose a pooled output with --pretrained-output NAME")


@functools.lru_cache(maxsize=1)
def _new_layers():
    import paddle

    class OnnxBackbone(paddle.nn.Layer):
        """pixels (ImageNet-normalised) -> the ONNX model's normalisation -> its chosen output, flattened
        (-> a linear projection to the embedding size, when that differs)."""

        def __init__(self, net, index: int, outputs: int, mean, std, dim: int, embedding_size: int):
            super().__init__()
            self.net, self.index, self.outputs = net, index, outputs
            # x_onnx = (p - m) / s = x_in * s_in / s + (m_in - m) / s, with x_in = (p - m_in) / s_in
            scale = [si / s for si, s in zip(IMAGENET_STD, std)]
            shift = [(mi - m) / s for mi, m, s in zip(IMAGENET_MEAN, mean, std)]
            self.register_buffer("input_scale", paddle.to_tensor(scale, "float32").reshape([1, 3, 1, 1]))
            self.register_buffer("input_shift", paddle.to_tensor(shift, "float32").reshape([1, 3, 1, 1]))
            self.projection = None
            if dim != embedding_size:
                init = paddle.ParamAttr(initializer=paddle.nn.initializer.Orthogonal())  # keeps distances at start
                self.projection = paddle.nn.Linear(dim, embedding_size, weight_attr=init, bias_attr=False)

        def forward(self, x):
            out = self.net(x * self.input_scale + self.input_shift)
            if self.outputs > 1:
                out = out[self.index]
            out = paddle.flatten(out, start_axis=1)
            return self.projection(out) if self.projection is not None else out

    class OnnxRecModel(paddle.nn.Layer):
        """backbone -> BNNeck -> FC, the same gears and outputs as ppcls's RecModel."""

        arch_name = ONNX_ARCH

        def __init__(self, backbone, settings: RecSettings, class_num: int):
            import copy

            from shitu_cli.models.ppcls import import_ppcls
            from shitu_cli.train.rec_model import rec_arch

            import_ppcls()
            from ppcls.arch.gears import build_gear

            super().__init__()
            arch = rec_arch(settings, class_num)
            self.backbone = backbone
            self.neck = build_gear(copy.deepcopy(arch["Neck"]))
            self.head = build_gear(copy.deepcopy(arch["Head"]))

        def forward(self, x, label=None):
            features = self.backbone(x)
            neck = self.neck(features)
            return {"backbone": features, "neck": neck, "features": neck, "logits": self.head(neck)}

    return OnnxBackbone, OnnxRecModel


def OnnxBackbone(*args: Any, **kwargs: Any):  # noqa: N802 - a class made on first use (paddle imports late)
    return _new_layers()[0](*args, **kwargs)


def OnnxRecModel(*args: Any, **kwargs: Any):  # noqa: N802
    return _new_layers()[1](*args, **kwargs)
