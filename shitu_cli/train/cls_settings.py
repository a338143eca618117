"""train-cls settings: the defaults, recipe files (shipped names or paths) and flags merged into one
checked mapping; defaults < recipe < flags."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping, Sequence

from shitu_cli.errors import BadInput
from shitu_cli.train.rec_settings import parse_rgb

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes" / "cls"

# Every setting `train_cls` takes besides the dataset and run dir; recipes/cls/*.yml and flags override them.
DEFAULTS: dict[str, Any] = {
    "model": "PPLCNet_x1_0",
    "input_size": 224,
    "epochs": 20,
    "batch_size": 32,
    "lr": 0.05,
    "warmup_epochs": 1.0,
    "weight_decay": 4e-5,
    "lr_schedule": "cosine",
    "lr_decay_epochs": [],
    "label_smoothing": 0.1,
    "min_crop": 0.08,  # smallest area share the random resized crop keeps
    "flip": True,
    "mixup": 0.0,
    "cutmix": 0.0,
    "ema": True,
    "ema_decay": None,  # None: chosen from the run length (see auto_ema_decay)
    "pretrained": None,
    "teacher": None,
    "teacher_output": None,  # ONNX teacher only: the output holding the logits; default one named like class scores
    "teacher_size": None,  # ONNX teacher only: square input size when the file does not fix it
    "teacher_mean": None,  # ONNX teacher only: R,G,B normalisation when the file does not say (else ImageNet's)
    "teacher_std": None,
    "unlabeled": None,
    "distill_temperature": 4.0,
    "distill_weight": 0.5,
    "val": 0.2,
    "seed": 42,
    "num_workers": 2,
}


def recipe_path(recipe: str | Path) -> Path:
    """A shipped recipe name (recipes/cls/<name>.yml) or a path to a YAML file."""
    text = str(recipe)
    shipped = RECIPE_DIR / f"{text}.yml"
    if not text.endswith((".yml", ".yaml")) and "/" not in text and shipped.is_file():
        return shipped
    path = Path(text)
    if path.is_file():
        return path
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yml"))
    close = difflib.get_close_matches(text, names, n=1)
    hint = (f"did you mean {close[0]!r}? " if close else "") + f"shipped recipes: {', '.join(names)}, or a .yml path"
    raise BadInput("no such recipe (not a shipped name, not a file)", hint=hint, path=path)


def recipe_layer(recipe: str | Path | None) -> dict[str, Any]:
    """The settings a recipe sets: a recipes/cls/*.yml mapping, or the options of a run's recipe.yaml."""
    from shitu_cli.artifacts import read_yaml

    if recipe is None:
        return {}
    path = recipe_path(recipe)
    data = read_yaml(path)
    if isinstance(data, dict) and data.get("kind") == "shitu-recipe":
        data = {k: v for k, v in (data.get("options") or {}).items() if k not in ("dataset", "out", "resume")}
    if not isinstance(data, dict):
        raise BadInput("a recipe must be a YAML mapping of train-cls settings", path=path)
    unknown = [k for k in data if k not in DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(DEFAULTS), n=1)
        raise BadInput(f"unknown setting {unknown[0]!r}", hint=f"did you mean {close[0]!r}?" if close else None, path=path)
    return dict(data)


def resolve_settings(recipe: str | Path | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """defaults < recipe (a shipped name, a .yml, or a run's recipe.yaml) < flags."""
    from shitu_cli.recipes import merge_settings

    return merge_settings(DEFAULTS, recipe_layer(recipe), flags)


def requested_settings(recipe: str | Path | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """Only what the user asked for (recipe + flags, no defaults): what --resume checks against the run."""
    from shitu_cli.recipes import merge_settings

    merged = merge_settings({k: None for k in DEFAULTS}, recipe_layer(recipe), flags)
    return {k: v for k, v in merged.items() if v is not None}


def auto_ema_decay(total_steps: int) -> float:
    """An EMA horizon of about 2% of the run: 0.9995 for 100k steps, 0.9 for tiny runs.

    A longer horizon lags a short run's fast-moving early weights: with decay 0.989 over 890 steps
    the EMA model scored 18% val top-1 where the raw one scored 65% (digits, epoch 4 of 10).
    """
    return float(min(0.9999, max(0.9, 1.0 - 50.0 / max(total_steps, 1))))


def parse_decay_epochs(text: str | Sequence[int] | None) -> list[int]:
    if text is None or text == "":
        return []
    if isinstance(text, str):
        try:
            return [int(part) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            raise BadInput(f"--lr-decay-epochs must be comma-separated epochs, got {text!r}", hint="e.g. --lr-decay-epochs 4,6,8") from None
    return [int(v) for v in text]


def check_settings(settings: Mapping[str, Any]) -> None:
    from shitu_cli.models.cls_families import check_input_size, family_of

    family_of(settings["model"])  # an unknown name is refused with the families to choose from
    if settings["lr_schedule"] not in ("cosine", "piecewise"):
        close = difflib.get_close_matches(str(settings["lr_schedule"]), ["cosine", "piecewise"], n=1)
        raise BadInput(f"unknown --lr-schedule {settings['lr_schedule']!r}", hint=f"did you mean {close[0]}?" if close else "use cosine or piecewise")
    if settings["lr_schedule"] == "piecewise" and not settings["lr_decay_epochs"]:
        raise BadInput("--lr-schedule piecewise needs --lr-decay-epochs", hint="e.g. --lr-decay-epochs 4,6,8")
    checks = [
        ("input_size", settings["input_size"] >= 16, "at least 16"),
        ("epochs", settings["epochs"] >= 1, "at least 1"),
        ("batch_size", settings["batch_size"] >= 2, "at least 2 (batch norm needs two samples)"),
        ("lr", settings["lr"] > 0, "positive"),
        ("label_smoothing", 0 <= settings["label_smoothing"] < 1, "in [0, 1)"),
        ("min_crop", 0 < settings["min_crop"] <= 1, "in (0, 1]"),
        ("mixup", settings["mixup"] >= 0, "0 (off) or a positive alpha"),
        ("cutmix", settings["cutmix"] >= 0, "0 (off) or a positive alpha"),
        ("distill_temperature", settings["distill_temperature"] > 0, "positive"),
        ("distill_weight", 0 <= settings["distill_weight"] <= 1, "in [0, 1]"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise BadInput(f"--{name.replace('_', '-')} must be {what}, got {settings[name]!r}")
    check_input_size(settings["model"], settings["input_size"])
    if settings["unlabeled"] and not settings["teacher"]:
        raise BadInput("--unlabeled images need a --teacher: they only contribute the distillation term")
    onnx_only = [k for k in ("teacher_output", "teacher_size", "teacher_mean", "teacher_std") if settings[k] is not None]
    if onnx_only and not str(settings["teacher"] or "").lower().endswith(".onnx"):
        flag = f"--{onnx_only[0].replace('_', '-')}"
        if not settings["teacher"]:
            raise BadInput(f"{flag} describes an ONNX teacher, but no --teacher is given", hint="add --teacher model.onnx")
        raise BadInput(f"{flag} describes an ONNX teacher; --teacher is {settings['teacher']}",
                       hint="leave it out: an export or run dir records its own")
    if settings["teacher_size"] is not None and settings["teacher_size"] < 1:
        raise BadInput(f"--teacher-size must be a positive integer, got {settings['teacher_size']!r}")


def complete_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [k for k in settings if k not in DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(DEFAULTS), n=1)
        raise BadInput(f"unknown setting {unknown[0]!r}", hint=f"did you mean {close[0]!r}?" if close else None)
    merged = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    merged["lr_decay_epochs"] = parse_decay_epochs(merged["lr_decay_epochs"])
    for key in ("pretrained", "teacher", "unlabeled"):
        merged[key] = str(merged[key]) if merged[key] else None
    for key in ("teacher_mean", "teacher_std"):
        if isinstance(merged[key], str):
            merged[key] = parse_rgb(merged[key], f"--{key.replace('_', '-')}")
    return merged
