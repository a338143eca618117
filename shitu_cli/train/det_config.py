"""train-det settings and ppdet configuration: shipped recipes (recipes/det/*.yml), the settings merge
(defaults < recipe `shitu:` block < flags), the full ppdet config of a run, and ppdet's output routing."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from shitu_cli.artifacts import read_yaml
from shitu_cli.errors import BadInput
from shitu_cli.train.det_families import apply_tricks, check_tricks, family_of, train_reader, trained_epochs
from shitu_cli.train.det_schedule import WARMUP_SHARE, check_warmup, learning_rate

if TYPE_CHECKING:
    from shitu_cli.train.det_data import DetDataset

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes" / "det"
DEFAULT_RECIPE = "pp-shituv2-mainbody"
CHECKPOINTS = "checkpoints"  # ppdet's save_dir/filename: RUN_DIR/checkpoints/{best_model,last}.*
PPDET_CONFIG = "ppdet.yml"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SIZE_STEP = 32  # multi-scale training sizes step around input_size


@dataclass
class DetSettings:
    """The knobs of a detector run: defaults < recipe `shitu:` block < command-line flags."""

    epochs: int = 100
    batch_size: int = 8
    lr: float = 0.05
    input_size: int = 320
    multi_scale_steps: int = 2  # train at input_size +- SIZE_STEP * 1..n
    warmup_steps: int = 100
    warmup_max_share: float = WARMUP_SHARE  # a longer warm-up is cut to this share of the run's steps; 0: never
    eval_every: int = 1
    eval_batch_size: int = 4
    seed: int = 42
    pretrained: str | None = None
    ema: bool = True
    ema_decay: float = 0.9998
    keep_top_k: int = 100
    workers: int = 0  # data loader worker processes; 0 = in the training process
    # PP-YOLO's tricks, each ppdet's own implementation (see det_families)
    schedule: str = "cosine"  # cosine, or ppdet's step schedules 1x / 2x (2x trains 2 * epochs)
    mixup_epochs: int = 0  # ppdet's Mixup for the first N epochs; the last ones without it
    static_assigner_epochs: int | None = None  # PP-YOLOE: ATSS for the first N epochs; None: the recipe head's
    label_smooth: bool = False  # YOLOv3Loss label smoothing (yolov3 family)
    iou_aware: bool = False  # YOLOv3Head IoU-aware branch + IouAwareLoss (yolov3 family)
    nms: str = "multiclass"  # multiclass or matrix (ppdet's MatrixNMS)


# ---------------------------------------------------------------- recipes


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yml"))


def load_recipe(recipe: str | Path | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, document) for a shipped recipe name, a .yml path, or an already loaded document."""
    if isinstance(recipe, dict):
        return str(recipe.get("name", "custom")), dict(recipe)
    text = str(recipe)
    path = Path(text)
    if not (text.endswith((".yml", ".yaml")) or path.is_file()):
        if text not in recipe_names():
            close = difflib.get_close_matches(text, recipe_names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise BadInput(f"unknown detection recipe {text!r}",
                           hint=f"{hint}choose one of: {', '.join(recipe_names())}, or pass a .yml path")
        path = RECIPES_DIR / f"{text}.yml"
    if not path.is_file():
        raise BadInput("recipe file not found", path=path, hint=f"shipped recipes: {', '.join(recipe_names())}")
    document = read_yaml(path)
    if not isinstance(document, dict) or document.get("architecture") not in ("PicoDet", "YOLOv3"):
        raise BadInput("not a detection recipe (needs `architecture: PicoDet` or `architecture: YOLOv3`)", path=path)
    return path.stem, document


def resolve_settings(document: dict[str, Any], flags: dict[str, Any] | None) -> DetSettings:
    from shitu_cli.recipes import merge_settings

    merged = merge_settings(asdict(DetSettings()), document.get("shitu"), flags)
    settings = DetSettings(**merged)
    for name in ("epochs", "batch_size", "input_size", "eval_every"):
        if int(getattr(settings, name)) < 1:
            raise BadInput(f"{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.input_size < 64 or settings.input_size % SIZE_STEP:
        raise BadInput(f"input size must be a multiple of {SIZE_STEP} and at least 64, got {settings.input_size}")
    if settings.lr <= 0:
        raise BadInput(f"lr must be positive, got {settings.lr}")
    check_tricks(family_of(document), settings)
    check_warmup(settings)
    return settings


def recipe_epochs(document: dict[str, Any]) -> int:
    """The epochs the recipe's own schedule trains (its `shitu:` block, no flags): what its epoch-based
    switches (mixup, PP-YOLOE's static assigner) were written for."""
    from shitu_cli.recipes import merge_settings

    return trained_epochs(DetSettings(**merge_settings(asdict(DetSettings()), document.get("shitu"))))


# ---------------------------------------------------------------- ppdet config


def train_sizes(settings: DetSettings) -> list[int]:
    steps = range(-settings.multi_scale_steps, settings.multi_scale_steps + 1)
    return [s for s in (settings.input_size + SIZE_STEP * k for k in steps) if s >= SIZE_STEP * 2]


def build_ppdet_config(document: dict[str, Any], settings: DetSettings, data: DetDataset, run_dir: Path) -> dict[str, Any]:
    """The full ppdet config: the recipe's model sections plus runtime, data, readers and schedule."""
    family = family_of(document)
    size = [settings.input_size, settings.input_size]
    normalize = {"NormalizeImage": {"is_scale": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
    resize = {"Resize": {"interp": 2, "target_size": size, "keep_ratio": False}}
    config = {k: v for k, v in document.items() if k not in ("shitu", "name")}
    config.update({
        "use_gpu": False, "log_iter": 1, "save_dir": str(run_dir), "snapshot_epoch": settings.eval_every,
        "epoch": trained_epochs(settings), "metric": "COCO", "num_classes": len(data.labels), "worker_num": settings.workers,
        "use_ema": settings.ema, "ema_decay": settings.ema_decay, "weights": "", "print_flops": False,
        "output_eval": str(run_dir / "eval"),  # else ppdet's COCOMetric writes bbox.json into the cwd
        "LearningRate": learning_rate(settings, trained_epochs(settings)),
        "TrainDataset": {"name": "COCODataSet", "dataset_dir": str(data.train_json.parent), "image_dir": "",
                         "anno_path": data.train_json.name, "data_fields": ["image", "gt_bbox", "gt_class", "is_crowd"]},
        "EvalDataset": {"name": "COCODataSet", "dataset_dir": str(data.val_json.parent), "image_dir": "",
                        "anno_path": data.val_json.name, "allow_empty": True},
        "TestDataset": {"name": "ImageFolder", "dataset_dir": str(data.val_json.parent), "anno_path": data.val_json.name},
        "TrainReader": train_reader(family, settings, train_sizes(settings), normalize, document),
        "EvalReader": {"sample_transforms": [{"Decode": {}}, resize, normalize, {"Permute": {}}],
                       "batch_transforms": [{"PadBatch": {"pad_to_stride": 32}}],
                       "batch_size": settings.eval_batch_size, "shuffle": False},
        "TestReader": {"inputs_def": {"image_shape": [1, 3, *size]},
                       "sample_transforms": [{"Decode": {}}, resize, normalize, {"Permute": {}}], "batch_size": 1},
    })
    apply_tricks(config, family, settings)
    return config


_PRISTINE: dict[str, dict[str, Any]] | None = None


def load_ppdet_config(path: Path):
    """ppdet keeps its config in a module-global dict that load_config merges into; reset it
    first so a second run in the same process does not inherit the first run's settings."""
    global _PRISTINE
    from ppdet.core.config.schema import SchemaDict
    from ppdet.core.workspace import global_config, load_config

    if _PRISTINE is None:
        _PRISTINE = {k: dict(v) for k, v in global_config.items() if isinstance(v, SchemaDict)}
    for key in [k for k in global_config if k not in _PRISTINE]:
        del global_config[key]
    for key, items in _PRISTINE.items():
        dict.clear(global_config[key])
        dict.update(global_config[key], items)
    cfg = load_config(str(path))
    cfg["filename"] = CHECKPOINTS
    return cfg


@contextlib.contextmanager
def ppdet_output_to(log_path: Path) -> Iterator[None]:
    """ppdet logs and pycocotools prints go to stdout; send both to RUN_DIR/train.log instead,
    so stdout stays free for results (`--json` must be the only thing there)."""
    with open(log_path, "a", encoding="utf-8") as log, ppdet_chatter_to(log):
        yield


@contextlib.contextmanager
def ppdet_chatter_to(stream) -> Iterator[None]:
    """ppdet's import-time prints, its loggers and stdout prints go to `stream` while inside."""
    try:
        with contextlib.redirect_stdout(stream):
            importlib.import_module("ppdet")  # imported here because it prints a numba warning

            _point_ppdet_logs_at(stream)
            yield
    finally:
        # Outside ppdet's chatter goes to the process's stderr. Not sys.stdout: a caller (a
        # test runner, a notebook) may have swapped it for a stream it later closes.
        _point_ppdet_logs_at(sys.__stderr__)


def _point_ppdet_logs_at(stream) -> None:
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name.startswith("ppdet") or name in ("reader", "sniper_coco_dataset")):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler:
                    handler.stream = stream  # not setStream(): it flushes the old stream, maybe closed
