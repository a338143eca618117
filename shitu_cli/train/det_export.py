"""train-det export: the best checkpoint (checked to fit, read as arrays only) through ppdet's exporter
with NMS, atomically, plus shitu.yaml and the network's own config sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shitu_cli.artifacts import atomic_write_text, dump_yaml, read_yaml, sha256_bytes
from shitu_cli.errors import BadInput
from shitu_cli.train.det_config import CHECKPOINTS, PPDET_CONFIG, load_ppdet_config
from shitu_cli.train.det_families import arch_name, family_of, nms_summary, post_processing_nms

EXPORT_DIR = "export"
MODEL_SECTIONS = "ppdet_model.yml"  # beside an export: what rebuilds its network without the run dir


# ---------------------------------------------------------------- export


def best_weights(run_dir: Path) -> Path:
    checkpoints = Path(run_dir) / CHECKPOINTS
    for name in ("best_model", "last"):
        if (checkpoints / f"{name}.pdparams").is_file():
            return checkpoints / name
    raise BadInput("no trained weights in this run dir", path=checkpoints)


def load_trained_model(run_dir: Path):
    """The dygraph detector of a run, in eval mode, with its best weights (what export traces)."""
    import paddle
    from ppdet.core.workspace import create
    from ppdet.utils.checkpoint import load_weight

    from shitu_cli.models import ppdet_compat

    ppdet_compat.apply()
    paddle.set_device("cpu")
    cfg = load_ppdet_config(Path(run_dir) / PPDET_CONFIG)
    model = create(cfg.architecture)
    model.load_meanstd(cfg["TestReader"]["sample_transforms"])
    _check_fits(model, best_weights(run_dir))
    load_weight(model, str(best_weights(run_dir)))
    model.eval()
    return model


def _check_fits(model, weights: Path) -> None:
    from shitu_cli.train.checkpoints import fitting_weights

    fitting_weights(model, weights.with_suffix(".pdparams"))


def export_detector(run_dir: Path, recipe_name: str) -> Path:
    """Export the best weights with NMS via ppdet's own exporter, atomically, plus shitu.yaml."""
    from ppdet.engine import Trainer

    from shitu_cli.models import ppdet_compat
    from shitu_cli.models.export import atomic_dir, fresh_name_scopes

    ppdet_compat.apply()
    cfg = load_ppdet_config(Path(run_dir) / PPDET_CONFIG)
    with fresh_name_scopes():  # weight names as in a fresh process, so the export's bytes do not depend on what ran before
        trainer = Trainer(cfg, mode="test")
    _name_buffers_by_path(trainer.model)
    _check_fits(trainer.model, best_weights(run_dir))
    trainer.load_weights(str(best_weights(run_dir)))
    _convert_to_deploy(trainer.model)  # from the loaded weights
    family = family_of(cfg)
    nms = post_processing_nms(trainer.model, family)
    final = Path(run_dir) / EXPORT_DIR
    with atomic_dir(final) as staging:
        with ppdet_compat.full_graph_export(), ppdet_compat.onnx_convertible_upsampling(trainer.model), \
                ppdet_compat.im_shape_from_image(trainer.model), fresh_name_scopes():
            trainer.export(str(staging))
        produced = staging / CHECKPOINTS
        for path in produced.iterdir():
            path.replace(staging / path.name)
        produced.rmdir()
        write_model_sections(read_yaml(Path(run_dir) / PPDET_CONFIG), staging / MODEL_SECTIONS)
        _write_manifest(staging, cfg, recipe_name, nms, family)
    return final


def _name_buffers_by_path(model) -> None:
    """Buffers such as the DFL head's `project` are named from a process-wide eager-tensor counter
    ("eager_tmp_1116") that no name guard resets; the export stores that name, so give each its path."""
    for path, buffer in model.named_buffers():
        buffer.name = f"buffer.{path}"


def _convert_to_deploy(model) -> None:
    """Fold PP-YOLOE's RepVGG blocks into single convs before the export, under a name scope of their own.
    ppdet's exporter folds them itself, inside our fresh name scopes, where the new convs' names
    ("conv2d_0.w_0") collide with the model's own and tracing fails; folded here, its second pass
    must not run (it would fold again from branches already gone), so each block's method becomes a no-op."""
    from paddle.utils import unique_name

    blocks = [layer for layer in model.sublayers() if hasattr(layer, "convert_to_deploy")]
    with unique_name.guard("deploy_"):
        for block in blocks:
            block.convert_to_deploy()
            block.convert_to_deploy = _already_folded


def _already_folded() -> None:
    return None


def write_model_sections(config: dict[str, Any], path: Path) -> None:
    """The network's part of a ppdet config (architecture, its components, num_classes): enough for
    `shitu compress` to rebuild an export's PicoDet and read its weights back, with no run dir."""
    architecture = config["architecture"]
    components = [name for name in (config.get(architecture) or {}).values() if isinstance(name, str) and name in config]
    sections = {key: config[key] for key in ("architecture", "num_classes", architecture, *components) if key in config}
    atomic_write_text(path, "# the network of this export, in ppdet's config format (written by shitu train-det)\n"
                      + dump_yaml(sections))


def _write_manifest(export_dir: Path, cfg, recipe_name: str, nms, family: str) -> None:
    from shitu_cli.models.manifest import ModelManifest, Preprocess, write_model_manifest
    infer_cfg = read_yaml(export_dir / "infer_cfg.yml")
    steps = {step["type"]: step for step in infer_cfg["Preprocess"]}
    height, width = steps["Resize"]["target_size"]
    norm = steps["NormalizeImage"]
    manifest = ModelManifest(
        task="det", arch=arch_name(cfg, family), input_size=(int(height), int(width)),
        model_file="model.json", params_file="model.pdiparams",
        preprocess=Preprocess(resize="direct", mean=tuple(norm["mean"]), std=tuple(norm["std"]),
                              interpolation=_INTERP_NAMES.get(int(steps["Resize"].get("interp", 1)), "linear")),
        labels=[str(label) for label in infer_cfg["label_list"]],
        input_names=["image", "scale_factor"],
        recipe_hash=run_config_hash(Path(cfg["save_dir"])),  # the resolved config it was trained from
        extra={"recipe": recipe_name, "family": family, "infer_cfg": "infer_cfg.yml",
               "is_scale": bool(norm.get("is_scale", True)), "nms": nms_summary(nms),
               "outputs": "boxes [N,6] = class, score, x1, y1, x2, y2 in original pixels; count [batch]"},
    )
    write_model_manifest(export_dir, manifest)


def run_config_hash(run_dir: Path) -> str:
    """sha256 of the run's ppdet.yml with the run dir's own path taken out: the same training config
    hashes the same wherever the run (or its `shitu reproduce`) lives."""
    text = (Path(run_dir) / PPDET_CONFIG).read_text(encoding="utf-8")
    return sha256_bytes(text.replace(str(Path(run_dir).resolve()), "<RUN_DIR>").encode("utf-8"))


_INTERP_NAMES = {0: "nearest", 1: "linear", 2: "cubic", 3: "area", 4: "lanczos"}
