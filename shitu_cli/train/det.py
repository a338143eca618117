"""Mainbody detector training: a recipe + a COCO/VOC dataset -> ppdet's Trainer -> best COCO mAP
checkpoint -> an exported PicoDet with NMS (model.json + model.pdiparams + infer_cfg.yml + shitu.yaml).

Recipes and the ppdet config live in det_config, datasets in det_data, the lr schedule (and the warm-up fitted
to short runs) in det_schedule, checkpoints and resuming in det_checkpoints, the export in det_export.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shitu_cli.artifacts import atomic_write_text, dump_yaml, read_yaml, write_yaml
from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.train import distributed
from shitu_cli.train.det_config import (
    CHECKPOINTS, DEFAULT_RECIPE, PPDET_CONFIG, DetSettings, build_ppdet_config, load_ppdet_config, load_recipe,
    recipe_epochs,
    ppdet_chatter_to, ppdet_output_to, recipe_names, resolve_settings,
)
from shitu_cli.train.det_checkpoints import keep_last, load_pretrained, restore_best
from shitu_cli.train.det_checkpoints import resume as resume_weights
from shitu_cli.train.det_data import DetDataset, coco_image_dir, prepare_dataset, read_coco
from shitu_cli.train.det_families import epoch_switches, family_of, trained_epochs
from shitu_cli.train.det_metrics import class_aps
from shitu_cli.train.det_schedule import epoch_points_note, fit_epoch_points, fit_warmup, steps_per_epoch
from shitu_cli.train.det_export import (
    EXPORT_DIR, MODEL_SECTIONS, best_weights, export_detector, load_trained_model, write_model_sections,
)
from shitu_cli.train.image_check import SkippedImage
from shitu_cli.train.loop import EpochSummary
from shitu_cli.train.stop import Interrupted, StopRequest, StopTraining

# The library surface; compress, demo and tests import these names from here.
__all__ = ["train_det", "TrainDetResult", "DetSettings", "DetDataset", "DEFAULT_RECIPE", "PPDET_CONFIG", "CHECKPOINTS",
           "EXPORT_DIR", "MODEL_SECTIONS", "recipe_names", "load_recipe", "resolve_settings", "prepare_dataset",
           "read_coco", "coco_image_dir", "build_ppdet_config", "load_ppdet_config", "ppdet_chatter_to",
           "best_weights", "load_trained_model", "export_detector", "write_model_sections"]

TRAIN_LOG = "train.log"
STATE_FILE = "train_state.yaml"
# Settings a --resume may change: how long to train, and how the data is fed.
RESUME_FREE = ("epochs", "workers", "eval_batch_size")


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
    stopped_by: str | None = None  # SIGINT / SIGTERM when a signal ended training early
    epochs_done: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)  # listed images that could not be read, left out
    per_class: dict[str, dict[str, float]] | None = None  # the best epoch's AP / AP50 per class (det_metrics)
    warmup: dict[str, Any] | None = None  # the warm-up trained with, and whether it was cut to fit the run (det_schedule)
    epoch_switches: list[dict[str, Any]] | None = None  # mixup / static-assigner epochs, scaled to a short run or not


# ---------------------------------------------------------------- training


def _progress_callback(trainer, on_step, history: list[dict[str, float]], state: dict[str, Any], run_dir: Path,
                       stop: StopRequest | None = None):
    """A ppdet Callback that reports each step and each finished epoch, records per-epoch loss and mAP, and keeps `last.*`."""
    from ppdet.engine.callbacks import Callback

    world = distributed.current_world()

    class Progress(Callback):
        def __init__(self):
            super().__init__(trainer)
            self.losses: list[float] = []
            self.started, self.train_seconds, self.images = time.perf_counter(), 0.0, 0

        def on_step_end(self, status):
            if status.get("mode") != "train":
                return
            if distributed.agree_stop(stop, world):  # every rank leaves at the same step
                raise StopTraining  # leaves ppdet's loop; a part-trained epoch is dropped
            if not world.is_main:
                return  # ppdet keeps the training stats on rank 0 only
            stats = status["training_staus"].get()
            loss = float(stats.get("loss", 0.0))
            self.losses.append(loss)
            if on_step is not None:
                on_step(advance=1, epoch=status["epoch_id"] + 1, loss=round(loss, 4), lr=float(status["learning_rate"]))

        def on_epoch_end(self, status):
            if not world.is_main:  # rank 0 alone keeps the history, checkpoints and metrics
                return
            epoch = status["epoch_id"] + 1
            if status.get("mode") == "train":
                history.append({"epoch": epoch, "lr": float(status["learning_rate"]),
                                "loss": float(np.mean(self.losses)) if self.losses else float("nan")})
                self.train_seconds = time.perf_counter() - self.started
                self.images = len(self.losses) * int(trainer.cfg.TrainReader["batch_size"]) * world.size  # ppdet's is per rank
                self.losses = []
                keep_last(trainer, run_dir / CHECKPOINTS, epoch, trainer.cfg.epoch)
            elif status.get("mode") == "eval" and trainer._metrics:
                stats = trainer._metrics[0].get_results().get("bbox", [])
                row = history[-1]
                row["mAP"], row["mAP50"] = (float(stats[0]), float(stats[1])) if len(stats) > 1 else (0.0, 0.0)
                if state["best_map"] is None or row["mAP"] >= state["best_map"]:
                    state.update(best_map=row["mAP"], best_map50=row["mAP50"], best_epoch=epoch,
                                 per_class=class_aps(run_dir / "data" / "val.json", run_dir / "eval" / "bbox.json"))
                # ppdet writes no bbox.json when nothing is detected: a later evaluation must not read this one
                (run_dir / "eval" / "bbox.json").unlink(missing_ok=True)
            evaluated_next = status.get("mode") == "train" and _evaluates(trainer, epoch)
            if status.get("mode") == "eval" or epoch % trainer.cfg.snapshot_epoch:
                _save_progress(run_dir, history, state)
            if not evaluated_next:  # one line per epoch, after its evaluation when it has one
                self._report(history[-1])

        def _report(self, row: dict[str, float]) -> None:
            seconds = time.perf_counter() - self.started
            self.started = time.perf_counter()
            if on_step is not None:
                on_step(advance=0, epoch_end=EpochSummary(
                    epoch=int(row["epoch"]), epochs=int(trainer.cfg.epoch), loss=row["loss"],
                    metrics={k: v for k, v in row.items() if k in ("mAP", "mAP50")},
                    images_per_second=self.images / max(self.train_seconds, 1e-9), seconds=seconds,
                    eta_seconds=seconds * (int(trainer.cfg.epoch) - int(row["epoch"]))))

    return Progress()


def _evaluates(trainer, epoch: int) -> bool:
    """Whether ppdet's Trainer.train(validate=True) evaluates after this (1-based) epoch."""
    return epoch % trainer.cfg.snapshot_epoch == 0 or epoch == trainer.end_epoch


def _save_progress(run_dir: Path, history: list[dict[str, float]], state: dict[str, Any]) -> None:
    from shitu_cli.train.loop import write_metrics

    write_metrics(run_dir, history)
    write_yaml(run_dir / CHECKPOINTS / STATE_FILE, {**state, "history": history})


def _seed(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed % (2**32))
    paddle.seed(seed)


def train_det(dataset: Path | str | None, out: Path | str, recipe: str | Path | dict[str, Any] | None = None,
              settings: dict[str, Any] | None = None, merge_classes: bool | None = None, resume: bool = False,
              on_step: Callable[..., None] | None = None, on_total: Callable[[int], None] | None = None,
              on_note: Callable[[str], None] | None = None) -> TrainDetResult:
    """Train a PicoDet mainbody detector on `dataset` into `out` and export its best checkpoint.

    With `resume` the run's recipe.yaml supplies dataset, recipe, class merging and settings; a
    requested one that differs is refused by name (epochs may change). Ctrl-C or SIGTERM stop after
    the current step and the best epoch so far is exported. `on_note` hears a warning worth a line
    before training starts (a recipe warm-up cut to fit a short run).
    """
    from shitu_cli.train.stop import stop_on_signals

    with stop_on_signals() as stop:
        return _train_det(dataset, out, recipe, settings, merge_classes, resume, on_step, on_total, on_note, stop)


def _train_det(dataset, out, recipe, settings, merge_classes, resume, on_step, on_total, on_note,
               stop: StopRequest) -> TrainDetResult:
    from shitu_cli.train.run_dir import check_run_dir

    started = time.perf_counter()
    run_dir = check_run_dir(out, resume, "train-det")
    flags = {k: v for k, v in (settings or {}).items() if v is not None}
    warmup = switches = None  # rank 0 fits them to the run; the other ranks read them from ppdet.yml
    if resume:
        dataset, name, document, merge_classes, resolved, warmup, switches = _resumed(
            run_dir, dataset, recipe, flags, merge_classes)
    elif dataset is None:
        raise BadInput("no DATASET given", hint="pass the dataset folder (or --resume an earlier run)")
    else:
        name, document = load_recipe(recipe if recipe is not None else DEFAULT_RECIPE)
        resolved = resolve_settings(document, flags)
        merge_classes = bool(merge_classes)
        if resolved.pretrained and not Path(resolved.pretrained).with_suffix(".pdparams").is_file():
            from shitu_cli.models.registry import resolve_weights

            resolved.pretrained = str(resolve_weights(resolved.pretrained))  # a weights name, or a clear error
    world, data = distributed.start(), None  # the dataset is rank 0's business: the others only train
    with distributed.main_first(world):  # rank 0 converts the dataset and writes ppdet.yml; the others read them
        if world.is_main:
            # Absolute paths in ppdet.yml: ppdet reads them from any cwd, and run_config_hash can take the run dir out.
            data = prepare_dataset(Path(dataset), run_dir.resolve() / "data", merge_classes)
            if not resume:  # a resumed run keeps the warm-up its recipe.yaml recorded
                warmup = _fit_warmup(resolved, data, "warmup_steps" in flags, on_note)
                switches = _fit_epoch_switches(resolved, document, set(flags), on_note)
            atomic_write_text(run_dir / PPDET_CONFIG,
                              dump_yaml(build_ppdet_config(document, resolved, data, run_dir.resolve())))
    document = {**document, "name": name, "shitu": asdict(resolved)}
    _write_run_recipe(run_dir, dataset, document, merge_classes, data, None, warmup, switches)  # so a killed run can be resumed

    history, state = [], {"best_map": None, "best_map50": None, "best_epoch": None, "per_class": None}
    with ppdet_output_to(run_dir / TRAIN_LOG):
        _train(run_dir, resolved, resume, history, state, on_step, on_total, stop)
        if not world.is_main:
            return None  # rank 0 alone exports and records the run
        _exportable_or_interrupted(run_dir, stop)
        export_dir = export_detector(run_dir, name)
    _save_progress(run_dir, history, state)

    result = TrainDetResult(run_dir, export_dir, name, data.labels, state["best_map"], state["best_map50"],
                            state["best_epoch"], trained_epochs(resolved), data.train_images, data.val_images,
                            round(time.perf_counter() - started, 2), history,
                            stopped_by=stop.signal_name if stop else None, epochs_done=len(history),
                            skipped=data.skipped, per_class=state["per_class"], warmup=warmup, epoch_switches=switches)
    _write_run_recipe(run_dir, dataset, document, merge_classes, data, result, warmup, switches)
    return result


def _resumed(run_dir: Path, dataset, recipe, flags: dict[str, Any], merge_classes: bool | None):
    """(dataset, recipe name, document, merge_classes, settings) of the run in `run_dir`, from its recipe.yaml."""
    from shitu_cli.train.run_dir import changed_settings, refuse_changes, same_path, saved_recipe

    options = saved_recipe(run_dir, "train-det").options
    name, document = load_recipe(options["recipe"])
    saved = document.get("shitu") or {}
    changed = changed_settings(saved, flags, RESUME_FREE, _comparable)
    if recipe is not None and load_recipe(recipe)[0] != name:
        changed.insert(0, f"recipe {name!r} -> {load_recipe(recipe)[0]!r}")
    if merge_classes is not None and bool(merge_classes) != bool(options.get("merge_classes")):
        changed.insert(0, f"merge_classes {bool(options.get('merge_classes'))} -> {bool(merge_classes)}")
    if dataset is not None and not same_path(dataset, options.get("dataset")):
        changed.insert(0, f"dataset {options.get('dataset')!r} -> {str(dataset)!r}")
    refuse_changes(changed, run_dir)
    resolved = resolve_settings(document, {k: v for k, v in flags.items() if k in RESUME_FREE})
    inputs = saved_recipe(run_dir, "train-det").inputs
    return (Path(options["dataset"]), name, document, bool(options.get("merge_classes")), resolved, inputs.get("warmup"),
            inputs.get("epoch_switches"))


def _fit_warmup(settings: DetSettings, data: DetDataset, explicit: bool, on_note) -> dict[str, Any]:
    """Cut a recipe warm-up longer than the run allows (det_schedule), say so, and return what to record."""
    plan = fit_warmup(settings, steps_per_epoch(data.train_json, settings.batch_size), trained_epochs(settings), explicit)
    if on_note is not None and plan.note():
        on_note(plan.note())
    return asdict(plan)


def _fit_epoch_switches(settings: DetSettings, document: dict[str, Any], flags: set[str], on_note) -> list[dict[str, Any]]:
    """Scale the recipe's mixup / static-assigner epochs to a run shorter than its schedule (det_schedule), say so,
    and return what to record; the flags that set one keep it as given."""
    switches = epoch_switches(family_of(document), settings, document)
    points = fit_epoch_points(settings, switches, trained_epochs(settings), recipe_epochs(document), flags)
    if on_note is not None and epoch_points_note(points):
        on_note(epoch_points_note(points))
    return [asdict(p) for p in points]


def _comparable(key: str, value: Any) -> Any:
    if key == "pretrained" and value:
        return str(Path(value).with_suffix("").resolve())
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _exportable_or_interrupted(run_dir: Path, stop: StopRequest) -> None:
    """A run stopped before its first checkpoint has nothing to export: say so, with the signal's exit code."""
    if stop:
        try:
            best_weights(run_dir)
        except BadInput:
            raise Interrupted(stop, "before the first epoch ended: nothing to export", path=run_dir) from None


def _write_run_recipe(run_dir: Path, dataset, document: dict[str, Any], merge_classes: bool, data: DetDataset,
                      result: TrainDetResult | None, warmup: dict[str, Any] | None,
                      switches: list[dict[str, Any]] | None = None) -> None:
    """recipe.yaml: at the start (no result: settings only, what --resume reads), and again at the end."""
    from shitu_cli.recipes import Recipe, write_recipe

    world = distributed.current_world()
    if not world.is_main:
        return
    metrics: dict[str, Any] = {"status": "training"}
    written: list[Path] = []
    if result is not None:
        metrics = {"best_map": result.best_map, "best_map50": result.best_map50, "best_epoch": result.best_epoch,
                   "per_class": result.per_class,
                   "epochs_done": result.epochs_done}
        if result.stopped_by:
            metrics["stopped_by"] = result.stopped_by
        # ppdet.yml names the run dir, so it is not an output a replay elsewhere can match (shitu.yaml hashes it portably).
        written = [run_dir / "metrics.csv"] + sorted(p for p in result.export_dir.iterdir() if p.is_file())
    write_recipe(run_dir, Recipe(
        command="train-det", core="shitu_cli.train.det:train_det", seed=document["shitu"]["seed"],
        options={"dataset": str(Path(dataset).resolve()), "out": str(Path(run_dir).resolve()), "recipe": document,
                 "merge_classes": merge_classes},
        inputs={"dataset": str(Path(dataset).resolve()), "format": data.kind, "recipe": document["name"],
                "sha256": data.checksums, "train_images": data.train_images, "val_images": data.val_images,
                "skipped_images": [{"path": s.path, "reason": s.reason} for s in data.skipped],
                "distributed": distributed.describe(world, document["shitu"]["batch_size"]), "warmup": warmup,
                "epoch_switches": switches},
        metrics=metrics,
    ), [p for p in written if p.is_file()])


def _scale_out(cfg, world) -> None:
    """ppdet's reader batch is per process (its DistributedBatchSampler shards the data by rank), so the
    recipe's global batch is split over the ranks; ppdet.yml says use_gpu False so that the file is the
    same on any machine, and training takes the GPU when there is one (with sync BN over several)."""
    batch = int(cfg.TrainReader["batch_size"])
    distributed.check_divisible(batch, world, f"a batch of {batch} images",
                                hint=f"use a --batch-size that is a multiple of {world.size}")
    cfg.TrainReader["batch_size"] = batch // world.size
    cfg.use_gpu = distributed.gpu_available()
    if distributed.uses_sync_batch_norm(world):
        cfg.norm_type = "sync_bn"


def _train(run_dir: Path, settings: DetSettings, resume: bool, history: list, state: dict, on_step, on_total,
           stop: StopRequest | None = None) -> None:
    from ppdet.engine import Trainer

    from shitu_cli.models import ppdet_compat

    ppdet_compat.apply()
    world = distributed.start()  # the GPU on a CUDA build (the launcher's one under --nproc), else the CPU
    _seed(settings.seed)
    cfg = load_ppdet_config(run_dir / PPDET_CONFIG)
    _scale_out(cfg, world)
    trainer = Trainer(cfg, mode="train")
    if len(trainer.loader) < 1:
        raise BadInput(f"batch size {settings.batch_size} is larger than the {len(trainer.dataset)} usable training images",
                       hint="lower --batch-size")
    checkpoints = run_dir / CHECKPOINTS
    if resume:
        resume_weights(trainer, checkpoints)
        saved = read_yaml(checkpoints / STATE_FILE) if (checkpoints / STATE_FILE).is_file() else {}
        history.extend(saved.get("history", [])[: trainer.start_epoch])
        state.update({k: saved.get(k) for k in state})
        restore_best(trainer, state)
    elif settings.pretrained:
        load_pretrained(trainer, Path(settings.pretrained).with_suffix(".pdparams"))
    trainer.register_callbacks([_progress_callback(trainer, on_step, history, state, run_dir, stop)])
    if on_total is not None:
        on_total(max(0, len(trainer.loader) * (trained_epochs(settings) - trainer.start_epoch)))
    try:
        trainer.train(validate=True)
    except StopTraining:
        return  # the last finished epoch's checkpoint and the best one so far stay as they are
    except (ValueError, RuntimeError, MemoryError) as exc:
        raise WorkFailed(f"training failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})",
                         path=run_dir / TRAIN_LOG) from exc
