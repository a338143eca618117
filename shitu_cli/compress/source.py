"""The model being compressed: its exported dir and manifest, and (from a run dir) the dygraph model behind it.

PTQ, pruning and QAT need the trainable model, rebuilt from RUN_DIR/recipe.yaml and
checkpoints/best.pdparams, and checked against the export before anything is compressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.models.manifest import MODEL_MANIFEST, ModelManifest, read_model_manifest

RECIPE = "recipe.yaml"
CHECKPOINT = Path("checkpoints") / "best.pdparams"
EXPORT = "export"
# The rebuilt model must reproduce the export this closely, or compressing it would be compressing another model.
REBUILD_TOLERANCE = 1e-3


@dataclass
class SourceModel:
    model_dir: Path  # exported fp32 model dir (shitu.yaml inside)
    manifest: ModelManifest
    run_dir: Path | None  # the training run behind it, when known

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def checkpoint(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir else None

    @property
    def is_legacy(self) -> bool:
        return self.manifest.model_file.endswith(".pdmodel")


def resolve_source(path: Path | str) -> SourceModel:
    """Accept RUN_DIR (recipe.yaml + checkpoints/ + export/) or an exported model dir (RUN_DIR/export or any)."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput("model not found", hint="pass a train run dir or an exported model dir", path=path)
    if (path / MODEL_MANIFEST).is_file():
        manifest = read_model_manifest(path)
        parent = path.parent
        run_dir = parent if (parent / RECIPE).is_file() and (parent / CHECKPOINT).is_file() else None
        return SourceModel(path, manifest, run_dir)
    if (path / EXPORT / MODEL_MANIFEST).is_file():
        if not (path / CHECKPOINT).is_file():
            raise BadInput(f"run dir has no {CHECKPOINT.as_posix()}", hint="pass a finished train run", path=path)
        return SourceModel(path / EXPORT, read_model_manifest(path / EXPORT), path)
    raise BadInput(
        "neither a model dir (no shitu.yaml) nor a run dir (no export/shitu.yaml)",
        hint="pass RUN_DIR or RUN_DIR/export from `shitu train-cls` / `shitu train-rec`",
        path=path,
    )


def need_run_dir(source: SourceModel, method: str) -> Path:
    if source.run_dir is None:
        raise BadInput(
            f"{method} needs the trainable model, and no run dir (recipe.yaml + {CHECKPOINT.as_posix()}) is beside this export",
            hint="pass the train run dir, or use --onnx-int8 which works from an export alone",
            path=source.model_dir,
        )
    return source.run_dir


# ----------------------------------------------------------------------------- rebuilding the dygraph model


def build_model_from_recipe(run_dir: Path, manifest: ModelManifest) -> Any:
    """The run's dygraph network with its best weights, in eval mode (the bare net, no export wrapper).

    TODO(move): belongs with the trainers (shitu_cli/train); kept here until they export one.
    """
    import paddle

    from shitu_cli.recipes import read_recipe

    run_dir = Path(run_dir)
    options = read_recipe(run_dir).options
    state = paddle.load(str(run_dir / CHECKPOINT))
    model = _build_network(options, manifest, state, run_dir)
    missing, unexpected = _set_state(model, state)
    if missing:
        raise WorkFailed(f"checkpoint lacks {len(missing)} weight(s) of the rebuilt model, e.g. {missing[0]}", path=run_dir / CHECKPOINT)
    model.eval()
    return model


def _build_network(options: dict[str, Any], manifest: ModelManifest, state: dict[str, Any], run_dir: Path) -> Any:
    from shitu_cli.models.ppcls import build_arch

    arch_config = options.get("arch_config") or manifest.extra.get("arch_config")
    if arch_config:
        return build_arch(dict(arch_config))
    if manifest.task == "cls":
        arch = options.get("model") or manifest.arch
        if "fc.weight" not in state:
            raise WorkFailed(f"not a {arch} classifier checkpoint (no fc.weight)", path=run_dir / CHECKPOINT)
        return build_arch({"name": arch, "class_num": int(state["fc.weight"].shape[1])})
    raise WorkFailed(
        f"cannot rebuild a {manifest.task} model from this run's recipe (no arch_config)",
        hint="compress its export with --onnx-int8 instead",
        path=run_dir / RECIPE,
    )


def _set_state(model, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    model.set_state_dict(state)
    return missing, unexpected


class ExportHead:
    """What sits between the bare net's output (rec: its "features") and the export's: nothing or a softmax."""

    NONE, SOFTMAX = "none", "softmax"


def wrap_like_export(model, head: str):
    """A layer whose forward returns exactly what the exported model returns."""
    import paddle

    class Exported(paddle.nn.Layer):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            if isinstance(out, dict):
                out = out["features"]
            if head == ExportHead.SOFTMAX:
                out = paddle.nn.functional.softmax(out, axis=-1)
            return out

    return Exported(model)


def matching_head(model, source: SourceModel, probe: np.ndarray) -> str:
    """Find which head makes the rebuilt net reproduce the export on `probe`; refuse if none does.

    A rebuilt net that does not match (another arch, stale checkpoint, a wrapper we do not
    know) would make every later measurement a comparison against the wrong model.
    """
    import paddle

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    expected = build_predictor(source.model_dir, PredictorOptions(mkldnn=False)).run(probe)[0]
    with paddle.no_grad():
        raw = model(paddle.to_tensor(probe))
        if isinstance(raw, dict):
            raw = raw["features"]
        candidates = {ExportHead.NONE: raw.numpy(), ExportHead.SOFTMAX: paddle.nn.functional.softmax(raw, axis=-1).numpy()}
    for head, value in candidates.items():
        if value.shape == expected.shape and np.allclose(value, expected, atol=REBUILD_TOLERANCE, rtol=REBUILD_TOLERANCE):
            return head
    worst = min(float(np.abs(v - expected).max()) if v.shape == expected.shape else float("inf") for v in candidates.values())
    raise WorkFailed(
        f"the model rebuilt from the run dir does not reproduce its export (max difference {worst:.3g})",
        hint="was the run dir changed after export? re-export it, or use --onnx-int8 on the export",
        path=source.run_dir,
    )
