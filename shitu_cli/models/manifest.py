"""`shitu.yaml`: the manifest in every exported model dir saying task, files and preprocessing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shitu_cli.artifacts import read_manifest, sha256_file, write_manifest
from shitu_cli.errors import ManifestError

MODEL_MANIFEST = "shitu.yaml"
MODEL_KIND = "shitu-model"
TASKS = ("det", "rec", "cls")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How an RGB uint8 image becomes the net's input: resize, then (x/255 - mean) / std, CHW."""

    resize: str = "direct"  # "direct": straight to input_size; "short": short side then centre crop
    resize_short: int | None = None  # for "short": the short side before the crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    interpolation: str = "linear"


@dataclass
class ModelManifest:
    task: str  # det | rec | cls
    arch: str
    input_size: tuple[int, int]  # (height, width)
    model_file: str  # "inference.json" (paddle 3) or "inference.pdmodel" (legacy)
    params_file: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    labels: list[str] = field(default_factory=list)
    embedding_dim: int | None = None  # rec only
    input_names: list[str] = field(default_factory=lambda: ["x"])
    precision: str = "fp32"
    method: str | None = None  # compression method that produced it, if any
    parent_model_hash: str | None = None
    recipe_hash: str | None = None
    model_hash: str | None = None  # sha256 of the params file, filled by write_model_manifest
    extra: dict[str, Any] = field(default_factory=dict)


def write_model_manifest(model_dir: Path, manifest: ModelManifest) -> Path:
    model_dir = Path(model_dir)
    if manifest.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {manifest.task!r}")
    manifest.model_hash = sha256_file(model_dir / manifest.params_file)
    path = model_dir / MODEL_MANIFEST
    fields = asdict(manifest)
    fields["input_size"] = list(manifest.input_size)
    fields["preprocess"]["mean"] = list(manifest.preprocess.mean)
    fields["preprocess"]["std"] = list(manifest.preprocess.std)
    write_manifest(path, MODEL_KIND, fields)
    return path


def read_model_manifest(model_dir: Path, task: str | None = None) -> ModelManifest:
    """Load a model dir's manifest; with `task`, refuse a model of another task."""
    model_dir = Path(model_dir)
    hint = "pass an exported model dir (RUN_DIR/export) or a model name from `shitu models list`"
    data = read_manifest(model_dir / MODEL_MANIFEST, MODEL_KIND, hint=hint)
    data.pop("kind", None)
    data.pop("format_version", None)
    try:
        data["preprocess"] = Preprocess(**{**data.get("preprocess", {})})
        data["input_size"] = tuple(data["input_size"])
        manifest = ModelManifest(**data)
    except (TypeError, KeyError) as exc:
        raise ManifestError(f"model manifest is malformed ({exc})", path=model_dir / MODEL_MANIFEST) from None
    if task is not None and manifest.task != task:
        raise ManifestError(
            f"this is a {manifest.task} model, but a {task} model is needed", path=model_dir / MODEL_MANIFEST
        )
    for name in (manifest.model_file, manifest.params_file):
        if not (model_dir / name).is_file():
            raise ManifestError(f"model file {name} is missing", path=model_dir)
    return manifest
