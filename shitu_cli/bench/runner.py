"""Run the PP-ShiTu stages over real image files for every setting of a sweep, and summarise them.

A setting is one backend x threads x oneDNN x precision x batch. Images and models are
loaded before the clock starts; every image then goes through every given model, stage by
stage, and each stage's milliseconds per image are kept for percentiles.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shitu_cli.bench.system import SystemInfo, system_info
from shitu_cli.bench.timing import StageStats, StageTimer
from shitu_cli.errors import BadInput, ImageReadError, WorkFailed
from shitu_cli.infer.predictor import BACKENDS, PRECISIONS, PredictorOptions, backend_installed, build_predictor
from shitu_cli.models.manifest import ModelManifest, read_model_manifest

TASK_ORDER = ("det", "rec", "cls")
STAGE_ORDER = (
    "decode", "det preprocess", "det inference", "det postprocess", "crop + rec preprocess", "rec inference",
    "search", "cls preprocess", "cls inference", "end to end",
)
END_TO_END = "end to end"
OK = "ok"


@dataclass(frozen=True)
class Setting:
    backend: str
    threads: int
    mkldnn: bool | None  # None where the backend has no such switch (onnxruntime, openvino)
    precision: str
    batch: int

    @property
    def label(self) -> str:
        parts = [self.backend, self.precision, f"{self.threads}t"]
        if self.mkldnn is not None:
            parts.append("onednn" if self.mkldnn else "no-onednn")
        if self.batch != 1:
            parts.append(f"b{self.batch}")
        return " ".join(parts)


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


@dataclass
class BenchOptions:
    backends: Sequence[str] = ("paddle",)
    threads: Sequence[int] = (1,)
    mkldnn: Sequence[bool] = (True,)
    precisions: Sequence[str] = ("fp32",)
    batch: int = 1
    warmup: int = 3
    runs: int = 3


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


def load_models(paths: dict[str, Path | None], int8_paths: Sequence[Path] = ()) -> tuple[dict[str, ModelManifest], dict[str, Path], dict[str, Path]]:
    """Manifests of the given fp32 models by task, their dirs, and the int8 twins matched by task."""
    manifests, dirs = {}, {}
    for task in TASK_ORDER:
        path = paths.get(task)
        if path is None:
            continue
        manifest = read_model_manifest(Path(path), task=task)
        if manifest.precision == "int8":
            raise BadInput(
                f"--{task} is an int8 model; agreement needs its fp32 parent",
                hint=f"pass the fp32 model as --{task} and this one as --int8", path=path,
            )
        manifests[task], dirs[task] = manifest, Path(path)
    int8_dirs = {}
    for path in int8_paths:
        manifest = read_model_manifest(Path(path))
        if manifest.precision != "int8":
            raise BadInput(f"--int8 expects an int8 model, this one is {manifest.precision}", path=path)
        if manifest.task not in dirs:
            raise BadInput(f"--int8 gives a {manifest.task} model but no fp32 --{manifest.task}", path=path)
        int8_dirs[manifest.task] = Path(path)
    return manifests, dirs, int8_dirs


def load_images(source: Path) -> tuple[list[Path], list[np.ndarray], list[str]]:
    """Decode every image once, untimed: it warms the file cache and drops files that cannot be read."""
    from shitu_cli.data.images import iter_image_files, read_image

    source = Path(source)
    if source.is_dir():
        files = list(iter_image_files(source))
    elif source.is_file():
        files = [source]
    else:
        raise BadInput("no such file or folder", path=source, hint="pass --images DIR with image files")
    paths, images, skipped = [], [], []
    for path in files:
        try:
            images.append(read_image(path))
            paths.append(path)
        except ImageReadError as exc:
            skipped.append(exc.one_line())
    if not paths:
        raise BadInput("no readable images here", path=source, hint="pass --images DIR with .jpg/.png files")
    return paths, images, skipped


# ---- one setting: build its predictors, warm up, time the passes


class SettingRun:
    """The predictors of one setting and the stage-by-stage processing of one batch of files."""

    def __init__(self, setting: Setting, dirs: dict[str, Path], int8_dirs: dict[str, Path]):
        self.setting = setting
        self.predictors = {}
        self.manifests = {}
        for task, model_dir in dirs.items():
            # An int8 setting quantizes the models that have an int8 twin; the others stay fp32.
            quantized = setting.precision == "int8" and task in int8_dirs
            precision = "fp32" if setting.precision == "int8" and not quantized else setting.precision
            options = PredictorOptions(
                backend=setting.backend, threads=setting.threads,
                mkldnn=True if setting.mkldnn is None else setting.mkldnn, precision=precision,
            )
            path = int8_dirs[task] if quantized else model_dir
            self.predictors[task] = build_predictor(path, options, task=task)
            self.manifests[task] = self.predictors[task].manifest

    def size_mb(self) -> float:
        files = [f for p in self.predictors.values() for f in p.model_files]
        return sum(Path(f).stat().st_size for f in files) / 1e6

    def process(self, paths: Sequence[Path], timer: StageTimer) -> dict[str, np.ndarray]:
        """Decode, (detect, crop,) preprocess and infer one batch of files; return each model's output."""
        from shitu_cli.data.images import read_image
        from shitu_cli.infer.preprocess import preprocess_batch

        n = len(paths)
        outputs: dict[str, np.ndarray] = {}
        with timer.stage(END_TO_END, n):
            with timer.stage("decode", n):
                images = [read_image(p) for p in paths]
            crops = images  # whole images until a detector has landed (shitu_cli.infer.detector)
            if "rec" in self.predictors:
                manifest = self.manifests["rec"]
                with timer.stage("crop + rec preprocess", n):
                    batch = preprocess_batch(crops, manifest.preprocess, tuple(manifest.input_size))
                with timer.stage("rec inference", n):
                    outputs["rec"] = self.predictors["rec"].run(batch)[0]
            if "cls" in self.predictors:
                manifest = self.manifests["cls"]
                with timer.stage("cls preprocess", n):
                    batch = preprocess_batch(images, manifest.preprocess, tuple(manifest.input_size))
                with timer.stage("cls inference", n):
                    outputs["cls"] = self.predictors["cls"].run(batch)[0]
        return outputs


def _batches(paths: Sequence[Path], size: int) -> list[list[Path]]:
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def time_setting(run: SettingRun, paths: Sequence[Path], warmup: int, runs: int) -> tuple[StageTimer, dict[str, np.ndarray], float]:
    """Warm up, then `runs` timed passes over all files; returns the timer, first-pass outputs, and QPS."""
    batches = _batches(paths, run.setting.batch)
    timer = StageTimer()
    for batch in itertools.islice(itertools.cycle(batches), warmup):
        run.process(batch, timer)
        timer.discard_batch()
    first_outputs: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    for pass_index in range(runs):
        for batch in batches:
            outputs = run.process(batch, timer)
            timer.close_batch()
            if pass_index == 0:
                for task, value in outputs.items():
                    first_outputs.setdefault(task, []).append(np.asarray(value))
    elapsed = time.perf_counter() - start
    qps = runs * len(paths) / elapsed if elapsed > 0 else float("nan")
    return timer, {task: np.concatenate(values) for task, values in first_outputs.items()}, qps


def _with_threads(threads: int, func: Callable[[], Any]) -> Any:
    """Preprocessing (OpenCV) gets the same thread budget as inference."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        return func()
    finally:
        cv2.setNumThreads(before)


def run_setting(setting: Setting, dirs: dict[str, Path], int8_dirs: dict[str, Path], paths: Sequence[Path],
                warmup: int, runs: int) -> tuple[SettingResult, dict[str, np.ndarray]]:
    result = SettingResult(setting.label, setting.backend, setting.threads, setting.mkldnn, setting.precision, setting.batch, OK)
    if setting.backend != "paddle" and not backend_installed(setting.backend):
        result.status = "not installed"
        return result, {}
    if setting.precision == "int8" and not int8_dirs:
        result.status = "skipped: no int8 model (make one with `shitu compress`, pass it with --int8)"
        return result, {}
    try:
        started = time.perf_counter()
        run = SettingRun(setting, dirs, int8_dirs)
        result.load_s = time.perf_counter() - started
        result.size_mb = run.size_mb()
        timer, outputs, qps = _with_threads(setting.threads, lambda: time_setting(run, paths, warmup, runs))
    except WorkFailed as exc:
        result.status = f"failed: {exc.message}"
        return result, {}
    result.stages = timer.stats(STAGE_ORDER)
    total = next(s for s in result.stages if s.stage == END_TO_END)
    result.ms_p50, result.ms_p90, result.ms_p99, result.fps = total.p50, total.p90, total.p99, qps
    return result, outputs


# ---- comparing settings


def agreement(task: str, reference: np.ndarray, other: np.ndarray) -> tuple[str, float]:
    """How close a setting's outputs are to the fp32 reference: cosine for rec, top-1 match for cls."""
    if reference.shape != other.shape:
        return f"{task} shape", float("nan")
    if task == "rec":
        a = reference.reshape(len(reference), -1).astype(np.float64)
        b = other.reshape(len(other), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        # Untrained nets can emit embeddings near 1e-8: no absolute floor, only an exact-zero guard.
        cosine = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)
        return "rec cosine", float(cosine.mean())
    if task == "cls":
        return "cls top-1", float((reference.argmax(-1) == other.argmax(-1)).mean())
    return f"{task} max abs diff", float(np.abs(reference - other).max())


def compare(results: list[SettingResult], outputs: list[dict[str, np.ndarray]]) -> str | None:
    """Fill speedup (vs the first row), the fastest mark, and agreement with the first ok fp32 row."""
    ok = [r for r in results if r.status == OK]
    if not ok:
        return None
    first = results[0] if results[0].status == OK else ok[0]
    for r in ok:
        r.speedup = first.ms_p50 / r.ms_p50 if r.ms_p50 else None
    min(ok, key=lambda r: r.ms_p50).fastest = True
    reference_index = next((i for i, r in enumerate(results) if r.status == OK and r.precision == "fp32"), None)
    if reference_index is None:
        return None
    for result, produced in zip(results, outputs):
        for task, value in produced.items():
            if task in outputs[reference_index]:
                name, score = agreement(task, outputs[reference_index][task], value)
                result.agreement[name] = score
    return results[reference_index].setting


# ---- the whole benchmark


def benchmark(models: dict[str, Path | None], images: Path, options: BenchOptions, int8_models: Sequence[Path] = (),
              progress: Callable[..., None] | None = None, record: bool = True) -> BenchReport:
    """Benchmark every setting of `options` on the given models over the files in `images`."""
    from shitu_cli.bench import record as records

    check_options(options)
    manifests, dirs, int8_dirs = load_models(models, int8_models)
    if not dirs:
        raise BadInput("no model to benchmark", hint="pass --rec DIR and/or --cls DIR (exported model dirs)")
    if "det" in dirs:
        raise BadInput("det benchmarking needs shitu_cli.infer.detector, which this build does not have yet",
                       hint="benchmark --rec/--cls for now")
    paths, _, skipped = load_images(images)
    results, outputs = [], []
    for setting in expand_settings(options):
        result, produced = run_setting(setting, dirs, int8_dirs, paths, options.warmup, options.runs)
        results.append(result)
        outputs.append(produced)
        if progress:
            progress(1, setting=setting.label, status=result.status.split(":")[0])
    reference = compare(results, outputs)
    report = BenchReport(
        system=system_info(), models=[_describe(t, dirs[t], manifests[t]) for t in dirs], images=len(paths),
        image_dir=str(images), skipped_images=skipped, boxes_per_image={}, warmup=options.warmup, runs=options.runs,
        results=results, reference=reference,
    )
    if record:
        report.record_path = records.update_fastest(backend_timings(report, manifests))
        report.log_path = records.append_log(log_rows(report))
    return report


def _describe(task: str, path: Path, manifest: ModelManifest) -> BenchModel:
    return BenchModel(task, path, manifest.arch, manifest.precision, manifest.model_hash, tuple(manifest.input_size))


def backend_timings(report: BenchReport, manifests: dict[str, ModelManifest]) -> list:
    """Each model's inference time per fp32 setting: what `--backend auto` later chooses from."""
    from shitu_cli.bench.record import BackendTiming

    timings = []
    for result in report.results:
        if result.status != OK or result.precision != "fp32":
            continue
        for stats in result.stages:
            task = stats.stage.removesuffix(" inference")
            if stats.stage.endswith(" inference") and manifests.get(task) and manifests[task].model_hash:
                timings.append(BackendTiming(manifests[task].model_hash, result.backend, stats.p50, result.threads, bool(result.mkldnn)))
    return timings


def log_rows(report: BenchReport) -> list[dict[str, Any]]:
    """One CSV row per setting: enough to compare runs across days and library versions."""
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    models = " ".join(f"{m.task}:{m.arch}:{(m.model_hash or '')[:12]}" for m in report.models)
    rows = []
    for r in report.results:
        rows.append({
            "time": stamp, "cpu": report.system.cpu, "models": models, "images": report.images,
            "setting": r.setting, "backend": r.backend, "threads": r.threads,
            "mkldnn": "" if r.mkldnn is None else int(r.mkldnn), "precision": r.precision, "batch": r.batch,
            "status": r.status, "size_mb": _round(r.size_mb), "ms_p50": _round(r.ms_p50), "ms_p90": _round(r.ms_p90),
            "ms_p99": _round(r.ms_p99), "fps": _round(r.fps),
            "agreement": ";".join(f"{k}={v:.5f}" for k, v in r.agreement.items()),
            "stages_p50": ";".join(f"{s.stage}={s.p50:.3f}" for s in r.stages),
            "paddle": report.system.versions.get("paddlepaddle", ""), "onnxruntime": report.system.versions.get("onnxruntime", ""),
            "openvino": report.system.versions.get("openvino", ""),
        })
    return rows


def _round(value: float | None, digits: int = 4) -> float | str:
    return "" if value is None else round(float(value), digits)


def demo_root() -> Path:
    import shitu_cli

    return Path(shitu_cli.__file__).resolve().parent.parent / "assets" / "demo"


def default_models() -> dict[str, Path]:
    """The built-in demo models (assets/demo/models/**/shitu.yaml), one per task, if they exist."""
    from shitu_cli.models.manifest import MODEL_MANIFEST

    found: dict[str, Path] = {}
    models_dir = demo_root() / "models"
    for manifest_path in sorted(models_dir.rglob(MODEL_MANIFEST)) if models_dir.is_dir() else []:
        try:
            manifest = read_model_manifest(manifest_path.parent)
        except BadInput:
            continue
        if manifest.precision == "fp32":
            found.setdefault(manifest.task, manifest_path.parent)
    if not found:
        raise BadInput(
            f"no built-in demo models in {models_dir}",
            hint="pass models explicitly: --rec DIR and/or --cls DIR (exported model dirs) and --images DIR",
        )
    return found


def default_images() -> Path:
    for name in ("queries", "gallery"):
        if (demo_root() / name).is_dir():
            return demo_root() / name
    raise BadInput(f"no built-in demo images in {demo_root()}", hint="pass --images DIR")
