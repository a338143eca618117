"""train-rec settings: every knob of a run, shipped recipes (recipes/rec/*.yml) by name or path, and
their merge, defaults < recipe < flags."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shitu_cli.artifacts import read_yaml, sha256_bytes
from shitu_cli.errors import BadInput
from shitu_cli.models.ppcls import REC_BACKBONES, check_arch

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "rec"
DEFAULT_RECIPE = "pp-shituv2"
BEST_METRICS = ("mAP", "recall1", "recall5")


@dataclass
class RecSettings:
    """Every knob of a run; defaults < recipe file < flags. All land in recipe.yaml."""

    backbone: str = "PPLCNetV2_base_ShiTu"
    embedding_size: int = 512
    input_size: int = 224
    epochs: int = 20
    batch_size: int = 32  # P classes x K images
    images_per_class: int = 4  # K
    lr: float = 0.04
    warmup_epochs: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    ema_decay: float = 0.999
    label_smoothing: float = 0.1
    ce_weight: float = 1.0
    triplet_weight: float = 1.0
    margin: float = 0.5
    absolute_loss_weight: float = 0.1
    ap_value: float = 0.8
    an_value: float = 0.4
    rotate_degrees: float = 30.0
    crop_scale_min: float = 0.5
    flip: bool = True
    eval_every: int = 1
    best_metric: str = "mAP"  # picks the exported epoch; mAP ranks every relevant item, so it is less noisy than recall1
    eval_batch_size: int = 32
    seed: int = 42
    num_workers: int = 2
    # --pretrained model.onnx: which output to fine-tune from (None: the only feature output) and the
    # normalisation the ONNX model expects (None: ImageNet's); the rest of shitu keeps ImageNet's.
    pretrained_output: str | None = None
    pretrained_mean: list | None = None
    pretrained_std: list | None = None
    backbone_lr_scale: float = 1.0  # the backbone's lr relative to --lr (below 1: fine-tune it gently)
    holdout: float = 0.2  # self-split only: fraction of classes held out for gallery/query
    query_fraction: float = 0.3  # self-split only: share of each held-out class that queries


def recipe_path(recipe: str | Path | None) -> Path:
    """A shipped recipe name (recipes/rec/<name>.yml) or a path to a YAML file."""
    name = str(recipe or DEFAULT_RECIPE)
    shipped = RECIPE_DIR / f"{name}.yml"
    if shipped.is_file():
        return shipped
    path = Path(name)
    if path.is_file():
        return path
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yml"))
    raise BadInput(f"no recipe named {name!r}", hint=f"use one of: {', '.join(known)}, or a path to a .yml file")


def load_recipe(recipe: str | Path | None) -> dict[str, Any]:
    path = recipe_path(recipe)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise BadInput("a rec recipe must be a mapping of setting: value", path=path)
    data.pop("description", None)
    return data


def resolve_settings(recipe: str | Path | None, overrides: dict[str, Any], saved: dict[str, Any] | None = None) -> RecSettings:
    """defaults < recipe (or the saved settings of the run being resumed) < flags."""
    from shitu_cli.recipes import merge_settings

    defaults = asdict(RecSettings())
    if saved is not None and "best_metric" not in saved:
        saved = {**saved, "best_metric": "recall1"}  # what runs recorded before the field existed were picked by
    base = saved if saved is not None else load_recipe(recipe)
    merged = merge_settings(defaults, base, overrides)
    settings = RecSettings(**{f.name: _coerce(f.type, merged[f.name]) for f in fields(RecSettings)})
    check_settings(settings)
    return settings


def _coerce(kind: Any, value: Any) -> Any:
    kind = str(kind)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_settings(s: RecSettings) -> None:
    check_arch(s.backbone, REC_BACKBONES, "rec backbone")
    positive = {"epochs": s.epochs, "batch_size": s.batch_size, "images_per_class": s.images_per_class,
                "embedding_size": s.embedding_size, "input_size": s.input_size, "eval_every": s.eval_every,
                "eval_batch_size": s.eval_batch_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if s.input_size < 32:
        raise BadInput(f"--input-size {s.input_size} is too small", hint="use 32 or more (PP-ShiTuV2 uses 224)")
    if s.batch_size // s.images_per_class < 2:
        raise BadInput(
            f"--batch-size {s.batch_size} holds fewer than two classes of {s.images_per_class} images",
            hint=f"use a batch size of at least {2 * s.images_per_class} (P classes x K={s.images_per_class} images)",
        )
    if not s.lr > 0:
        raise BadInput(f"--lr must be positive, got {s.lr}")
    if s.num_workers < 0:
        raise BadInput(f"--num-workers must be 0 or more, got {s.num_workers}")
    if s.best_metric not in BEST_METRICS:
        raise BadInput(f"best_metric must be one of {', '.join(BEST_METRICS)}, got {s.best_metric!r}")
    if s.ce_weight < 0 or s.triplet_weight < 0:
        raise BadInput(f"ce_weight {s.ce_weight} and triplet_weight {s.triplet_weight} must be 0 or more")
    if not s.backbone_lr_scale >= 0:
        raise BadInput(f"--backbone-lr-scale must be 0 or more, got {s.backbone_lr_scale}")
    for name in ("pretrained_mean", "pretrained_std"):
        _check_rgb(name, getattr(s, name), positive=name.endswith("std"))
    if not 0 < s.crop_scale_min <= 1:
        raise BadInput(f"crop_scale_min must be in (0, 1], got {s.crop_scale_min}")


def _check_rgb(name: str, value: Any, positive: bool) -> None:
    flag = "--" + name.replace("_", "-")
    if value is None:
        return
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or not positive) for v in value)
    if not ok:
        raise BadInput(f"{flag} must be three {'positive ' if positive else ''}numbers R,G,B, got {value!r}",
                       hint=f"e.g. {flag} 0.5,0.5,0.5")


def parse_rgb(text: str | None, flag: str) -> list[float] | None:
    """'0.5,0.5,0.5' -> [0.5, 0.5, 0.5]; None stays None."""
    if text is None:
        return None
    try:
        values = [float(part) for part in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise BadInput(f"{flag} must be three numbers R,G,B, got {text!r}", hint=f"e.g. {flag} 0.5,0.5,0.5")
    return values


def settings_hash(settings: RecSettings) -> str:
    """The `recipe_hash` in shitu.yaml: sha256 of the resolved training settings."""
    return sha256_bytes(json.dumps(asdict(settings), sort_keys=True).encode("utf-8"))
