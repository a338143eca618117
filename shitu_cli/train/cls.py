"""Training a PP-LCNet image classifier: lists or class folders in, a run dir with checkpoints, metrics,
confusion matrix, recipe and an exported softmax model out. `train_cls` is the core of `shitu train-cls`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from shitu_cli.data.loader import LabeledImage
from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.train.cls_data import ClsData, _epoch_batches, _unlabeled_images, eval_preprocess, resolve_dataset
from shitu_cli.train.cls_model import (
    WithSoftmax, _inference_form, build_classifier, load_pretrained, mix_batch, smooth_targets,
)
from shitu_cli.train.cls_settings import (
    DEFAULTS, auto_ema_decay, check_settings, complete_settings, parse_decay_epochs, requested_settings, resolve_settings,
)
from shitu_cli.train.distributed import check_divisible, current_world, shard_batches
from shitu_cli.train.image_check import SkippedImage
from shitu_cli.train.stop import StopRequest

# The library surface (the settings, model and data helpers live in cls_settings, cls_model, cls_data).
__all__ = ["train_cls", "ClsTrainSummary", "resolve_settings", "requested_settings", "parse_decay_epochs",
           "build_classifier", "load_pretrained", "WithSoftmax", "mix_batch", "smooth_targets", "auto_ema_decay"]

CORE = "shitu_cli.train.cls:train_cls"
CONFUSION_PNG = "confusion.png"
EXPORT_DIR = "export"
# Settings a --resume may change: how long to train, and how many threads decode.
RESUME_FREE = ("epochs", "num_workers")
# The exported graph must reproduce the trained model; beyond this the export is broken, not noisy.
EXPORT_TOLERANCE = 1e-4
# Val batches are decoded once and kept in memory when they fit in this budget.
VAL_CACHE_BYTES = 512 * 1024 * 1024

Progress = Callable[..., None]  # progress(advance=1, **live_fields); may also have .set_total(n)


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
    skipped: list[SkippedImage] = field(default_factory=list)  # listed images that could not be read, left out
    epochs_done: int = 0
    stopped_by: str | None = None  # SIGINT / SIGTERM when a signal ended training early


# ----------------------------------------------------------------------------- the core


def train_cls(
    dataset: Path | str | None,
    out: Path | str,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    **settings: Any,
) -> ClsTrainSummary:
    """Train, evaluate, export and record a PP-LCNet classifier into the run dir `out`.

    With `resume`, `settings` are only what the user asked for: the run's own recipe.yaml supplies
    the rest, and any that differ from it are refused (except epochs and num_workers). Ctrl-C or
    SIGTERM stop training after the current step; the best epoch so far is still exported.
    """
    from paddle.utils import unique_name

    from shitu_cli.train.stop import stop_on_signals

    # paddle.save and jit.save store each tensor's generated name (conv2d_64.w_0), which counts up
    # per process: a fresh name scope makes a replay in the same process byte-identical too.
    with unique_name.guard(), stop_on_signals() as stop:
        return _train_cls(dataset, out, resume, progress, settings, stop)


def _train_cls(dataset: Path | str | None, out: Path | str, resume: bool, progress: Progress | None,
               settings: dict[str, Any], stop: StopRequest) -> ClsTrainSummary | None:
    """The run; under paddle.distributed.launch every rank trains and rank 0 alone evaluates, exports and
    records (the others return None)."""
    import time

    from shitu_cli.train import distributed
    from shitu_cli.train.run_dir import check_run_dir

    started = time.perf_counter()
    run_dir = check_run_dir(out, resume, "train-cls")
    if resume:
        dataset, settings = _resumed_settings(run_dir, dataset, settings)
    elif dataset is None:
        raise BadInput("no DATASET given", hint="pass the dataset folder (or --resume an earlier run)")
    settings = complete_settings(settings)
    check_settings(settings)
    teacher = _load_teacher(settings)
    unlabeled = _unlabeled_images(settings["unlabeled"])
    world = distributed.start()
    with distributed.main_first(world):  # rank 0 writes a split of class folders; the others then read it
        data = resolve_dataset(Path(dataset), run_dir, settings["val"], settings["seed"])
    _check_teacher_classes(teacher, data)
    run = _Run(data, settings, run_dir, teacher, unlabeled, progress, load_pretrained_weights=not resume)
    _write_run_recipe(Path(dataset), run_dir, settings, data, None, [], len(unlabeled))  # so a killed run can resume
    fit_result = run.train(resume, stop)
    if not world.is_main:
        return None
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
        pretrained=settings["pretrained"], split=data.split, notes=run.notes, skipped=data.skipped,
        epochs_done=fit_result.epochs_done, stopped_by=fit_result.stopped_by,
    )
    _write_run_recipe(Path(dataset), run_dir, settings, data, summary, written, len(unlabeled))
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def _resumed_settings(run_dir: Path, dataset: Path | str | None, requested: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The run's own dataset and settings (its recipe.yaml), with only epochs / num_workers taken from
    the request; anything else asked for that differs is refused by name."""
    from shitu_cli.train.run_dir import changed_settings, refuse_changes, same_path, saved_recipe

    options = saved_recipe(run_dir, "train-cls").options
    saved = complete_settings({k: v for k, v in options.items() if k in DEFAULTS})
    requested = {k: v for k, v in requested.items() if v is not None}

    def normalise(key: str, value: Any) -> Any:
        return complete_settings({key: value})[key] if key in DEFAULTS else value

    changed = changed_settings(saved, requested, RESUME_FREE, normalise)
    if dataset is not None and not same_path(dataset, options.get("dataset")):
        changed.insert(0, f"dataset {options.get('dataset')!r} -> {str(dataset)!r}")
    refuse_changes(changed, run_dir)
    return Path(options["dataset"]), {**saved, **{k: requested[k] for k in RESUME_FREE if k in requested}}


def _load_teacher(settings: Mapping[str, Any]):
    if not settings["teacher"]:
        return None
    from shitu_cli.train.distill import load_teacher

    return load_teacher(settings["teacher"], onnx_options={
        "output": settings.get("teacher_output"), "size": settings.get("teacher_size"),
        "mean": settings.get("teacher_mean"), "std": settings.get("teacher_std")})


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
                 progress: Progress | None, load_pretrained_weights: bool = True):
        from shitu_cli.data.transforms import TrainAugment
        from shitu_cli.train.loop import seed_everything

        self.data, self.settings, self.run_dir = data, settings, run_dir
        self.teacher, self.unlabeled, self.progress = teacher, unlabeled, progress
        self.notes: list[str] = []
        size = settings["input_size"]
        self.input_size = (size, size)
        self.preprocess = eval_preprocess(size)
        self.augment = TrainAugment(self.input_size, crop_scale=(settings["min_crop"], 1.0), flip=bool(settings["flip"]))
        self.batch_size = min(settings["batch_size"], len(data.train))  # the global batch, over all ranks
        self.world = current_world()
        check_divisible(self.batch_size, self.world, f"a batch of {self.batch_size} images",
                        hint=f"use a --batch-size that is a multiple of {self.world.size}")
        self.steps_per_epoch = len(_epoch_batches(len(data.train), self.batch_size, np.arange(len(data.train))))
        seed_everything(settings["seed"])
        self.model = build_classifier(settings["model"], len(data.labels))
        if settings["pretrained"] and load_pretrained_weights:  # a resumed run starts from its own checkpoint
            self.notes.append(load_pretrained(self.model, Path(settings["pretrained"]), settings["model"]))
        total = settings["epochs"] * self.steps_per_epoch
        self.ema_decay = (settings["ema_decay"] or auto_ema_decay(total)) if settings["ema"] else None
        self._val_cache: list[tuple[np.ndarray, np.ndarray]] | None = None

    # --- data

    def make_loader(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        from shitu_cli.data.loader import load_batches

        seed, workers = self.settings["seed"] * 1000 + epoch, self.settings["num_workers"]
        batches = _epoch_batches(len(self.data.train), self.batch_size, np.random.permutation(len(self.data.train)))
        batches = shard_batches(batches, self.world)  # every rank drew the same permutation (seeded per epoch)
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
        batches = shard_batches([list(order[i * self.batch_size : (i + 1) * self.batch_size]) for i in range(steps)], self.world)
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

    def train(self, resume: bool, stop: StopRequest | None = None):
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
            evaluate = self.evaluate if self.world.is_main else None  # rank 0 alone evaluates
            return fit(self.model, self.make_loader, self.steps_per_epoch, self.loss_fn, evaluate, config,
                       self.run_dir, resume=resume, on_step=self.progress, batch_size=self.batch_size, stop=stop)
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
        from shitu_cli.models.cls_families import export_extra
        from shitu_cli.models.export import export_layer
        from shitu_cli.models.manifest import ModelManifest

        s = self.settings
        size = s["input_size"]
        manifest = ModelManifest(
            task="cls", arch=s["model"], input_size=(size, size), model_file="", params_file="",
            preprocess=self.preprocess, labels=list(self.data.labels), extra={"outputs": "probabilities", **export_extra(s["model"])},
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


def _write_run_recipe(dataset: Path, run_dir: Path, settings: dict[str, Any], data: ClsData,
                      summary: ClsTrainSummary | None, written: list[Path], unlabeled: int) -> None:
    """recipe.yaml: at the start (summary None: settings only, what --resume reads), and again at the end."""
    from shitu_cli.artifacts import sha256_file
    from shitu_cli.recipes import Recipe, write_recipe
    from shitu_cli.train.distributed import describe

    world = current_world()
    if not world.is_main:
        return

    lists = {name: sha256_file(data.lists_dir / name) for name in ("train_list.txt", "val_list.txt", "labels.txt")}
    options = {"dataset": str(Path(dataset).resolve()), "out": str(run_dir.resolve()), **settings}
    inputs = {"lists_dir": str(data.lists_dir), "list_sha256": lists, "train_images": len(data.train),
              "val_images": len(data.val), "unlabeled_images": unlabeled, "classes": len(data.labels),
              "skipped_images": [{"path": s.path, "reason": s.reason} for s in data.skipped],
              "distributed": describe(world, min(settings["batch_size"], len(data.train)))}
    if data.split:
        inputs["split"] = data.split
    metrics: dict[str, Any] = {"status": "training"}
    if summary is not None:
        metrics = {"best_top1": summary.best_top1, "best_top5": summary.best_top5, "best_epoch": summary.best_epoch,
                   "mean_class_recall": summary.mean_class_recall, "export_max_abs_diff": summary.export_max_abs_diff,
                   "ema_decay": summary.ema_decay, "notes": summary.notes, "epochs_done": summary.epochs_done}
        if summary.stopped_by:
            metrics["stopped_by"] = summary.stopped_by
    recipe = Recipe(command="train-cls", core=CORE, options=options, seed=settings["seed"], inputs=inputs, metrics=metrics)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(run_dir, recipe, written)
