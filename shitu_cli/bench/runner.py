"""Run the PP-ShiTu stages over real image files for every setting of a sweep, and summarise them.

A setting is one backend x threads x oneDNN x precision x batch. Images and every setting's
models are loaded and warmed up before the clock starts; then the settings take turns, one
pass over all images each (A B C A B C ...), so a change in machine load hits all of them.
Each stage's milliseconds per image are kept for percentiles, and the passes' medians for a spread.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shitu_cli.bench.compare import compare
from shitu_cli.bench.inputs import index_model, load_images, load_models
from shitu_cli.bench.log import backend_timings, log_rows
from shitu_cli.bench.stages import END_TO_END, OK, Setting, SettingRun, batches, with_threads
from shitu_cli.bench.system import SystemInfo, system_info
from shitu_cli.bench.timing import StageStats, StageTimer
from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.infer.predictor import BACKENDS, PRECISIONS, backend_installed
from shitu_cli.models.manifest import ModelManifest

STAGE_ORDER = (
    "decode", "det preprocess", "det inference", "det postprocess", "crop + rec preprocess", "rec inference",
    "search", "cls preprocess", "cls inference", "end to end",
)


@dataclass
class BenchModel:
    task: str
    path: Path
    arch: str
    precision: str
    model_hash: str | None
    input_size: tuple[int, int]


@dataclass
class SettingResult:
    setting: str
    backend: str
    threads: int
    mkldnn: bool | None
    precision: str
    batch: int
    status: str  # "ok", "failed: <reason>", "not installed", "skipped: <reason>"
    size_mb: float | None = None
    ms_p50: float | None = None
    ms_p90: float | None = None
    ms_p99: float | None = None
    ms_spread: float | None = None  # half the range of the passes' end-to-end medians (the settings took turns)
    fps: float | None = None
    speedup: float | None = None  # first row's p50 / this row's p50
    fastest: bool = False
    agreement: dict[str, float] = field(default_factory=dict)  # e.g. {"rec cosine": 0.9999, "cls top-1": 1.0}
    stages: list[StageStats] = field(default_factory=list)
    load_s: float | None = None


@dataclass
class BenchReport:
    system: SystemInfo
    models: list[BenchModel]
    images: int
    image_dir: str
    skipped_images: list[str]
    boxes_per_image: dict[int, int]  # number of boxes -> number of images (det runs only)
    warmup: int
    runs: int
    results: list[SettingResult]
    reference: str | None  # the setting whose outputs the agreement column compares with
    log_path: Path | None = None
    record_path: Path | None = None
    notes: list[str] = field(default_factory=list)  # what a reader of the numbers should know (oversubscribed threads)
    pipeline: dict[str, Any] = field(default_factory=dict)  # predict's thresholds the det and rec stages used


@dataclass
class BenchOptions:
    backends: Sequence[str] = ("paddle",)
    threads: Sequence[int] = (1,)
    mkldnn: Sequence[bool] = (True,)
    precisions: Sequence[str] = ("fp32",)
    batch: int = 1
    warmup: int = 3
    runs: int = 5


def expand_settings(options: BenchOptions) -> list[Setting]:
    """The sweep, Paddle (the reference) first; oneDNN on/off multiplies Paddle rows only."""
    settings = []
    for backend, precision in itertools.product(options.backends, options.precisions):
        switches = list(dict.fromkeys(options.mkldnn)) if backend == "paddle" else [None]
        for mkldnn, threads in itertools.product(switches, options.threads):
            settings.append(Setting(backend, int(threads), mkldnn, precision, options.batch))
    return settings


def check_options(options: BenchOptions) -> None:
    for backend in options.backends:
        if backend not in BACKENDS:
            raise BadInput(f"unknown backend {backend!r}", hint=f"choose from {', '.join(BACKENDS)} or all")
    for precision in options.precisions:
        if precision not in PRECISIONS:
            raise BadInput(f"unknown precision {precision!r}", hint=f"choose from {', '.join(PRECISIONS)} or all")
    if not options.threads or any(int(t) < 1 for t in options.threads):
        raise BadInput("--threads needs positive thread counts", hint="e.g. --threads 1,2,4")
    if options.batch < 1 or options.runs < 1 or options.warmup < 0:
        raise BadInput("--batch and --runs must be at least 1, --warmup at least 0")


# ---- inputs: models and images, loaded and checked before anything is timed


# ---- the settings take turns: A B C A B C ..., so machine load hits them alike


@dataclass
class Contender:
    """One setting during the benchmark: its result row, its loaded models (None once it failed) and its clock."""

    result: SettingResult
    run: SettingRun | None = None
    timer: StageTimer = field(default_factory=StageTimer)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    seconds: float = 0.0
    passes: int = 0


def prepare(setting: Setting, dirs: dict[str, Path], int8_dirs: dict[str, Path], paths: Sequence[Path], warmup: int,
            index_dir: Path | None = None) -> Contender:
    """Load a setting's models and warm them up (untimed); a setting that cannot run says why in its row."""
    result = SettingResult(setting.label, setting.backend, setting.threads, setting.mkldnn, setting.precision, setting.batch, OK)
    contender = Contender(result)
    if setting.backend != "paddle" and not backend_installed(setting.backend):
        result.status = "not installed"
        return contender
    if setting.precision == "int8" and not int8_dirs:
        result.status = "skipped: no int8 model (make one with `shitu compress`, pass it with --int8)"
        return contender
    try:
        started = time.perf_counter()
        run = SettingRun(setting, dirs, int8_dirs, index_dir)
        result.load_s = time.perf_counter() - started
        result.size_mb = run.size_mb()
        chunks = batches(paths, setting.batch)
        for batch in itertools.islice(itertools.cycle(chunks), warmup):
            with_threads(setting.threads, lambda: run.process(batch, contender.timer))
            contender.timer.discard_batch()
    except WorkFailed as exc:
        result.status = f"failed: {exc.message}"
        return contender
    contender.run = run
    return contender


def timed_pass(contender: Contender, paths: Sequence[Path]) -> None:
    """One timed pass of a setting over every file; the first pass's outputs are kept for agreement."""
    run, timer = contender.run, contender.timer

    def one_pass() -> None:
        for batch in batches(paths, run.setting.batch):
            outputs = run.process(batch, timer)
            timer.close_batch()
            if contender.passes == 0:
                for task, values in outputs.items():
                    contender.outputs.setdefault(task, []).extend(values)

    started = time.perf_counter()
    try:
        with_threads(run.setting.threads, one_pass)
    except WorkFailed as exc:
        contender.result.status, contender.run = f"failed: {exc.message}", None
        return
    contender.seconds += time.perf_counter() - started
    contender.passes += 1
    timer.close_pass()


def finish(contender: Contender, images: int) -> tuple[SettingResult, dict[str, Any]]:
    """The row's medians, spread and FPS; outputs as compare() reads them (det: boxes per image, else one array)."""
    result = contender.result
    if result.status != OK:
        return result, {}
    result.stages = contender.timer.stats(STAGE_ORDER)
    total = next(s for s in result.stages if s.stage == END_TO_END)
    result.ms_p50, result.ms_p90, result.ms_p99, result.ms_spread = total.p50, total.p90, total.p99, total.spread
    result.fps = contender.passes * images / contender.seconds if contender.seconds > 0 else float("nan")
    outputs = {task: values if task == "det" else np.concatenate(values) for task, values in contender.outputs.items()}
    return result, outputs


def progress_steps(options: BenchOptions) -> int:
    """Steps of the progress bar: each setting's loading, then each round of passes."""
    return len(expand_settings(options)) + options.runs


# ---- the whole benchmark


def benchmark(models: dict[str, Path | None], images: Path, options: BenchOptions, int8_models: Sequence[Path] = (),
              index: Path | None = None, progress: Callable[..., None] | None = None, record: bool = True) -> BenchReport:
    """Benchmark every setting of `options` on the given models over the files in `images`.

    With `index`, rec features are searched in it (the rec model defaults to the index's own).
    """
    from shitu_cli.bench import record as records

    check_options(options)
    models = dict(models)
    if index is not None:
        models["rec"] = index_model(Path(index), models.get("rec"))
    manifests, dirs, int8_dirs = load_models(models, int8_models)
    if not dirs:
        raise BadInput("no model to benchmark", hint="pass --det, --rec and/or --cls DIR (exported model dirs)")
    paths, skipped = load_images(images)
    contenders = []
    for setting in expand_settings(options):
        contenders.append(prepare(setting, dirs, int8_dirs, paths, options.warmup, index))
        if progress:
            progress(1, setting=f"loading {setting.label}", status=contenders[-1].result.status.split(":")[0])
    for round_number in range(options.runs):
        for contender in contenders:
            if contender.run is not None:
                timed_pass(contender, paths)
        if progress:
            progress(1, setting=f"round {round_number + 1} of {options.runs}", status=OK)
    results, outputs = map(list, zip(*(finish(c, len(paths)) for c in contenders)))
    reference = compare(results, outputs)
    system = system_info()
    report = BenchReport(
        system=system, models=[_describe(t, dirs[t], manifests[t]) for t in dirs], images=len(paths),
        image_dir=str(images), skipped_images=skipped, boxes_per_image=_boxes_histogram(outputs, results, reference),
        warmup=options.warmup, runs=options.runs,
        results=results, reference=reference, notes=thread_notes(options.threads, system.usable_cpus),
        pipeline=pipeline_settings(),
    )
    if record:
        report.record_path = records.update_fastest(backend_timings(report, manifests))
        report.log_path = records.append_log(log_rows(report))
    return report


def pipeline_settings() -> dict[str, Any]:
    """The thresholds the stages run with: predict's defaults, so boxes per image are predict's."""
    from dataclasses import asdict

    from shitu_cli.infer.options import DEFAULTS

    return {key: value for key, value in asdict(DEFAULTS).items() if key in ("det_thresh", "max_boxes", "whole_image", "topk")}


def thread_notes(threads: Sequence[int], usable_cpus: int) -> list[str]:
    """A warning when a thread count exceeds the cores this process may use: the threads then take turns."""
    over = [t for t in threads if t > usable_cpus]
    if not over:
        return []
    counts = ", ".join(str(t) for t in over)
    return [f"--threads {counts} exceeds the {usable_cpus} CPU core(s) this process may use: the extra threads share "
            f"cores, so those rows measure oversubscription, not a {max(over)}-core machine"]


def _boxes_histogram(outputs: list[dict[str, Any]], results: list[SettingResult], reference: str | None) -> dict[int, int]:
    """How many images had how many boxes, as the reference setting's detector saw them."""
    chosen = next((o for o, r in zip(outputs, results) if r.setting == reference), None) or next((o for o in outputs if o), {})
    counts: dict[int, int] = {}
    for boxes in chosen.get("det", []):
        counts[len(boxes)] = counts.get(len(boxes), 0) + 1
    return dict(sorted(counts.items()))


def _describe(task: str, path: Path, manifest: ModelManifest) -> BenchModel:
    return BenchModel(task, path, manifest.arch, manifest.precision, manifest.model_hash, tuple(manifest.input_size))
