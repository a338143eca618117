"""Training a PP-LCNet image classifier: lists or class folders in, a run dir with checkpoints, metrics,
confusion matrix, recipe and an exported softmax model out. `train_cls` is the core of `shitu train-cls`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from shitu_cli.data.loader import LabeledImage
from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.models.manifest import Preprocess

CORE = "shitu_cli.train.cls:train_cls"
CONFUSION_PNG = "confusion.png"
EXPORT_DIR = "export"
SPLIT_DIR = "split"
# Eval resizes the short side to input_size / EVAL_CROP, then centre-crops: 224 -> 256 -> 224, as ppcls does.
EVAL_CROP = 224 / 256
# The exported graph must reproduce the trained model; beyond this the export is broken, not noisy.
EXPORT_TOLERANCE = 1e-4
# Val batches are decoded once and kept in memory when they fit in this budget.
VAL_CACHE_BYTES = 512 * 1024 * 1024

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
    "unlabeled": None,
    "distill_temperature": 4.0,
    "distill_weight": 0.5,
    "val": 0.2,
    "seed": 42,
    "num_workers": 2,
}

Progress = Callable[..., None]  # progress(advance=1, **live_fields); may also have .set_total(n)


@dataclass
class ClsData:
    """A classification dataset resolved to absolute image paths and class names."""

    root: Path  # list paths are relative to this
    labels: list[str]
    train: list[LabeledImage]
    val: list[LabeledImage]
    lists_dir: Path
    split: dict[str, Any] | None = None  # set when train-cls split a class-folder tree itself


@dataclass
class ClsTrainSummary:
    run_dir: Path
    model: str
    input_size: int
    classes: int
    train_images: int
    val_images: int
    unlabeled_images: int
    epochs: int
    best_epoch: int | None
    best_top1: float  # a fraction, 0..1
    best_top5: float
    mean_class_recall: float
    last_metrics: dict[str, float]
    worst_classes: list[dict[str, Any]]
    export_dir: Path
    export_max_abs_diff: float
    confusion_png: Path
    metrics_csv: Path
    recipe: Path
    seconds: float
    ema_decay: float | None
    teacher: str | None = None
    pretrained: str | None = None
    split: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- settings


def resolve_settings(recipe_file: Path | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """defaults < recipe file < flags. A recipe file is a recipes/cls/*.yml mapping or a run's recipe.yaml."""
    from shitu_cli.artifacts import read_yaml
    from shitu_cli.recipes import merge_settings

    layer: dict[str, Any] = {}
    if recipe_file is not None:
        data = read_yaml(Path(recipe_file))
        if isinstance(data, dict) and data.get("kind") == "shitu-recipe":
            data = {k: v for k, v in (data.get("options") or {}).items() if k not in ("dataset", "out", "resume")}
        if not isinstance(data, dict):
            raise BadInput("a recipe must be a YAML mapping of train-cls settings", path=recipe_file)
        layer = data
    try:
        return merge_settings(DEFAULTS, layer, flags)
    except BadInput as exc:
        if recipe_file is not None and exc.path is None:
            exc.path = Path(recipe_file)
        raise


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
    from shitu_cli.models.ppcls import CLS_ARCHS, check_arch

    check_arch(settings["model"], CLS_ARCHS, "model")
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
    if settings["unlabeled"] and not settings["teacher"]:
        raise BadInput("--unlabeled images need a --teacher: they only contribute the distillation term")


# ----------------------------------------------------------------------------- data


def resolve_dataset(dataset: Path, run_dir: Path, val_fraction: float, seed: int) -> ClsData:
    """Lists in the dataset dir (train_list.txt, val_list.txt, labels.txt), or a class-folder tree
    that is split here into RUN_DIR/split (the dataset folder itself is left untouched)."""
    dataset = Path(dataset)
    if not dataset.exists():
        raise BadInput("dataset not found", hint="pass a folder with train_list.txt + labels.txt, or class folders", path=dataset)
    if not dataset.is_dir():
        raise BadInput("not a folder", hint="pass the dataset folder", path=dataset)
    if (dataset / "train_list.txt").is_file():
        return _read_lists(dataset.resolve(), dataset.resolve())
    from shitu_cli.data.split import split_dataset

    result = split_dataset(dataset, out=Path(run_dir) / SPLIT_DIR, val=val_fraction, test=0.0, seed=seed, format="imagenet")
    data = _read_lists(result.out_dir, result.dataset_dir)
    data.split = {"dir": SPLIT_DIR, "val": val_fraction, "seed": seed, "counts": dict(result.counts),
                  "skipped": len(result.skipped), "warnings": list(result.warnings)}
    return data


def _read_lists(lists_dir: Path, root: Path) -> ClsData:
    from shitu_cli.data.lists import read_image_list, read_labels

    label_file = lists_dir / "labels.txt"
    if not label_file.is_file():
        raise BadInput("labels.txt is missing beside train_list.txt", hint="run `shitu split-dataset` to write it", path=label_file)
    labels = read_labels(label_file)
    if len(set(labels)) != len(labels):
        dup = next(name for name in labels if labels.count(name) > 1)
        raise BadInput(f"class {dup!r} is listed twice", path=label_file)
    parts = {}
    for part in ("train", "val"):
        list_file = lists_dir / f"{part}_list.txt"
        if not list_file.is_file():
            raise BadInput(f"{list_file.name} is missing", hint="split with a validation share, e.g. `shitu split-dataset DIR --val 0.2`", path=list_file)
        entries = read_image_list(list_file)
        if not entries:
            raise BadInput(f"{list_file.name} lists no images", hint="split with more images or a larger --val", path=list_file)
        for rel, label_id in entries:
            if not 0 <= label_id < len(labels):
                raise BadInput(
                    f"has {len(labels)} classes but {list_file.name} uses label id {label_id} ({rel})",
                    hint="labels.txt must name one class per id used in the lists, in id order",
                    path=label_file,
                )
        parts[part] = [LabeledImage(root / rel, label_id) for rel, label_id in entries]
        missing = [s.path for s in parts[part] if not s.path.is_file()]
        if missing:
            raise BadInput(f"{len(missing)} image(s) in {list_file.name} do not exist, e.g. {missing[0]}", path=list_file)
    return ClsData(root, labels, parts["train"], parts["val"], lists_dir)


def _unlabeled_images(folder: Path | None) -> list[LabeledImage]:
    if not folder:
        return []
    from shitu_cli.data.images import iter_image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput("--unlabeled folder not found", path=folder)
    images = [LabeledImage(p, -1) for p in iter_image_files(folder)]
    if not images:
        raise BadInput("--unlabeled folder holds no images", path=folder)
    return images


def eval_preprocess(input_size: int) -> Preprocess:
    return Preprocess(resize="short", resize_short=int(round(input_size / EVAL_CROP)))


def _epoch_batches(count: int, batch_size: int, rng_order: np.ndarray) -> list[list[int]]:
    """Shuffled full batches; a last partial batch is dropped (batch norm dislikes a batch of 1)."""
    if count <= batch_size:
        return [list(rng_order)]
    return [list(rng_order[i : i + batch_size]) for i in range(0, count - batch_size + 1, batch_size)]


# ----------------------------------------------------------------------------- model


def build_classifier(arch: str, num_classes: int):
    from shitu_cli.models.ppcls import build_arch

    return build_arch({"name": arch, "class_num": num_classes})


def load_pretrained(model, path: Path, arch: str) -> str:
    """Load a local .pdparams into `model`; a classifier head of another class count is left fresh.

    Returns a sentence saying what was loaded; raises BadInput naming the file when it does not fit.
    """
    from shitu_cli.models.legacy import load_weights
    from shitu_cli.models.registry import resolve_weights

    path = resolve_weights(path)  # a .pdparams path, or a name such as PPLCNet_x1_0-pretrained
    state = load_weights(path)  # arrays only: a downloaded pickle never runs code
    if not isinstance(state, dict) or not state:
        raise BadInput("not a paddle state dict", path=path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and list(state[k].shape) != list(own[k].shape)]
    head = {k for k in missing + wrong if k.startswith("fc.")}
    body_problems = [k for k in missing + wrong if k not in head]
    if body_problems:
        raise BadInput(
            f"does not fit {arch}: {len(body_problems)} of {len(own)} weights missing or of another shape (e.g. {body_problems[0]})",
            hint=f"pass {arch} weights, or choose the --model they belong to",
            path=path,
        )
    model.set_state_dict({k: v for k, v in state.items() if k in own and k not in head})
    if head:
        found = state.get("fc.weight")
        classes = f"{found.shape[1]} classes" if found is not None and len(found.shape) == 2 else "another shape"
        return f"loaded {len(own) - len(head)} weights from {path.name}; the classifier head ({classes} there) starts fresh"
    return f"loaded all {len(own)} weights from {path.name}"


class WithSoftmax:
    """Factory for the export wrapper (a paddle Layer), kept lazy so importing this module stays cheap."""

    @staticmethod
    def wrap(model):
        import paddle

        class _Softmax(paddle.nn.Layer):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return paddle.nn.functional.softmax(self.net(x), axis=-1)

        return _Softmax(model)


# ----------------------------------------------------------------------------- losses


def smooth_targets(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """One-hot rows with `smoothing` spread evenly over all classes."""
    targets = np.full((len(labels), num_classes), smoothing / num_classes, np.float32)
    targets[np.arange(len(labels)), labels] += 1.0 - smoothing
    return targets


def mix_batch(images: np.ndarray, targets: np.ndarray, mixup: float, cutmix: float,
              rng: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mixup or CutMix (one per batch, chosen evenly when both are on) with a shuffled copy of the batch."""
    modes = [m for m, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
    if not modes or len(images) < 2:
        return images, targets
    mode = modes[rng.randint(len(modes))]
    alpha = mixup if mode == "mixup" else cutmix
    lam = float(rng.beta(alpha, alpha))
    order = rng.permutation(len(images))
    if mode == "mixup":
        mixed = lam * images + (1 - lam) * images[order]
    else:
        mixed, lam = _cutmix(images, order, lam, rng)
    return mixed.astype(np.float32), (lam * targets + (1 - lam) * targets[order]).astype(np.float32)


def _cutmix(images: np.ndarray, order: np.ndarray, lam: float, rng: Any) -> tuple[np.ndarray, float]:
    height, width = images.shape[2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = rng.randint(height), rng.randint(width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.copy()
    mixed[:, :, top:bottom, left:right] = images[order][:, :, top:bottom, left:right]
    # The label weight follows the area actually pasted, which clipping at the border can shrink.
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)


# ----------------------------------------------------------------------------- the core


def train_cls(
    dataset: Path | str,
    out: Path | str,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    **settings: Any,
) -> ClsTrainSummary:
    """Train, evaluate, export and record a PP-LCNet classifier into the run dir `out`."""
    from paddle.utils import unique_name

    # paddle.save and jit.save store each tensor's generated name (conv2d_64.w_0), which counts up
    # per process: a fresh name scope makes a replay in the same process byte-identical too.
    with unique_name.guard():
        return _train_cls(dataset, out, resume, progress, settings)


def _train_cls(dataset: Path | str, out: Path | str, resume: bool, progress: Progress | None,
               settings: dict[str, Any]) -> ClsTrainSummary:
    import time

    started = time.perf_counter()
    settings = _complete(settings)
    check_settings(settings)
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInput("-o must be a folder, not a file", path=run_dir)
    teacher = _load_teacher(settings)
    unlabeled = _unlabeled_images(settings["unlabeled"])
    data = resolve_dataset(Path(dataset), run_dir, settings["val"], settings["seed"])
    _check_teacher_classes(teacher, data)
    run = _Run(data, settings, run_dir, teacher, unlabeled, progress)
    fit_result = run.train(resume)
    final = run.final_evaluation()
    export_dir, diff = run.export()
    written = [p for p in (run_dir / n for n in ("metrics.csv", "curves.png", CONFUSION_PNG)) if p.is_file()]
    written += [fit_result.best_checkpoint, *sorted((run_dir / EXPORT_DIR).iterdir())]
    summary = ClsTrainSummary(
        run_dir=run_dir, model=settings["model"], input_size=settings["input_size"], classes=len(data.labels),
        train_images=len(data.train), val_images=len(data.val), unlabeled_images=len(unlabeled),
        epochs=settings["epochs"], best_epoch=fit_result.best_epoch, best_top1=final["top1"], best_top5=final["top5"],
        mean_class_recall=final["mean_class_recall"], last_metrics=fit_result.last_metrics,
        worst_classes=final["worst_classes"], export_dir=export_dir, export_max_abs_diff=diff,
        confusion_png=run_dir / CONFUSION_PNG, metrics_csv=run_dir / "metrics.csv", recipe=run_dir / "recipe.yaml",
        seconds=0.0, ema_decay=run.ema_decay, teacher=settings["teacher"],
        pretrained=settings["pretrained"], split=data.split, notes=run.notes,
    )
    _write_run_recipe(Path(dataset), run_dir, settings, data, summary, written, len(unlabeled))
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def _complete(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [k for k in settings if k not in DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(DEFAULTS), n=1)
        raise BadInput(f"unknown setting {unknown[0]!r}", hint=f"did you mean {close[0]!r}?" if close else None)
    merged = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    merged["lr_decay_epochs"] = parse_decay_epochs(merged["lr_decay_epochs"])
    for key in ("pretrained", "teacher", "unlabeled"):
        merged[key] = str(merged[key]) if merged[key] else None
    return merged


def _load_teacher(settings: Mapping[str, Any]):
    if not settings["teacher"]:
        return None
    from shitu_cli.train.distill import load_teacher

    return load_teacher(settings["teacher"])


def _check_teacher_classes(teacher, data: ClsData) -> None:
    if teacher is None:
        return
    if teacher.labels is not None and list(teacher.labels) != list(data.labels):
        raise BadInput("the teacher was trained on other classes (its labels differ from labels.txt)",
                       hint="distil from a teacher trained on the same labels.txt", path=teacher.source)
    if teacher.num_classes != len(data.labels):
        raise BadInput(f"the teacher predicts {teacher.num_classes} classes, the dataset has {len(data.labels)}", path=teacher.source)


class _Run:
    """One training run's state: model, data pipelines, loss and evaluation, kept together for fit()."""

    def __init__(self, data: ClsData, settings: dict[str, Any], run_dir: Path, teacher, unlabeled: list[LabeledImage],
                 progress: Progress | None):
        from shitu_cli.data.transforms import TrainAugment
        from shitu_cli.train.loop import seed_everything

        self.data, self.settings, self.run_dir = data, settings, run_dir
        self.teacher, self.unlabeled, self.progress = teacher, unlabeled, progress
        self.notes: list[str] = []
        size = settings["input_size"]
        self.input_size = (size, size)
        self.preprocess = eval_preprocess(size)
        self.augment = TrainAugment(self.input_size, crop_scale=(settings["min_crop"], 1.0), flip=bool(settings["flip"]))
        self.batch_size = min(settings["batch_size"], len(data.train))
        self.steps_per_epoch = len(_epoch_batches(len(data.train), self.batch_size, np.arange(len(data.train))))
        seed_everything(settings["seed"])
        self.model = build_classifier(settings["model"], len(data.labels))
        if settings["pretrained"]:
            self.notes.append(load_pretrained(self.model, Path(settings["pretrained"]), settings["model"]))
        total = settings["epochs"] * self.steps_per_epoch
        self.ema_decay = (settings["ema_decay"] or auto_ema_decay(total)) if settings["ema"] else None
        self._val_cache: list[tuple[np.ndarray, np.ndarray]] | None = None

    # --- data

    def make_loader(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        from shitu_cli.data.loader import load_batches

        seed, workers = self.settings["seed"] * 1000 + epoch, self.settings["num_workers"]
        batches = _epoch_batches(len(self.data.train), self.batch_size, np.random.permutation(len(self.data.train)))
        labelled = load_batches(self.data.train, batches, self.preprocess, self.input_size, self.augment, seed, workers)
        extra = self._unlabeled_loader(len(batches), seed, workers)
        for (images, labels), unlabeled in zip(labelled, extra):
            yield images, labels, unlabeled

    def _unlabeled_loader(self, steps: int, seed: int, workers: int) -> Iterator[np.ndarray | None]:
        from shitu_cli.data.loader import load_batches

        if not self.unlabeled:
            while True:
                yield None
        # One batch of unlabelled images per step, cycling through a fresh permutation as needed.
        need = steps * self.batch_size
        order = np.concatenate([np.random.permutation(len(self.unlabeled)) for _ in range(math.ceil(need / len(self.unlabeled)))])
        batches = [list(order[i * self.batch_size : (i + 1) * self.batch_size]) for i in range(steps)]
        for images, _ in load_batches(self.unlabeled, batches, self.preprocess, self.input_size, self.augment, seed + 7, workers):
            yield images

    def val_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from shitu_cli.data.loader import load_batches, sequential_batches

        if self._val_cache is not None:
            yield from self._val_cache
            return
        size = len(self.data.val) * 3 * self.input_size[0] * self.input_size[1] * 4
        cache = [] if size <= VAL_CACHE_BYTES else None
        batches = sequential_batches(len(self.data.val), max(self.batch_size, 32))
        for batch in load_batches(self.data.val, batches, self.preprocess, self.input_size, None, 0, self.settings["num_workers"]):
            if cache is not None:
                cache.append(batch)
            yield batch
        self._val_cache = cache

    # --- loss and evaluation

    def loss_fn(self, model, batch) -> tuple[Any, dict[str, float]]:
        import paddle

        from shitu_cli.train.distill import distillation_loss, soft_cross_entropy

        images, labels, unlabeled = batch
        s = self.settings
        targets = smooth_targets(labels, len(self.data.labels), s["label_smoothing"])
        images, targets = mix_batch(images, targets, s["mixup"], s["cutmix"], np.random)
        if unlabeled is not None:
            images = np.concatenate([images, unlabeled])
        logits = model(paddle.to_tensor(images))
        if self.teacher is None:
            return soft_cross_entropy(logits, paddle.to_tensor(targets)), {}
        # The teacher sees exactly the (augmented, mixed) batch the student sees.
        teacher_logits = paddle.to_tensor(self.teacher.logits(images, self.preprocess))
        return distillation_loss(logits, teacher_logits, paddle.to_tensor(targets), s["distill_temperature"], s["distill_weight"])

    def predict(self, model, images: np.ndarray) -> np.ndarray:
        import paddle

        model.eval()
        with paddle.no_grad():
            return model(paddle.to_tensor(images)).numpy()

    def evaluate(self, model, evaluators: Sequence[Any] | None = None) -> dict[str, float]:
        from shitu_cli.train.cls_metrics import TopKAccuracy

        evaluators = list(evaluators or [TopKAccuracy((1, 5))])
        for evaluator in evaluators:
            evaluator.reset()
        for images, labels in self.val_batches():
            logits = self.predict(model, images)
            for evaluator in evaluators:
                evaluator.process(logits, labels)
        metrics: dict[str, float] = {}
        for evaluator in evaluators:
            metrics.update(evaluator.evaluate())
        return metrics

    # --- stages

    def train(self, resume: bool):
        from shitu_cli.train.loop import LoopConfig, fit

        s = self.settings
        config = LoopConfig(
            epochs=s["epochs"], lr=s["lr"], weight_decay=s["weight_decay"], warmup_epochs=s["warmup_epochs"],
            lr_schedule=s["lr_schedule"], lr_decay_epochs=list(s["lr_decay_epochs"]), ema_decay=self.ema_decay,
            best_metric="top1", seed=s["seed"],
        )
        set_total = getattr(self.progress, "set_total", None)
        if set_total:
            set_total(s["epochs"] * self.steps_per_epoch)
        try:
            return fit(self.model, self.make_loader, self.steps_per_epoch, self.loss_fn, self.evaluate, config,
                       self.run_dir, resume=resume, on_step=self.progress, batch_size=self.batch_size)
        except (ValueError, RuntimeError) as exc:
            raise WorkFailed(f"training failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})", path=self.run_dir) from None

    def final_evaluation(self) -> dict[str, Any]:
        """Top-1/top-5 and the confusion matrix of the best weights (fit() left them in the model)."""
        from shitu_cli.train.cls_metrics import ConfusionMatrix, TopKAccuracy, save_confusion_png

        confusion = ConfusionMatrix(len(self.data.labels))
        metrics = self.evaluate(self.model, [TopKAccuracy((1, 5)), confusion])
        if not np.isfinite(metrics["top1"]):
            raise WorkFailed("evaluation produced no score", path=self.run_dir)
        save_confusion_png(self.run_dir / CONFUSION_PNG, confusion.matrix, self.data.labels)
        support = confusion.matrix.sum(axis=1)
        recalls = confusion.per_class_recall()
        ranked = sorted((r, i) for i, r in enumerate(recalls) if r is not None)
        worst = [{"label": self.data.labels[i], "recall": r, "images": int(support[i])} for r, i in ranked[:5]]
        return {**metrics, "worst_classes": worst}

    def export(self) -> tuple[Path, float]:
        """Export model + softmax and check Paddle Inference reproduces the trained model's output."""
        from shitu_cli.infer.predictor import PredictorOptions, build_predictor
        from shitu_cli.models.export import export_layer
        from shitu_cli.models.manifest import ModelManifest

        s = self.settings
        size = s["input_size"]
        manifest = ModelManifest(
            task="cls", arch=s["model"], input_size=(size, size), model_file="", params_file="",
            preprocess=self.preprocess, labels=list(self.data.labels), extra={"outputs": "probabilities"},
        )
        probe, _ = next(iter(self.val_batches()))
        probe = probe[:8]
        expected = self.predict(WithSoftmax.wrap(self.model), probe)
        export_dir = export_layer(WithSoftmax.wrap(_inference_form(self.model)), self.run_dir / EXPORT_DIR,
                                  [[None, 3, size, size]], manifest)
        # mkldnn off: the check is about the graph, not oneDNN's rounding.
        got = build_predictor(export_dir, PredictorOptions(mkldnn=False), task="cls").run(probe)[0]
        diff = float(np.abs(expected - got).max())
        if diff > EXPORT_TOLERANCE:
            raise WorkFailed(f"the exported model's outputs differ from the trained model's by {diff:.2g}", path=export_dir)
        return export_dir, diff


def _inference_form(model):
    """A copy with PPLCNetV2's parallel depthwise branches fused into one conv each (same outputs)."""
    import copy

    fused = copy.deepcopy(model)
    for layer in fused.sublayers():
        if hasattr(layer, "re_parameterize"):
            layer.re_parameterize()
    return fused


def _write_run_recipe(dataset: Path, run_dir: Path, settings: dict[str, Any], data: ClsData,
                      summary: ClsTrainSummary, written: list[Path], unlabeled: int) -> None:
    from shitu_cli.artifacts import sha256_file
    from shitu_cli.recipes import Recipe, write_recipe

    lists = {name: sha256_file(data.lists_dir / name) for name in ("train_list.txt", "val_list.txt", "labels.txt")}
    options = {"dataset": str(Path(dataset).resolve()), "out": str(run_dir.resolve()), **settings}
    inputs = {"lists_dir": str(data.lists_dir), "list_sha256": lists, "train_images": len(data.train),
              "val_images": len(data.val), "unlabeled_images": unlabeled, "classes": len(data.labels)}
    if data.split:
        inputs["split"] = data.split
    metrics = {"best_top1": summary.best_top1, "best_top5": summary.best_top5, "best_epoch": summary.best_epoch,
               "mean_class_recall": summary.mean_class_recall, "export_max_abs_diff": summary.export_max_abs_diff,
               "ema_decay": summary.ema_decay, "notes": summary.notes}
    recipe = Recipe(command="train-cls", core=CORE, options=options, seed=settings["seed"], inputs=inputs, metrics=metrics)
    write_recipe(run_dir, recipe, written)
