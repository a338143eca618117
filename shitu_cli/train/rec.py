"""Training a PP-ShiTuV2 feature extractor (RecModel = backbone + BNNeck + FC): the run, its loop and export.

`train_rec` is the library twin of `shitu train-rec`; it returns a `TrainRecResult` and
writes metrics.csv, curves.png, checkpoints/, export/ (model + shitu.yaml) and recipe.yaml.
Settings, data, model and evaluation live in rec_settings, rec_data, rec_model and rec_eval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shitu_cli.artifacts import read_yaml
from shitu_cli.data.loader import load_batches
from shitu_cli.errors import BadInput
from shitu_cli.train.image_check import SkippedImage
from shitu_cli.train.metrics import l2_normalize
from shitu_cli.train.rec_data import RecData, list_checksums, read_rec_lists, resolve_data
from shitu_cli.train.rec_eval import Embedder, calibrate_batch_norm, calibration_images, make_evaluate
from shitu_cli.train.rec_quality import quality_notes
from shitu_cli.train.rec_model import (
    build_rec_model, embedding_layer, load_pretrained, pretrained_reference, re_parameterize, rec_arch,
)
from shitu_cli.train.rec_settings import (
    DEFAULT_RECIPE, RECIPE_DIR, RecSettings, load_recipe, recipe_path, resolve_settings, settings_hash,
)
from shitu_cli.train.stop import StopRequest

# The library surface; tests, benchmarks and compress import these names from here.
__all__ = ["train_rec", "TrainRecResult", "RecSettings", "RecData", "RECIPE_DIR", "DEFAULT_RECIPE", "resolve_settings",
           "read_rec_lists", "build_rec_model", "rec_arch", "embedding_layer", "re_parameterize", "export_rec",
           "Embedder", "calibrate_batch_norm"]

CORE = "shitu_cli.train.rec:train_rec"
LISTS = ("train_list.txt", "gallery_list.txt", "query_list.txt")
EXPORT_DIR = "export"
SPLIT_DIR = "split"
# Settings a --resume may change: how long to train, and how images are decoded and batched for eval.
RESUME_FREE = ("epochs", "num_workers", "eval_batch_size")
EXPORT_TOLERANCE = 1e-4

Progress = Callable[..., None]  # progress(advance=0, total=None, completed=None, **live_fields)


@dataclass
class TrainRecResult:
    run_dir: Path
    export_dir: Path
    recipe: Path
    backbone: str
    embedding_size: int
    input_size: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    train_images: int
    train_classes: int
    gallery_images: int
    query_images: int
    best_epoch: int | None
    best_recall1: float | None
    final: dict[str, float]  # metrics of the exported (best) model
    initial: dict[str, float]  # the same metrics before training
    export_max_abs_diff: float  # raw BNNeck features
    export_normalised_diff: float  # L2-normalised features: what the index compares
    pretrained: dict[str, Any] | None
    resumed_from_epoch: int
    seconds: float
    warnings: list[str]
    skipped: list[SkippedImage] = field(default_factory=list)  # listed images that could not be read, left out
    epochs_done: int = 0
    stopped_by: str | None = None  # SIGINT / SIGTERM when a signal ended training early
    distillation: dict[str, Any] | None = None  # teacher, cache hits/misses, pool size (rec_distill)
    best_metric: str = "mAP"  # what picked best_epoch


# ----------------------------------------------------------------------------- training


def make_train_loader(data: RecData, settings: RecSettings):
    """(sampler, make_loader(epoch)) yielding paddle tensors of augmented PK batches."""
    from shitu_cli.data.transforms import TrainAugment
    from shitu_cli.models.manifest import Preprocess
    from shitu_cli.train.samplers import PKBatchSampler

    size = (settings.input_size, settings.input_size)
    sampler = PKBatchSampler([s.label for s in data.train], settings.batch_size // settings.images_per_class,
                             settings.images_per_class, seed=settings.seed)
    augment = TrainAugment(size, crop_scale=(settings.crop_scale_min, 1.0), rotate_degrees=settings.rotate_degrees,
                           flip=settings.flip)
    preprocess = Preprocess(resize="direct")

    def make_loader(epoch: int):
        import paddle

        batches = load_batches(data.train, sampler.epoch(epoch), preprocess, size, augment=augment,
                               seed=settings.seed * 1000 + epoch, num_workers=settings.num_workers)
        for images, labels in batches:
            yield paddle.to_tensor(images), paddle.to_tensor(labels)

    return sampler, make_loader


def _loop_config(settings: RecSettings):
    from shitu_cli.train.loop import LoopConfig

    return LoopConfig(
        epochs=settings.epochs, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
        warmup_epochs=settings.warmup_epochs, ema_decay=settings.ema_decay or None, eval_every=settings.eval_every,
        best_metric=settings.best_metric, seed=settings.seed,
    )


def _resumed(run_dir: Path, dataset, recipe, pretrained, overrides: dict[str, Any]) -> tuple[Path, dict[str, Any], Any]:
    """(dataset, settings, pretrained) of the run being resumed, from its recipe.yaml; a setting asked
    for that differs from the run's is refused by name, except epochs and the decoding knobs."""
    from shitu_cli.train.run_dir import changed_settings, refuse_changes, same_path, saved_recipe

    options = saved_recipe(run_dir, "train-rec").options
    saved = {k: v for k, v in options.items() if k in RecSettings.__dataclass_fields__}
    requested = {**(load_recipe(recipe) if recipe else {}), **overrides}
    changed = changed_settings(saved, requested, RESUME_FREE, _comparable)
    for name, given in (("dataset", dataset), ("pretrained", pretrained)):
        if given is not None and not same_path(given, options.get(name)):
            changed.insert(0, f"{name} {options.get(name)!r} -> {str(given)!r}")
    refuse_changes(changed, run_dir)
    free = {k: v for k, v in requested.items() if k in RESUME_FREE and v is not None}
    return Path(options["dataset"]), {**saved, **free}, options.get("pretrained")


def _comparable(_key: str, value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def train_rec(dataset: Path | str | None, out: Path | str, recipe: str | None = None, pretrained: Path | str | None = None,
              resume: bool = False, progress: Progress | None = None, teacher: Path | str | None = None,
              unlabeled: Path | str | None = None, distill: dict[str, Any] | None = None,
              **overrides: Any) -> TrainRecResult:
    """Train a recogniser on `dataset` into the run dir `out`; see the module docstring for the outputs.

    With `resume`, the run's recipe.yaml supplies dataset and settings (`dataset` may be None); Ctrl-C or
    SIGTERM stop training after the current step and the best epoch so far is exported.
    With `teacher` (an .onnx, a Paddle export or a run dir) the student also learns the teacher's
    embeddings, on `unlabeled` images too; `distill` holds rec_distill.DistillSettings fields.
    """
    from shitu_cli.train.stop import stop_on_signals

    with stop_on_signals() as stop:
        return _train_rec(dataset, out, recipe, pretrained, resume, progress, overrides, stop,
                          (teacher, unlabeled, distill))


def _train_rec(dataset, out, recipe, pretrained, resume: bool, progress: Progress | None, overrides: dict[str, Any],
               stop: StopRequest, distill_args: tuple = (None, None, None)) -> TrainRecResult:
    import time

    from shitu_cli.train import distributed
    from shitu_cli.train.checkpoints import Checkpoints
    from shitu_cli.train.loop import seed_everything
    from shitu_cli.train.run_dir import check_run_dir

    started = time.perf_counter()
    run_dir = check_run_dir(out, resume, "train-rec")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if resume:
        dataset, saved, pretrained = _resumed(run_dir, dataset, recipe, pretrained, overrides)
        settings = resolve_settings(None, {}, saved)
    elif dataset is None:
        raise BadInput("no DATASET given", hint="pass the dataset folder (or --resume an earlier run)")
    else:
        settings = resolve_settings(recipe, overrides)
    distiller = _plan_distillation(run_dir, resume, distill_args)  # the teacher is checked before anything trains
    world = distributed.start()  # under paddle.distributed.launch: this rank's device and the process group
    with distributed.main_first(world):  # rank 0 writes a split of class folders; the others then read it
        data = resolve_data(Path(dataset), run_dir, settings)
    seed_everything(settings.seed)
    model = build_rec_model(settings, len(data.train_classes), pretrained)  # an .onnx backbone shapes the model
    # A resumed run starts from its own checkpoint; the pretrained file is only recorded.
    pretrained_info = load_pretrained(model, pretrained, settings.backbone) if pretrained and not resume else None
    if distiller is not None:
        distiller.fit_targets(data.train, settings.seed, settings.num_workers, progress)
        model = distiller.wrap(model, settings.embedding_size)  # + a projection head, dropped at export
    _write_run_recipe(run_dir, settings, data, dataset, recipe, pretrained, distiller=distiller)  # for --resume
    calibration = calibration_images(data, settings)
    evaluate = make_evaluate(data, settings, calibration) if world.is_main else None  # rank 0 alone evaluates
    initial = _initial_metrics(model, evaluate)
    state_file = Checkpoints(run_dir).state_file
    done_epochs = int((read_yaml(state_file) or {}).get("epoch", 0)) if resume and state_file.is_file() else 0
    fitted, sampler = _fit(model, data, settings, evaluate, run_dir, resume, done_epochs, progress, stop, distiller)
    if not world.is_main:
        return None  # rank 0 alone exports and records the run
    if evaluate is None:  # nothing calibrated the final weights yet; export and best.pdparams must agree
        calibrate_batch_norm(model, calibration)
        Checkpoints(run_dir).save("best.pdparams", model.state_dict())
    final = _best_row_metrics(fitted)
    export_dir, check = export_rec(model, run_dir / EXPORT_DIR, settings, data)
    notes = list(data.warnings) + quality_notes(initial, final, fitted.history, settings.best_metric, fitted.best_epoch,
                                                len(data.query))
    if check.max_normalised_diff > EXPORT_TOLERANCE:
        notes.append(f"exported model's normalised embeddings differ from the trained one's by up to "
                     f"{check.max_normalised_diff:.2e} (over {EXPORT_TOLERANCE:g})")
    result = TrainRecResult(
        run_dir=run_dir, export_dir=export_dir, recipe=run_dir / "recipe.yaml",
        backbone=getattr(model, "backbone_name", settings.backbone),
        embedding_size=settings.embedding_size, input_size=settings.input_size, epochs=settings.epochs,
        steps_per_epoch=len(sampler), batch_size=sampler.batch_size, train_images=len(data.train),
        train_classes=len(data.train_classes), gallery_images=len(data.gallery), query_images=len(data.query),
        best_epoch=fitted.best_epoch, best_recall1=final.get("recall1"), final=final, initial=initial,
        export_max_abs_diff=check.max_abs_diff, export_normalised_diff=check.max_normalised_diff,
        pretrained=pretrained_info, resumed_from_epoch=done_epochs,
        seconds=round(time.perf_counter() - started, 2), warnings=notes, skipped=data.skipped,
        epochs_done=fitted.epochs_done, stopped_by=fitted.stopped_by, best_metric=settings.best_metric,
        distillation=distiller.record() if distiller else None,
    )
    _write_run_recipe(run_dir, settings, data, dataset, recipe, pretrained, result, distiller)
    return result


def _plan_distillation(run_dir: Path, resume: bool, distill_args: tuple):
    import os

    from shitu_cli.train.rec_distill import plan_distillation, resumed_distillation
    from shitu_cli.train.run_dir import saved_recipe

    teacher, unlabeled, distill = distill_args
    if resume:
        teacher, unlabeled, distill = resumed_distillation(saved_recipe(run_dir, "train-rec").options, *distill_args)
    return plan_distillation(teacher, unlabeled, distill, threads=min(4, os.cpu_count() or 1))


def _initial_metrics(model, evaluate) -> dict[str, float]:
    """Metrics of the untrained net, measured on a copy so calibrating it leaves training untouched."""
    import copy

    return evaluate(copy.deepcopy(model)) if evaluate else {}


def _fit(model, data: RecData, settings: RecSettings, evaluate, run_dir: Path, resume: bool, done_epochs: int,
         progress: Progress | None, stop: StopRequest | None = None, distiller=None):
    """The shared loop with PK batches and CE + triplet (+ distillation); returns (FitResult, sampler)."""
    import warnings

    from shitu_cli.train.loop import fit
    from shitu_cli.train.losses import RecLoss, RecLossConfig

    from dataclasses import fields

    # The recipe is flat: every loss knob it names is a RecSettings field of the same name.
    loss_knobs = {f.name: getattr(settings, f.name) for f in fields(RecLossConfig) if hasattr(settings, f.name)}
    loss = RecLoss(RecLossConfig(**loss_knobs))
    sampler, make_loader = make_train_loader(data, settings)
    loss_fn, batch_size = (lambda m, batch: loss(m(batch[0]), batch[1])), sampler.batch_size
    if distiller is not None:
        make_loader = distiller.loader(sampler, settings.input_size, settings.seed, settings.num_workers)
        loss_fn, batch_size = distiller.loss(loss), batch_size + distiller.settings.unlabeled_per_batch
    if progress:
        progress(total=settings.epochs * len(sampler), completed=done_epochs * len(sampler))
    with warnings.catch_warnings():
        # paddle's BatchNorm1D/2D warn on every training forward that they track global stats.
        warnings.filterwarnings("ignore", message="When training, we now always track")
        fitted = fit(model, make_loader, len(sampler), loss_fn, evaluate, _loop_config(settings), run_dir,
                     resume=resume, on_step=progress, batch_size=batch_size, stop=stop)
    return fitted, sampler


def _best_row_metrics(fitted) -> dict[str, float]:
    """The exported (best) model's metrics, as measured at its epoch."""
    for row in fitted.history:
        if row["epoch"] == fitted.best_epoch:
            return {name: row[name] for name in ("recall1", "recall5", "mAP")}
    return {}


# ----------------------------------------------------------------------------- export and recipe


def export_rec(model, export_dir: Path, settings: RecSettings, data: RecData) -> tuple[Path, "ExportCheck"]:
    """Export the embedding wrapper (re-parameterised) and check it against the dygraph model
    through Paddle Inference; returns the export dir and an ExportCheck."""
    import paddle

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest, Preprocess

    size = (settings.input_size, settings.input_size)
    probe = next(load_batches((data.query or data.train)[:4], [list(range(min(4, len(data.query or data.train))))],
                              Preprocess(resize="direct"), size))[0]
    wrapper = embedding_layer(model)
    wrapper.eval()
    with paddle.no_grad():
        reference = wrapper(paddle.to_tensor(probe)).numpy()
    folded = re_parameterize(wrapper)
    manifest = ModelManifest(
        task="rec", arch=getattr(model, "arch_name", f"RecModel/{settings.backbone}"), input_size=size, model_file="", params_file="",
        preprocess=Preprocess(resize="direct"), embedding_dim=settings.embedding_size,
        recipe_hash=settings_hash(settings),
        extra={"backbone": settings.backbone, "output": "BNNeck features, not L2-normalised",
               "train_classes": len(data.train_classes), "re_parameterized_blocks": folded,
               **getattr(model, "manifest_extra", {})},
    )
    export_layer(wrapper, export_dir, [[None, 3, *size]], manifest)
    predictor = build_predictor(export_dir, PredictorOptions(), task="rec")
    exported = predictor.run(probe)[0]
    return Path(export_dir), ExportCheck(
        max_abs_diff=float(np.abs(exported - reference).max()),
        max_normalised_diff=float(np.abs(l2_normalize(exported) - l2_normalize(reference)).max()),
        feature_scale=float(np.abs(reference).max()),
    )


@dataclass
class ExportCheck:
    """How far Paddle Inference's output is from the dygraph model's on a few real images.

    BNNeck features can reach tens in magnitude, where float32 rounding alone gives ~1e-3 absolute;
    the normalised difference (unit vectors, what the index compares) is the scale-free check."""

    max_abs_diff: float
    max_normalised_diff: float
    feature_scale: float


def _write_run_recipe(run_dir: Path, settings: RecSettings, data: RecData, dataset, recipe, pretrained,
                      result: TrainRecResult | None = None, distiller=None) -> None:
    """recipe.yaml: at the start (no result: settings only, what --resume reads), and again at the end."""
    from shitu_cli.recipes import Recipe, write_recipe
    from shitu_cli.train.distributed import current_world, describe
    from shitu_cli.train.loop import CURVES_PNG, METRICS_CSV

    if not current_world().is_main:
        return

    # Every setting is explicit in `options`, so a replay needs no recipe file; the base one is noted in inputs.
    options = {"dataset": Path(dataset).resolve().as_posix(), "recipe": None,
               "pretrained": pretrained_reference(pretrained), **asdict(settings)}
    if distiller is not None:  # teacher, unlabeled, distill: train_rec's own keywords, so reproduce replays them
        options.update(distiller.options())
    inputs = {"base_recipe": recipe_path(recipe).resolve().as_posix(), "lists_dir": data.lists_dir.as_posix(),
              "image_root": data.root.as_posix(), "lists": list_checksums(data),
              "train_images": len(data.train), "train_classes": len(data.train_classes),
              "gallery_images": len(data.gallery), "query_images": len(data.query), "split": data.split,
              "skipped_images": [{"path": s.path, "reason": s.reason} for s in data.skipped],
              "distributed": describe(current_world(), settings.batch_size)}
    if distiller is not None:
        inputs["distillation"] = distiller.record()  # teacher sha256, output, preprocessing, cache dir
    metrics: dict[str, Any] = {"status": "training"}
    written: list[Path] = []
    if result is not None:
        inputs["pretrained"] = result.pretrained
        metrics = {"best_epoch": result.best_epoch, "best_recall1": result.best_recall1, "final": result.final,
                   "initial": result.initial, "export_max_abs_diff": result.export_max_abs_diff,
                   "export_normalised_diff": result.export_normalised_diff, "epochs_done": result.epochs_done}
        if result.stopped_by:
            metrics["stopped_by"] = result.stopped_by
        written = [p for p in result.export_dir.iterdir() if p.is_file()]
        written += [run_dir / name for name in (METRICS_CSV, CURVES_PNG) if (run_dir / name).is_file()]
        if data.split is not None:
            written += [p for p in data.list_files if p.is_file()]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(run_dir, Recipe(command="train-rec", core=CORE, options=options, seed=settings.seed,
                                 inputs=inputs, metrics=metrics), written)
