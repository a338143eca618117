"""Mainbody detector training: a recipe + a COCO/VOC dataset -> ppdet's Trainer -> best COCO mAP
checkpoint -> an exported PicoDet with NMS (model.json + model.pdiparams + infer_cfg.yml + shitu.yaml).
"""

from __future__ import annotations

import contextlib
import importlib
import difflib
import json
import logging
import random
import shutil
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from shitu_cli.artifacts import atomic_write_text, dump_yaml, read_yaml, sha256_file, write_yaml
from shitu_cli.data.images import ImageReadError, image_size
from shitu_cli.errors import BadInput, WorkFailed

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes" / "det"
DEFAULT_RECIPE = "pp-shituv2-mainbody"
CHECKPOINTS = "checkpoints"  # ppdet's save_dir/filename: RUN_DIR/checkpoints/{best_model,last}.*
EXPORT_DIR = "export"
PPDET_CONFIG = "ppdet.yml"
MODEL_SECTIONS = "ppdet_model.yml"  # beside an export: what rebuilds its network without the run dir
TRAIN_LOG = "train.log"
STATE_FILE = "train_state.yaml"
MERGED_CLASS = "foreground"
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
    eval_every: int = 1
    eval_batch_size: int = 4
    seed: int = 42
    pretrained: str | None = None
    ema: bool = True
    ema_decay: float = 0.9998
    keep_top_k: int = 100
    workers: int = 0  # data loader worker processes; 0 = in the training process


@dataclass
class DetDataset:
    """A dataset normalised for ppdet: COCO jsons with absolute file names and ids 1..K."""

    source: Path
    kind: str  # coco | voc
    train_json: Path
    val_json: Path
    labels: list[str]
    train_images: int
    val_images: int
    train_boxes: int
    val_boxes: int
    checksums: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainDetResult:
    run_dir: Path
    export_dir: Path
    recipe: str
    labels: list[str]
    best_map: float | None
    best_map50: float | None
    best_epoch: int | None
    epochs: int
    train_images: int
    val_images: int
    seconds: float
    history: list[dict[str, float]]


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
    if not isinstance(document, dict) or document.get("architecture") != "PicoDet":
        raise BadInput("not a detection recipe (needs `architecture: PicoDet`)", path=path)
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
    return settings


# ---------------------------------------------------------------- datasets


def prepare_dataset(root: Path, work_dir: Path, merge_classes: bool = False) -> DetDataset:
    """Validate a COCO (train.json/val.json) or VOC dataset dir and write normalised COCO jsons."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput("dataset folder not found", path=root, hint="pass a folder made by `shitu split-dataset`")
    if (root / "train.json").is_file():
        kind, train, val = "coco", read_coco(root / "train.json"), read_coco(_val_json(root))
        image_dir = coco_image_dir(root, train)
    elif (root / "Annotations").is_dir():
        kind, (train, val), image_dir = "voc", _voc_splits(root), root
    else:
        raise BadInput("no train.json (COCO) or Annotations/ (VOC) in the dataset folder", path=root,
                       hint="run `shitu split-dataset` to write train.json and val.json")
    labels = [MERGED_CLASS] if merge_classes else [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    work_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, document in (("train", train), ("val", val)):
        normal = _normalise(document, labels, image_dir, merge_classes, root / f"{split}.json")
        if not normal["annotations"]:
            raise BadInput(f"the {split} split has no box annotations", path=root / f"{split}.json",
                           hint="a detector needs boxes: check the annotations' image_id and bbox fields")
        atomic_write_text(work_dir / f"{split}.json", json.dumps(normal, ensure_ascii=False))
        counts[split] = (len(normal["images"]), len(normal["annotations"]))
    checksums = {p.name: sha256_file(p) for p in (root / "train.json", root / "val.json") if p.is_file()}
    return DetDataset(root, kind, work_dir / "train.json", work_dir / "val.json", labels,
                      counts["train"][0], counts["val"][0], counts["train"][1], counts["val"][1], checksums)


def _val_json(root: Path) -> Path:
    path = root / "val.json"
    if not path.is_file():
        raise BadInput("val.json is missing: evaluation needs a validation split", path=path,
                       hint="run `shitu split-dataset DIR --val 0.2`")
    return path


def read_coco(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"not a readable COCO json ({exc.__class__.__name__}: {exc})", path=path) from None
    if not isinstance(document, dict) or not all(isinstance(document.get(k), list) for k in ("images", "annotations", "categories")):
        raise BadInput("not a COCO detection json (needs images, annotations and categories lists)", path=path)
    if not document["categories"]:
        raise BadInput("COCO json has no categories", path=path)
    return document


def coco_image_dir(root: Path, document: dict[str, Any]) -> Path:
    """file_name is relative to the dataset dir, or to its images/ folder."""
    first = next(iter(document["images"]), None)
    if first is not None and not (root / first["file_name"]).is_file() and (root / "images" / first["file_name"]).is_file():
        return root / "images"
    return root


def _normalise(document: dict[str, Any], labels: list[str], image_dir: Path, merge: bool, source: Path) -> dict[str, Any]:
    """Absolute file names, category ids 1..K in label order, area/iscrowd/size filled in."""
    names = {c["id"]: c["name"] for c in document["categories"]}
    new_id = {name: i + 1 for i, name in enumerate(labels)}
    images, missing = [], []
    for image in document["images"]:
        path = (image_dir / image["file_name"]).resolve()
        if not path.is_file():
            missing.append(image["file_name"])
            continue
        entry = {"id": image["id"], "file_name": str(path)}
        try:
            entry["width"], entry["height"] = image.get("width") or 0, image.get("height") or 0
            if not (entry["width"] and entry["height"]):
                entry["width"], entry["height"] = image_size(path)
        except ImageReadError as exc:
            raise BadInput(f"image listed in {source.name} cannot be read ({exc.message})", path=path) from None
        images.append(entry)
    if missing:
        raise BadInput(f"{len(missing)} image file(s) listed in {source.name} are missing, e.g. {missing[0]!r}",
                       path=image_dir, hint="file_name must be relative to the dataset folder")
    known = {i["id"] for i in images}
    annotations = []
    for ann in document["annotations"]:
        name = names.get(ann.get("category_id"))
        if name is None or (not merge and name not in new_id):
            raise BadInput(f"annotation {ann.get('id')} has category {ann.get('category_id')!r}, unknown to train.json",
                           path=source, hint="train and val must share one category list")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if ann["image_id"] not in known or w <= 0 or h <= 0:
            continue
        annotations.append({"id": len(annotations) + 1, "image_id": ann["image_id"],
                            "category_id": 1 if merge else new_id[name], "bbox": [x, y, w, h],
                            "area": float(ann.get("area") or w * h), "iscrowd": int(ann.get("iscrowd", 0))})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(labels)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _voc_splits(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """VOC: JPEGImages/ + Annotations/*.xml + train/val list files, converted to COCO documents."""
    documents = []
    for split in ("train", "val"):
        list_file = next((p for p in (root / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt") if p.is_file()), None)
        if list_file is None:
            raise BadInput(f"VOC dataset has no {split}.txt list", path=root,
                           hint=f"write {split}.txt (one image id, or 'image.jpg annotation.xml', per line)")
        documents.append(_voc_to_coco(root, list_file))
    names = sorted({c["name"] for d in documents for c in d["categories"]})
    for document in documents:  # one category list for both splits
        old = {c["id"]: c["name"] for c in document["categories"]}
        for ann in document["annotations"]:
            ann["category_id"] = names.index(old[ann["category_id"]]) + 1
        document["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    return documents[0], documents[1]


def _voc_to_coco(root: Path, list_file: Path) -> dict[str, Any]:
    images, annotations, names = [], [], {}
    for line in list_file.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 2:
            image_rel, xml_path = parts[0], root / parts[1]
        else:
            xml_path = root / "Annotations" / f"{parts[0]}.xml"
            image_rel = None
        try:
            tree = ElementTree.parse(xml_path).getroot()
        except (OSError, ElementTree.ParseError) as exc:
            raise BadInput(f"cannot read VOC annotation ({exc.__class__.__name__})", path=xml_path) from None
        image_rel = image_rel or f"JPEGImages/{tree.findtext('filename') or parts[0] + '.jpg'}"
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": image_rel})
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            box = obj.find("bndbox")
            if not name or box is None:
                continue
            x1, y1, x2, y2 = (float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
            cat = names.setdefault(name, len(names) + 1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(obj.findtext("difficult") or 0)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in names.items()]}


# ---------------------------------------------------------------- ppdet config


def train_sizes(settings: DetSettings) -> list[int]:
    steps = range(-settings.multi_scale_steps, settings.multi_scale_steps + 1)
    return [s for s in (settings.input_size + SIZE_STEP * k for k in steps) if s >= SIZE_STEP * 2]


def build_ppdet_config(document: dict[str, Any], settings: DetSettings, data: DetDataset, run_dir: Path) -> dict[str, Any]:
    """The full ppdet config: the recipe's model sections plus runtime, data, readers and schedule."""
    size = [settings.input_size, settings.input_size]
    normalize = {"NormalizeImage": {"is_scale": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}}
    resize = {"Resize": {"interp": 2, "target_size": size, "keep_ratio": False}}
    config = {k: v for k, v in document.items() if k not in ("shitu", "name")}
    config.update({
        "use_gpu": False, "log_iter": 1, "save_dir": str(run_dir), "snapshot_epoch": settings.eval_every,
        "epoch": settings.epochs, "metric": "COCO", "num_classes": len(data.labels), "worker_num": settings.workers,
        "use_ema": settings.ema, "ema_decay": settings.ema_decay, "weights": "", "print_flops": False,
        "output_eval": str(run_dir / "eval"),  # else ppdet's COCOMetric writes bbox.json into the cwd
        "LearningRate": {"base_lr": settings.lr, "schedulers": [
            {"name": "CosineDecay", "max_epochs": settings.epochs},
            {"name": "LinearWarmup", "start_factor": 0.1, "steps": settings.warmup_steps},
        ]},
        "TrainDataset": {"name": "COCODataSet", "dataset_dir": str(data.train_json.parent), "image_dir": "",
                         "anno_path": data.train_json.name, "data_fields": ["image", "gt_bbox", "gt_class", "is_crowd"]},
        "EvalDataset": {"name": "COCODataSet", "dataset_dir": str(data.val_json.parent), "image_dir": "",
                        "anno_path": data.val_json.name, "allow_empty": True},
        "TestDataset": {"name": "ImageFolder", "dataset_dir": str(data.val_json.parent), "anno_path": data.val_json.name},
        "TrainReader": {
            "sample_transforms": [{"Decode": {}}, {"RandomCrop": {}}, {"RandomFlip": {"prob": 0.5}}, {"RandomDistort": {}}],
            "batch_transforms": [
                {"BatchRandomResize": {"target_size": train_sizes(settings), "random_size": True,
                                       "random_interp": True, "keep_ratio": False}},
                normalize, {"Permute": {}},
            ],
            "batch_size": settings.batch_size, "shuffle": True, "drop_last": True, "collate_batch": False,
        },
        "EvalReader": {"sample_transforms": [{"Decode": {}}, resize, normalize, {"Permute": {}}],
                       "batch_transforms": [{"PadBatch": {"pad_to_stride": 32}}],
                       "batch_size": settings.eval_batch_size, "shuffle": False},
        "TestReader": {"inputs_def": {"image_shape": [1, 3, *size]},
                       "sample_transforms": [{"Decode": {}}, resize, normalize, {"Permute": {}}], "batch_size": 1},
    })
    head = dict(config.get("PicoHead") or {})
    head["nms"] = {**dict(head.get("nms") or {"name": "MultiClassNMS"}), "keep_top_k": settings.keep_top_k}
    config["PicoHead"] = head
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


# ---------------------------------------------------------------- training


def _progress_callback(trainer, on_step, history: list[dict[str, float]], state: dict[str, Any], run_dir: Path):
    """A ppdet Callback that reports each step, records per-epoch loss and mAP, and keeps `last.*`."""
    from ppdet.engine.callbacks import Callback

    class Progress(Callback):
        def __init__(self):
            super().__init__(trainer)
            self.losses: list[float] = []

        def on_step_end(self, status):
            if status.get("mode") != "train":
                return
            stats = status["training_staus"].get()
            loss = float(stats.get("loss", 0.0))
            self.losses.append(loss)
            if on_step is not None:
                on_step(advance=1, epoch=status["epoch_id"] + 1, loss=round(loss, 4), lr=float(status["learning_rate"]))

        def on_epoch_end(self, status):
            epoch = status["epoch_id"] + 1
            if status.get("mode") == "train":
                history.append({"epoch": epoch, "lr": float(status["learning_rate"]),
                                "loss": float(np.mean(self.losses)) if self.losses else float("nan")})
                self.losses = []
                _keep_last(trainer, run_dir / CHECKPOINTS, epoch, trainer.cfg.epoch)
            elif status.get("mode") == "eval" and trainer._metrics:
                stats = trainer._metrics[0].get_results().get("bbox", [])
                row = history[-1]
                row["mAP"], row["mAP50"] = (float(stats[0]), float(stats[1])) if len(stats) > 1 else (0.0, 0.0)
                if state["best_map"] is None or row["mAP"] >= state["best_map"]:
                    state.update(best_map=row["mAP"], best_map50=row["mAP50"], best_epoch=epoch)
            if status.get("mode") == "eval" or epoch % trainer.cfg.snapshot_epoch:
                _save_progress(run_dir, history, state)

    return Progress()


def _keep_last(trainer, checkpoints: Path, epoch: int, epochs: int) -> None:
    """ppdet writes a checkpoint per snapshot epoch ({epoch-1}.* or model_final.*); keep only `last.*`."""
    name = "model_final" if epoch == epochs else str(epoch - 1)
    if not (checkpoints / f"{name}.pdopt").is_file():
        return
    for suffix in (".pdparams", ".pdema"):
        if (checkpoints / f"{name}{suffix}").is_file():
            (checkpoints / f"{name}{suffix}").replace(checkpoints / f"last{suffix}")
    _translate_optimizer_state(trainer.model, checkpoints / f"{name}.pdopt", checkpoints / "last.pdopt", to_structured=True)
    (checkpoints / f"{name}.pdopt").unlink()


def _translate_optimizer_state(model, source: Path, target: Path, to_structured: bool) -> None:
    """ppdet keys optimiser state by paddle's unique names (conv2d_80.w_0), which depend on how many
    layers the process built before; store structured names so a resume in any process finds them."""
    import paddle

    from shitu_cli.models.legacy import load_state
    from shitu_cli.train.checkpoints import param_names, rename_accumulators

    state = load_state(source)  # arrays only: a swapped last.pdopt never runs code
    if not isinstance(state, dict):
        raise BadInput("not an optimiser checkpoint", path=source, hint="restore the run's own checkpoints")
    extras = {k: state.pop(k) for k in ("last_epoch", "LR_Scheduler") if k in state}
    renamed = rename_accumulators(state, param_names(model), to_structured=to_structured)
    tmp = target.with_name(f".{target.name}.tmp")
    paddle.save({**renamed, **extras}, str(tmp))
    tmp.replace(target)


def _resume(trainer, checkpoints: Path) -> None:
    """Resume from last.*: translate the optimiser keys back to this process's names first."""
    from shitu_cli.train.checkpoints import fitting_weights

    for suffix in (".pdparams", ".pdema"):
        if (checkpoints / f"last{suffix}").is_file():
            fitting_weights(trainer.model, checkpoints / f"last{suffix}")  # refuse, not skip, what does not fit
    staging = checkpoints / ".resume"
    for suffix in (".pdparams", ".pdema"):
        if (checkpoints / f"last{suffix}").is_file():
            shutil.copyfile(checkpoints / f"last{suffix}", staging.with_suffix(suffix))
    _translate_optimizer_state(trainer.model, checkpoints / "last.pdopt", staging.with_suffix(".pdopt"), to_structured=False)
    try:
        trainer.resume_weights(str(staging))
    finally:
        for suffix in (".pdparams", ".pdema", ".pdopt"):
            staging.with_suffix(suffix).unlink(missing_ok=True)


def _save_progress(run_dir: Path, history: list[dict[str, float]], state: dict[str, Any]) -> None:
    from shitu_cli.train.loop import write_metrics

    write_metrics(run_dir, history)
    write_yaml(run_dir / CHECKPOINTS / STATE_FILE, {**state, "history": history})


def _seed(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed % (2**32))
    paddle.seed(seed)


def train_det(dataset: Path, out: Path, recipe: str | Path | dict[str, Any] = DEFAULT_RECIPE,
              settings: dict[str, Any] | None = None, merge_classes: bool = False, resume: bool = False,
              on_step: Callable[..., None] | None = None, on_total: Callable[[int], None] | None = None) -> TrainDetResult:
    """Train a PicoDet mainbody detector on `dataset` into `out` and export its best checkpoint."""
    from shitu_cli.recipes import Recipe, write_recipe

    started = time.perf_counter()
    run_dir = Path(out)
    name, document = load_recipe(recipe)
    resolved = resolve_settings(document, settings)
    if resolved.pretrained and not Path(resolved.pretrained).with_suffix(".pdparams").is_file():
        from shitu_cli.models.registry import resolve_weights

        resolved.pretrained = str(resolve_weights(resolved.pretrained))  # a weights name, or a clear error
    last = run_dir / CHECKPOINTS / "last.pdparams"
    if resume and not last.is_file():
        raise BadInput("nothing to resume: no checkpoint in this run dir", path=last.parent)
    data = prepare_dataset(Path(dataset), run_dir / "data", merge_classes)
    config = build_ppdet_config(document, resolved, data, run_dir)
    atomic_write_text(run_dir / PPDET_CONFIG, dump_yaml(config))

    history, state = [], {"best_map": None, "best_map50": None, "best_epoch": None}
    with ppdet_output_to(run_dir / TRAIN_LOG):
        _train(run_dir, resolved, resume, history, state, on_step, on_total)
        export_dir = export_detector(run_dir, name)
    _save_progress(run_dir, history, state)

    result = TrainDetResult(run_dir, export_dir, name, data.labels, state["best_map"], state["best_map50"],
                            state["best_epoch"], resolved.epochs, data.train_images, data.val_images,
                            round(time.perf_counter() - started, 2), history)
    document = {**document, "name": name, "shitu": asdict(resolved)}
    written = [run_dir / "metrics.csv", run_dir / PPDET_CONFIG] + sorted(p for p in export_dir.iterdir() if p.is_file())
    write_recipe(run_dir, Recipe(
        command="train-det", core="shitu_cli.train.det:train_det", seed=resolved.seed,
        options={"dataset": str(Path(dataset).resolve()), "out": str(run_dir), "recipe": document,
                 "merge_classes": merge_classes},
        inputs={"dataset": str(Path(dataset).resolve()), "format": data.kind, "recipe": name, "sha256": data.checksums,
                "train_images": data.train_images, "val_images": data.val_images},
        metrics={"best_map": state["best_map"], "best_map50": state["best_map50"], "best_epoch": state["best_epoch"]},
    ), [p for p in written if p.is_file()])
    return result


def _train(run_dir: Path, settings: DetSettings, resume: bool, history: list, state: dict, on_step, on_total) -> None:
    import paddle
    from ppdet.engine import Trainer

    from shitu_cli.models import ppdet_compat

    ppdet_compat.apply()
    paddle.set_device("cpu")
    _seed(settings.seed)
    cfg = load_ppdet_config(run_dir / PPDET_CONFIG)
    trainer = Trainer(cfg, mode="train")
    if len(trainer.loader) < 1:
        raise BadInput(f"batch size {settings.batch_size} is larger than the {len(trainer.dataset)} usable training images",
                       hint="lower --batch-size")
    checkpoints = run_dir / CHECKPOINTS
    if resume:
        _resume(trainer, checkpoints)
        saved = read_yaml(checkpoints / STATE_FILE) if (checkpoints / STATE_FILE).is_file() else {}
        history.extend(saved.get("history", [])[: trainer.start_epoch])
        state.update({k: saved.get(k) for k in state})
        _restore_best(trainer, state)
    elif settings.pretrained:
        _load_pretrained(trainer, Path(settings.pretrained).with_suffix(".pdparams"))
    trainer.register_callbacks([_progress_callback(trainer, on_step, history, state, run_dir)])
    if on_total is not None:
        on_total(len(trainer.loader) * (settings.epochs - trainer.start_epoch))
    try:
        trainer.train(validate=True)
    except (ValueError, RuntimeError, MemoryError) as exc:
        raise WorkFailed(f"training failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})",
                         path=run_dir / TRAIN_LOG) from exc


def _load_pretrained(trainer, path: Path) -> None:
    """ppdet's own name matching (backbone-only weights fit too; misshapen layers start fresh), over
    the array-only reader; a file of which nothing fits is refused rather than silently ignored."""
    from ppdet.utils.checkpoint import match_state_dict

    from shitu_cli.models.legacy import load_weights

    if not match_state_dict(trainer.model.state_dict(), load_weights(path)):
        raise BadInput("no weight in this file fits the detector", path=path,
                       hint="pass PicoDet / LCNet weights (.pdparams)")
    trainer.load_weights(str(path.with_suffix("")))


def _restore_best(trainer, state: dict[str, Any]) -> None:
    """ppdet's Checkpointer forgets the best mAP on resume; give it back so a worse epoch cannot replace it."""
    from ppdet.engine.callbacks import Checkpointer

    for callback in trainer._callbacks:
        if isinstance(callback, Checkpointer) and state.get("best_map") is not None:
            callback.best_ap = state["best_map"]


# ---------------------------------------------------------------- export


def best_weights(run_dir: Path) -> Path:
    checkpoints = Path(run_dir) / CHECKPOINTS
    for name in ("best_model", "last"):
        if (checkpoints / f"{name}.pdparams").is_file():
            return checkpoints / name
    raise BadInput("no trained weights in this run dir", path=checkpoints)


def load_trained_model(run_dir: Path):
    """The dygraph PicoDet of a run, in eval mode, with its best weights (what export traces)."""
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
    trainer = Trainer(cfg, mode="test")
    _check_fits(trainer.model, best_weights(run_dir))
    trainer.load_weights(str(best_weights(run_dir)))
    nms = trainer.model.head.nms
    final = Path(run_dir) / EXPORT_DIR
    with atomic_dir(final) as staging:
        with ppdet_compat.full_graph_export(), ppdet_compat.onnx_convertible_upsampling(trainer.model), fresh_name_scopes():
            trainer.export(str(staging))
        produced = staging / CHECKPOINTS
        for path in produced.iterdir():
            path.replace(staging / path.name)
        produced.rmdir()
        write_model_sections(read_yaml(Path(run_dir) / PPDET_CONFIG), staging / MODEL_SECTIONS)
        _write_manifest(staging, cfg, recipe_name, nms)
    return final


def write_model_sections(config: dict[str, Any], path: Path) -> None:
    """The network's part of a ppdet config (architecture, its components, num_classes): enough for
    `shitu compress` to rebuild an export's PicoDet and read its weights back, with no run dir."""
    architecture = config["architecture"]
    components = [name for name in (config.get(architecture) or {}).values() if isinstance(name, str) and name in config]
    sections = {key: config[key] for key in ("architecture", "num_classes", architecture, *components) if key in config}
    atomic_write_text(path, "# the network of this export, in ppdet's config format (written by shitu train-det)\n"
                      + dump_yaml(sections))


def _write_manifest(export_dir: Path, cfg, recipe_name: str, nms) -> None:
    from shitu_cli.models.manifest import ModelManifest, Preprocess, write_model_manifest
    infer_cfg = read_yaml(export_dir / "infer_cfg.yml")
    steps = {step["type"]: step for step in infer_cfg["Preprocess"]}
    height, width = steps["Resize"]["target_size"]
    norm = steps["NormalizeImage"]
    manifest = ModelManifest(
        task="det", arch=f"PicoDet-LCNet_x{cfg['LCNet']['scale']}", input_size=(int(height), int(width)),
        model_file="model.json", params_file="model.pdiparams",
        preprocess=Preprocess(resize="direct", mean=tuple(norm["mean"]), std=tuple(norm["std"]),
                              interpolation=_INTERP_NAMES.get(int(steps["Resize"].get("interp", 1)), "linear")),
        labels=[str(label) for label in infer_cfg["label_list"]],
        input_names=["image", "scale_factor"],
        recipe_hash=sha256_file(Path(cfg["save_dir"]) / PPDET_CONFIG),  # the resolved config it was trained from
        extra={"recipe": recipe_name, "infer_cfg": "infer_cfg.yml", "is_scale": bool(norm.get("is_scale", True)),
               "nms": {"score_threshold": float(nms.score_threshold), "nms_threshold": float(nms.nms_threshold),
                       "keep_top_k": int(nms.keep_top_k)},
               "outputs": "boxes [N,6] = class, score, x1, y1, x2, y2 in original pixels; count [batch]"},
    )
    write_model_manifest(export_dir, manifest)


_INTERP_NAMES = {0: "nearest", 1: "linear", 2: "cubic", 3: "area", 4: "lanczos"}
