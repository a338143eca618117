"""`compress`: make a trained model smaller/faster, measure it against the original, and write it only
if its quality held (or `force`). The library twin of `shitu compress`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu_cli.compress.candidate import Candidate, Stage, predictor_options
from shitu_cli.compress.images import ImageSet, Skipped, iter_batches, load_image_set, readable_count
from shitu_cli.compress.source import SourceModel, resolve_source
from shitu_cli.errors import BadInput
from shitu_cli.models.manifest import MODEL_MANIFEST, ModelManifest, write_model_manifest

CORE = "shitu_cli.compress.pipeline:compress"
QUANT_METHODS = ("ptq", "qat", "none")
# Fine-tuning learning rates when --lr is not given: QAT only nudges trained weights towards INT8-friendly
# values (0.02 drifted the tiny test classifier away from the original), pruning has to repair damage.
DEFAULT_LR = {"qat": 0.002, "prune": 0.02}

@dataclass
class ModelStats:
    model_dir: Path
    precision: str
    backend: str
    method: str | None
    size_bytes: int
    latency_ms_p50: float
    agreement: dict[str, float]  # agreement with the original (1.0 for the original itself)
    metric: dict[str, float]  # the real metric on --eval images, when they carry labels

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6


@dataclass
class CompressResult:
    source: Path
    out: Path
    task: str
    method: str
    threads: int
    before: ModelStats
    after: ModelStats
    quality_basis: str  # what the drop is measured on, in words
    quality_drop: float  # points (percent) lost on that basis; negative is a gain
    max_drop: float
    written: bool
    refused: str | None  # why the model was not written
    notes: list[str] = field(default_factory=list)
    calib_images: int = 0
    eval_images: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    recipe: Path | None = None
    algo_choice: dict[str, Any] | None = None  # what --algo auto tried, scored and picked (choose.AlgoChoice.record)

    @property
    def speedup(self) -> float:
        return self.before.latency_ms_p50 / max(self.after.latency_ms_p50, 1e-9)


def compress(
    model: Path | str,
    calib: Path | str,
    out: Path | str,
    eval_list: Path | str | None = None,
    quant: str | None = None,
    algo: str = "auto",
    prune: float | None = None,
    onnx_int8: bool = False,
    threads: int = 1,
    max_drop: float = 1.0,
    force: bool = False,
    calib_size: int = 64,
    batch_size: int = 8,
    runs: int = 30,
    epochs: int = 10,
    lr: float | None = None,
    seed: int = 42,
    teacher: Path | str | None = None,
    on_stage: Stage | None = None,
) -> CompressResult:
    """Compress `model` (a run dir or exported model dir) into `out`; see `shitu compress --help`."""
    options = {k: v for k, v in locals().items() if k != "on_stage"}
    stage = on_stage or (lambda name: None)
    source = resolve_source(model)
    out = Path(out)
    quant = _check_options(source, out, quant, algo, prune, onnx_int8, threads, calib_size, batch_size)
    if teacher is not None:
        _check_teacher_options(source, teacher, prune)
    if lr is None:
        lr = options["lr"] = DEFAULT_LR["qat" if quant == "qat" else "prune"]  # the recipe records the rate used
    calib_set = load_image_set(calib, "calibration set").subset(calib_size)
    eval_set = load_image_set(eval_list, "evaluation list") if eval_list else calib_set
    work = Path(tempfile.mkdtemp(prefix="shitu-compress-"))
    try:
        candidate = _make_candidate(source, calib_set, work, quant, algo, prune, onnx_int8, batch_size,
                                    epochs, lr, seed, stage, teacher)
        stage("measuring the original")
        before, reference = _measure(source.model_dir, source.manifest, source.manifest, eval_set, None, threads, batch_size, runs)
        stage("measuring the compressed model")
        after, _ = _measure(candidate.model_dir, candidate.manifest, source.manifest, eval_set, reference, threads, batch_size, runs)
        result = _judge(source, out, candidate, before, after, eval_list is not None, threads, max_drop, force)
        if after.backend != before.backend:
            stage(f"timing the original on {after.backend} too")
            result.notes.append(_same_backend_note(source, eval_set, after, threads, batch_size, runs))
        # --algo auto calibrates on a part of the images and scores on the rest
        result.calib_images = candidate.algo_choice.calib_images if candidate.algo_choice else readable_count(calib_set)
        result.algo_choice = candidate.algo_choice.record() if candidate.algo_choice else None
        result.eval_images = readable_count(eval_set)
        result.skipped = _unique_skips(calib_set, eval_set)
        if result.written:
            result.recipe = _write_output(out, candidate, options, result)
            result.after.model_dir = out
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_options(source: SourceModel, out: Path, quant: str | None, algo: str, prune: float | None,
                   onnx_int8: bool, threads: int, calib_size: int, batch_size: int) -> str:
    from shitu_cli.compress.choose import check_algo_choice

    if quant is None:
        quant = "none" if (prune is not None or onnx_int8) else "ptq"
    if quant not in QUANT_METHODS:
        raise BadInput(f"unknown --quant {quant!r}", hint=f"choose one of: {', '.join(QUANT_METHODS)}")
    check_algo_choice(algo)
    if source.task == "det":
        _check_det_method(quant, source.model_dir)
    if quant == "qat" and prune is not None:
        # Pruning already fine-tunes with distillation; a second fine-tune on top is not built.
        raise BadInput("--quant qat cannot follow --prune", hint="use --prune R --quant ptq, or --quant qat alone")
    if onnx_int8 and (quant != "none" or prune is not None):
        raise BadInput("--onnx-int8 is a method of its own", hint="drop --quant/--prune, or drop --onnx-int8")
    if prune is not None and not 0 < prune < 1:
        raise BadInput(f"--prune must be a ratio in (0, 1), got {prune}", hint="e.g. --prune 0.3 removes 30% of filters")
    if quant == "none" and prune is None and not onnx_int8:
        raise BadInput("nothing to do: --quant none without --prune or --onnx-int8", hint="pick a method")
    for name, value in (("--threads", threads), ("--calib-size", calib_size), ("--batch-size", batch_size)):
        if value < 1:
            raise BadInput(f"{name} must be at least 1, got {value}")
    if out.resolve() in (source.model_dir.resolve(), *( [source.run_dir.resolve()] if source.run_dir else [])):
        raise BadInput("the output would overwrite the model being compressed", hint="pass another -o folder", path=out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MODEL_MANIFEST).is_file())):
        raise BadInput("output exists and is not a model dir; refusing to replace it", hint="pass a new or model folder", path=out)
    return quant


def _check_teacher_options(source: SourceModel, teacher: Path | str, prune: float | None) -> None:
    """--teacher is the fine-tuning teacher of a pruned detector; refuse it anywhere else, and a bad teacher by name."""
    from shitu_cli.compress.det_teacher import check_teacher

    if source.task != "det":
        raise BadInput(f"--teacher is built for detectors; this is a {source.task} model",
                       hint="train-cls / train-rec --teacher distil cls and rec models", path=source.model_dir)
    if prune is None:
        raise BadInput("--teacher needs --prune: it teaches the pruned detector while it is fine-tuned",
                       hint="add --prune R (e.g. 0.3)")
    check_teacher(teacher, source)


def _check_det_method(quant: str, model_dir: Path) -> None:
    """Detectors get PTQ (Paddle or ONNX) and pruning; say why QAT is not there rather than fail inside it."""
    if quant == "qat":
        raise BadInput("--quant qat is built for cls and rec models, not for detectors yet",
                       hint="use the default --quant ptq, --prune R, or --onnx-int8 for a detector", path=model_dir)


def _make_candidate(source: SourceModel, calib_set: ImageSet, work: Path, quant: str, algo: str,
                    prune: float | None, onnx_int8: bool, batch_size: int, epochs: int, lr: float, seed: int,
                    stage: Stage, teacher: Path | str | None = None) -> Candidate:
    from shitu_cli.compress import methods

    if source.task == "det" and not onnx_int8:
        from shitu_cli.compress.det import detector_prune, detector_ptq

        base = None
        if prune is not None and teacher is not None:
            from shitu_cli.compress.det_teacher import detector_prune_from_teacher

            base = detector_prune_from_teacher(source, teacher, calib_set, work, prune, epochs, lr, seed, batch_size, stage)
        elif prune is not None:
            base = detector_prune(source, calib_set, work, prune, epochs, lr, seed, batch_size, stage)
        return detector_ptq(source, calib_set, work, algo, stage, base=base) if quant == "ptq" else base
    if onnx_int8:
        return methods.onnx_int8(source, calib_set, work, batch_size, stage)
    base = None
    if prune is not None:
        base = methods.prune_and_distill(source, calib_set, work, prune, epochs, lr, seed, batch_size, stage)
    if quant == "ptq":
        return methods.ptq(source, calib_set, work, algo, batch_size, stage, base=base)
    if quant == "qat":
        return methods.qat(source, calib_set, work, algo, epochs, lr, seed, batch_size, stage)
    return base


def _measure(model_dir: Path, manifest: ModelManifest, original: ModelManifest, eval_set: ImageSet,
             reference: Any, threads: int, batch_size: int, runs: int) -> tuple[ModelStats, Any]:
    """Stats of one model; agreement is against `reference` (the original's outputs on the same images)."""
    from shitu_cli.compress.measure import latency_p50_ms, model_size_bytes

    if manifest.task == "det":
        predictor, values, sample, metric, agreed = _run_detector(model_dir, manifest, original, eval_set, reference, threads)
    else:
        predictor, values, sample, metric, agreed = _run_net(model_dir, manifest, original, eval_set, reference, threads, batch_size)
    latency = latency_p50_ms(predictor, sample, runs)
    stats = ModelStats(Path(model_dir), manifest.precision, predictor.backend, manifest.method, model_size_bytes(model_dir, manifest),
                       latency, agreed, dict([metric]) if metric else {})
    return stats, values


def _run_net(model_dir, manifest, original, eval_set, reference, threads, batch_size):
    """cls/rec: outputs on the eval set, a batch-1 sample for timing, the metric and the agreement."""
    from shitu_cli.compress.measure import agreement, run_outputs, task_metric
    from shitu_cli.infer.predictor import build_predictor

    predictor = build_predictor(model_dir, predictor_options(manifest, threads))
    outputs = run_outputs(predictor, eval_set, manifest, batch_size)
    if len(outputs.values) == 0:
        raise BadInput("no readable image to measure on", hint="check the --calib / --eval images", path=eval_set.source)
    sample = next(iter_batches(ImageSet(eval_set.source, eval_set.samples[:batch_size]), manifest, 1))[0]
    metric = task_metric(manifest.task, outputs, list(original.labels))
    agreed = {"agreement": 1.0} if reference is None else agreement(manifest.task, reference, outputs.values, outputs.labels)
    return predictor, outputs.values, sample, metric, agreed


def _run_detector(model_dir, manifest, original, eval_set, reference, threads):
    """det: boxes per eval image (as the Detector preprocesses), the first image's feeds, mAP and box agreement."""
    from shitu_cli.compress.measure import box_agreement, detect_all, detection_map
    from shitu_cli.infer.detector import Detector

    detector = Detector(model_dir, predictor_options(manifest, threads))
    found, sample = detect_all(detector, eval_set)
    if sample is None:
        raise BadInput("no readable image to measure on", hint="check the --calib / --eval images", path=eval_set.source)
    agreed = {"agreement": 1.0} if reference is None else box_agreement(reference, found.per_image)
    return detector.predictor, found.per_image, sample, detection_map(found, list(original.labels)), agreed


def _same_backend_note(source: SourceModel, eval_set: ImageSet, after: ModelStats, threads: int, batch_size: int,
                       runs: int) -> str:
    """The original's latency on the compressed model's backend: what the precision alone changed."""
    manifest = dataclasses.replace(source.manifest, extra={**source.manifest.extra, "backend": after.backend})
    first = ImageSet(eval_set.source, eval_set.samples[:batch_size])
    original_ms = _measure(source.model_dir, manifest, source.manifest, first, None, threads, batch_size, runs)[0].latency_ms_p50
    ratio = original_ms / max(after.latency_ms_p50, 1e-9)
    verdict = f"{ratio:.2f}x faster" if ratio > 1 else "NOT faster"
    return (f"on {after.backend} itself the original takes {original_ms:.2f} ms p50: the {after.precision} model is "
            f"{verdict} than the original on the same backend")


def _judge(source: SourceModel, out: Path, candidate: Candidate, before: ModelStats, after: ModelStats,
           has_eval: bool, threads: int, max_drop: float, force: bool) -> CompressResult:
    metric = next(iter(before.metric), None)
    if has_eval and metric is not None and metric in after.metric:
        basis = f"{metric} on the --eval images"
        drop = 100.0 * (before.metric[metric] - after.metric[metric])
    else:
        basis = {"cls": "top-1 agreement with the original", "rec": "nearest-neighbour agreement with the original",
                 "det": "box agreement with the original"}[source.task]
        drop = 100.0 * (1.0 - after.agreement["agreement"])
    refused = None
    if drop > max_drop and not force:
        refused = f"quality dropped {drop:.2f} points ({basis}), more than --max-drop {max_drop:g}"
    notes = []
    if after.latency_ms_p50 >= before.latency_ms_p50:
        notes.append(
            f"the compressed model is NOT faster here: {after.latency_ms_p50:.2f} ms vs {before.latency_ms_p50:.2f} ms "
            f"p50 at {threads} thread(s)"
            + (" (INT8 on CPU pays off only where oneDNN has fast INT8 kernels for these layer sizes)"
               if after.precision == "int8" else "")
        )
    if after.backend != before.backend:
        notes.append(f"the original ran on {before.backend}, the compressed model on {after.backend}: "
                     "the latency change is the backend's as much as the precision's")
    if drop > max_drop and force:
        notes.append(f"written despite a {drop:.2f}-point drop because of --force")
    return CompressResult(source.model_dir, out, source.task, candidate.method, threads, before, after, basis,
                          drop, max_drop, written=refused is None, refused=refused, notes=notes)


def _unique_skips(*sets: ImageSet) -> list[Skipped]:
    seen: dict[str, Skipped] = {}
    for image_set in sets:
        for skip in image_set.skipped:
            seen.setdefault(skip.path, skip)
    return list(seen.values())


def _write_output(out: Path, candidate: Candidate, options: dict[str, Any], result: CompressResult) -> Path:
    """Copy the staged model into `out` atomically, with its manifest and recipe.yaml."""
    from shitu_cli.models.export import atomic_dir
    from shitu_cli.recipes import Recipe, write_recipe

    manifest = candidate.manifest
    manifest.extra = {**manifest.extra, "compress": {**candidate.details, "quality_basis": result.quality_basis,
                                                      "quality_drop_points": round(result.quality_drop, 4)}}
    with atomic_dir(out) as staging:
        names = [manifest.model_file, manifest.params_file]
        if (candidate.model_dir / str(manifest.extra.get("infer_cfg", ""))).is_file():
            names.append(str(manifest.extra["infer_cfg"]))  # a detector's preprocessing, as ppdet exported it
        for name in dict.fromkeys(names):
            shutil.copy2(candidate.model_dir / name, staging / name)
        write_model_manifest(staging, manifest)
        written = [staging / name for name in dict.fromkeys(names)] + [staging / MODEL_MANIFEST]
        recipe = Recipe(
            command="compress",
            core=CORE,
            options={k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
            seed=options.get("seed"),
            metrics=_recipe_metrics(result),
        )
        write_recipe(staging, recipe, written)
    return out / "recipe.yaml"


def _recipe_metrics(result: CompressResult) -> dict[str, Any]:
    def stats(s: ModelStats) -> dict[str, Any]:
        return {"size_bytes": s.size_bytes, "latency_ms_p50": round(s.latency_ms_p50, 4), **s.agreement, **s.metric}

    metrics = {"before": stats(result.before), "after": stats(result.after), "threads": result.threads,
               "quality_drop_points": round(result.quality_drop, 4)}
    if result.algo_choice:
        metrics["algo_choice"] = result.algo_choice
    return metrics
