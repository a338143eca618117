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
        run_dir = parent if (parent / RECIPE).is_file() and _has_weights(parent) else None
        return SourceModel(path, manifest, run_dir)
    if (path / EXPORT / MODEL_MANIFEST).is_file():
        if not _has_weights(path):
            raise BadInput(f"run dir has no trained weights ({CHECKPOINT.as_posix()}, or checkpoints/best_model.pdparams "
                           "for a detector)", hint="pass a finished train run", path=path)
        return SourceModel(path / EXPORT, read_model_manifest(path / EXPORT), path)
    raise BadInput(
        "neither a model dir (no shitu.yaml) nor a run dir (no export/shitu.yaml)",
        hint="pass RUN_DIR or RUN_DIR/export from `shitu train-cls`, `train-rec` or `train-det`",
        path=path,
    )


def _has_weights(run_dir: Path) -> bool:
    """cls/rec runs keep checkpoints/best.pdparams; det runs ppdet.yml plus ppdet's best (or last) checkpoint."""
    if (run_dir / CHECKPOINT).is_file():
        return True
    from shitu_cli.train.det import PPDET_CONFIG, best_weights

    try:
        return (run_dir / PPDET_CONFIG).is_file() and bool(best_weights(run_dir))
    except BadInput:
        return False


def need_run_dir(source: SourceModel, method: str) -> Path:
    if source.run_dir is None:
        raise BadInput(
            f"{method} needs the trainable model, and no run dir (recipe.yaml + {CHECKPOINT.as_posix()}) is beside this export",
            hint="pass the train run dir, or use --onnx-int8 which works from an export alone",
            path=source.model_dir,
        )
    return source.run_dir


# ----------------------------------------------------------------------------- rebuilding the dygraph model


@dataclass
class Trainable:
    """The run's network as trained (cls: logits; rec: RecModel's dict) and how its export wraps it."""

    model: Any
    task: str

    def export_form(self, model: Any | None = None) -> Any:
        """A layer returning exactly what the export returns (re-parameterised copy; cls: softmax, rec: features)."""
        import copy

        from shitu_cli.train.rec import re_parameterize

        net = copy.deepcopy(model if model is not None else self.model)
        net.eval()
        if self.task == "rec":
            from shitu_cli.train.rec import embedding_layer

            layer = embedding_layer(net)
        else:
            from shitu_cli.train.cls import WithSoftmax

            layer = WithSoftmax.wrap(net)
        re_parameterize(layer)
        layer.eval()
        return layer


def build_model_from_recipe(run_dir: Path, manifest: ModelManifest) -> Trainable:
    """The run's network with its best weights, rebuilt with the trainer's own builder, in eval mode.

    TODO(move): a public `build_model_from_recipe(run_dir)` belongs in shitu_cli/train; it lives
    here until the trainers export one.
    """
    from paddle.utils import unique_name

    from shitu_cli.models.legacy import load_weights
    from shitu_cli.recipes import read_recipe

    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    state = load_weights(run_dir / CHECKPOINT)  # arrays only: a swapped checkpoint never runs code
    builders = {"train-cls": _build_classifier, "train-rec": _build_recogniser}
    if recipe.command in builders:
        # Fresh unique names: weight names (and so the compressed files) must not depend on what this process built before.
        with unique_name.guard():
            model = builders[recipe.command](recipe.options, state, run_dir)
    else:
        raise WorkFailed(
            f"cannot rebuild a model from a {recipe.command!r} run",
            hint="compress runs of train-cls or train-rec, or use --onnx-int8 on an export",
            path=run_dir / RECIPE,
        )
    from shitu_cli.train.checkpoints import weights_that_fit

    # A missing or misshapen weight is refused by name (paddle would only warn and skip it).
    model.set_state_dict(weights_that_fit(model, state, run_dir / CHECKPOINT))
    model.eval()
    return Trainable(model, manifest.task)


def _class_count(state: dict[str, Any], key: str, run_dir: Path) -> int:
    if key not in state or len(state[key].shape) != 2:
        raise WorkFailed(f"checkpoint has no {key} to tell the class count", path=run_dir / CHECKPOINT)
    return int(state[key].shape[1])


def _build_classifier(options: dict[str, Any], state: dict[str, Any], run_dir: Path) -> Any:
    from shitu_cli.models.cls_families import head_key
    from shitu_cli.train.cls import build_classifier

    return build_classifier(options["model"], _class_count(state, head_key(options["model"]), run_dir))


def _build_recogniser(options: dict[str, Any], state: dict[str, Any], run_dir: Path) -> Any:
    import dataclasses

    from shitu_cli.train.rec import RecSettings, build_rec_model

    known = {f.name for f in dataclasses.fields(RecSettings)}
    settings = RecSettings(**{k: v for k, v in options.items() if k in known})
    return build_rec_model(settings, _class_count(state, "head.fc.weight", run_dir))


def check_reproduces_export(layer, source: SourceModel, probe: np.ndarray) -> float:
    """Refuse a rebuilt layer that does not reproduce the export on `probe`; return the largest difference.

    A rebuilt net that does not match (another arch, a checkpoint changed after export, a
    wrapper we do not know) would make every later measurement a comparison against the wrong model.
    """
    import paddle

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    expected = build_predictor(source.model_dir, PredictorOptions(mkldnn=False)).run(probe)[0]
    with paddle.no_grad():
        got = layer(paddle.to_tensor(probe)).numpy()
    if got.shape != expected.shape:
        raise WorkFailed(f"the model rebuilt from the run dir outputs shape {list(got.shape)}, its export {list(expected.shape)}",
                         path=source.run_dir)
    worst = float(np.abs(got - expected).max())
    if worst > REBUILD_TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise WorkFailed(
            f"the model rebuilt from the run dir does not reproduce its export (max difference {worst:.3g})",
            hint="was the run dir changed after export? re-export it, or use --onnx-int8 on the export",
            path=source.run_dir,
        )
    return worst
