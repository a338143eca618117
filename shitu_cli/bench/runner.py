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
    notes: list[str] = field(default_factory=list)  # what a reader of the numbers should know (oversubscribed threads)


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


def load_images(source: Path) -> tuple[list[Path], list[str]]:
    """Decode every image once, untimed: it warms the file cache and drops files that cannot be read."""
    from shitu_cli.data.images import iter_image_files, read_image

    source = Path(source)
    if source.is_dir():
        files = list(iter_image_files(source))
    elif source.is_file():
        files = [source]
    else:
        raise BadInput("no such file or folder", path=source, hint="pass --images DIR with image files")
    paths, skipped = [], []
    for path in files:
        try:
            read_image(path)
            paths.append(path)
        except ImageReadError as exc:
            skipped.append(exc.one_line())
    if not paths:
        raise BadInput("no readable images here", path=source, hint="pass --images DIR with .jpg/.png files")
    return paths, skipped


# ---- one setting: build its predictors, warm up, time the passes


class SettingRun:
    """The models of one setting and the stage-by-stage processing of one batch of files.

    Each stage calls the code `shitu predict` runs (Detector, pipeline crops, preprocess,
    predictor, faiss search), split where the clock needs to see the seams.
    """

    def __init__(self, setting: Setting, dirs: dict[str, Path], int8_dirs: dict[str, Path], index_dir: Path | None = None):
        from shitu_cli.infer.pipeline import PipelineOptions

        self.setting = setting
        self.pipeline_options = PipelineOptions()
        self.predictors, self.manifests = {}, {}
        self.detector = None
        for task, model_dir in dirs.items():
            # An int8 setting quantizes the models that have an int8 twin; the others stay fp32.
            quantized = setting.precision == "int8" and task in int8_dirs
            precision = "fp32" if setting.precision == "int8" and not quantized else setting.precision
            options = PredictorOptions(
                backend=setting.backend, threads=setting.threads,
                mkldnn=True if setting.mkldnn is None else setting.mkldnn, precision=precision,
            )
            path = int8_dirs[task] if quantized else model_dir
            try:
                self._load(task, path, options)
            except WorkFailed as exc:
                # Name the model: with det + rec + cls, "cannot convert" alone does not say which.
                raise WorkFailed(f"{task}: {exc.message}", hint=exc.hint, path=exc.path) from None
        self.index = _load_index(index_dir, setting.threads) if index_dir is not None and "rec" in dirs else None

    def _load(self, task: str, path: Path, options: PredictorOptions) -> None:
        if task == "det":
            from shitu_cli.infer.detector import Detector

            self.detector = Detector(path, options)
            self.predictors[task] = self.detector.predictor
        else:
            self.predictors[task] = build_predictor(path, options, task=task)
        self.manifests[task] = self.predictors[task].manifest

    def size_mb(self) -> float:
        files = [f for p in self.predictors.values() for f in p.model_files]
        return sum(Path(f).stat().st_size for f in files) / 1e6

    def process(self, paths: Sequence[Path], timer: StageTimer) -> dict[str, list[np.ndarray]]:
        """Decode, detect, crop, preprocess, infer and search one batch of files; return each model's outputs."""
        from shitu_cli.data.images import read_image

        n = len(paths)
        outputs: dict[str, list[np.ndarray]] = {}
        with timer.stage(END_TO_END, n):
            with timer.stage("decode", n):
                images = [read_image(p) for p in paths]
            boxes = self._detect(images, timer, outputs) if self.detector else [None] * n
            if "rec" in self.predictors:
                features = self._embed(images, boxes, timer, outputs)
                if self.index is not None:
                    with timer.stage("search", n):
                        self._search(features)
            if "cls" in self.predictors:
                self._classify(images, timer, outputs)
        return outputs

    def _detect(self, images: list[np.ndarray], timer: StageTimer, outputs: dict[str, list[np.ndarray]]) -> list:
        from shitu_cli.infer.detector import postprocess

        n, options, found = len(images), self.pipeline_options, []
        for rgb in images:
            with timer.stage("det preprocess", n):
                image, scale_factor = self.detector.preprocess(rgb)
            with timer.stage("det inference", n):
                raw, count = self.detector.predictor.run({"image": image, "scale_factor": scale_factor})[:2]
            with timer.stage("det postprocess", n):
                height, width = rgb.shape[:2]
                detections = postprocess(raw, int(np.asarray(count).reshape(-1)[0]), self.detector.labels,
                                         (width, height), options.det_thresh, options.max_boxes)
            found.append(detections)
            outputs.setdefault("det", []).append(np.array([d.box for d in detections], np.float32).reshape(-1, 4))
        return found

    def _embed(self, images: list[np.ndarray], detections: list, timer: StageTimer, outputs: dict[str, list[np.ndarray]]) -> np.ndarray:
        from shitu_cli.infer.embedder import l2_normalise
        from shitu_cli.infer.pipeline import boxes_to_recognise, crop
        from shitu_cli.infer.preprocess import preprocess_batch

        n, manifest = len(images), self.manifests["rec"]
        with timer.stage("crop + rec preprocess", n):
            crops = []
            for rgb, found in zip(images, detections):
                if found is None:
                    crops.append(rgb)  # no detector: the whole image is the one crop
                    continue
                height, width = rgb.shape[:2]
                crops.extend(crop(rgb, box) for box, _ in boxes_to_recognise(found, width, height, self.pipeline_options.whole_image))
            batch = preprocess_batch(crops, manifest.preprocess, tuple(manifest.input_size)) if crops else None
        with timer.stage("rec inference", n):
            features = l2_normalise(self.predictors["rec"].run(batch)[0]) if batch is not None else np.zeros((0, 1), np.float32)
        outputs.setdefault("rec", []).append(features)
        return features

    def _search(self, features: np.ndarray) -> None:
        from shitu_cli.index import backend
        from shitu_cli.infer.pipeline import NEIGHBOURS_PER_LABEL, top_labels

        stored, topk = self.index, self.pipeline_options.topk
        if len(features) and stored.index.ntotal:
            scores, ids = backend.search(stored.index, features, min(stored.index.ntotal, topk * NEIGHBOURS_PER_LABEL + 8))
            for row_scores, row_ids in zip(scores, ids):
                top_labels(row_scores, row_ids, stored.items, topk)

    def _classify(self, images: list[np.ndarray], timer: StageTimer, outputs: dict[str, list[np.ndarray]]) -> None:
        from shitu_cli.infer.preprocess import preprocess_batch

        n, manifest = len(images), self.manifests["cls"]
        with timer.stage("cls preprocess", n):
            batch = preprocess_batch(images, manifest.preprocess, tuple(manifest.input_size))
        with timer.stage("cls inference", n):
            outputs.setdefault("cls", []).append(self.predictors["cls"].run(batch)[0])


def _load_index(index_dir: Path, threads: int):
    from shitu_cli.index import backend, load_index

    backend.set_threads(threads)
    return load_index(Path(index_dir))


def _batches(paths: Sequence[Path], size: int) -> list[list[Path]]:
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def time_setting(run: SettingRun, paths: Sequence[Path], warmup: int, runs: int) -> tuple[StageTimer, dict[str, Any], float]:
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
                for task, values in outputs.items():
                    first_outputs.setdefault(task, []).extend(values)
    elapsed = time.perf_counter() - start
    qps = runs * len(paths) / elapsed if elapsed > 0 else float("nan")
    # det keeps one box array per image; rec and cls outputs are rows of one array
    return timer, {task: values if task == "det" else np.concatenate(values) for task, values in first_outputs.items()}, qps


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
                warmup: int, runs: int, index_dir: Path | None = None) -> tuple[SettingResult, dict[str, Any]]:
    result = SettingResult(setting.label, setting.backend, setting.threads, setting.mkldnn, setting.precision, setting.batch, OK)
    if setting.backend != "paddle" and not backend_installed(setting.backend):
        result.status = "not installed"
        return result, {}
    if setting.precision == "int8" and not int8_dirs:
        result.status = "skipped: no int8 model (make one with `shitu compress`, pass it with --int8)"
        return result, {}
    try:
        started = time.perf_counter()
        run = SettingRun(setting, dirs, int8_dirs, index_dir)
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


def agreement(task: str, reference: Any, other: Any) -> tuple[str, float] | None:
    """How close a setting's outputs are to the fp32 reference, or None where they cannot be paired.

    rec: mean cosine of the embeddings; cls: top-1 match; det: box F1 at IoU 0.5.
    """
    if task == "det":
        return "det box match", box_match(reference, other)
    if reference.shape != other.shape:
        return None  # e.g. the detector found other boxes, so the crops differ
    if task == "rec":
        a = reference.reshape(len(reference), -1).astype(np.float64)
        b = other.reshape(len(other), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        # Untrained nets can emit embeddings near 1e-8: no absolute floor, only an exact-zero guard.
        cosine = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)
        return "rec cosine", float(cosine.mean()) if len(cosine) else 1.0
    return "cls top-1", float((reference.argmax(-1) == other.argmax(-1)).mean()) if len(reference) else 1.0


def box_match(reference: Sequence[np.ndarray], other: Sequence[np.ndarray], iou_thresh: float = 0.5) -> float:
    """F1 of boxes matched one-to-one (greedy, IoU >= thresh) per image; 1.0 when neither found any."""
    from shitu_cli.infer.pipeline import greedy_matches

    matched = total = 0
    for ref_boxes, boxes in zip(reference, other):
        total += len(ref_boxes) + len(boxes)
        matched += 2 * len(greedy_matches(ref_boxes, boxes, iou_thresh))
    return matched / total if total else 1.0


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
            measured = agreement(task, outputs[reference_index][task], value) if task in outputs[reference_index] else None
            if measured:
                result.agreement[measured[0]] = measured[1]
    return results[reference_index].setting


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
    results, outputs = [], []
    for setting in expand_settings(options):
        result, produced = run_setting(setting, dirs, int8_dirs, paths, options.warmup, options.runs, index)
        results.append(result)
        outputs.append(produced)
        if progress:
            progress(1, setting=setting.label, status=result.status.split(":")[0])
    reference = compare(results, outputs)
    system = system_info()
    report = BenchReport(
        system=system, models=[_describe(t, dirs[t], manifests[t]) for t in dirs], images=len(paths),
        image_dir=str(images), skipped_images=skipped, boxes_per_image=_boxes_histogram(outputs, results, reference),
        warmup=options.warmup, runs=options.runs,
        results=results, reference=reference, notes=thread_notes(options.threads, system.usable_cpus),
    )
    if record:
        report.record_path = records.update_fastest(backend_timings(report, manifests))
        report.log_path = records.append_log(log_rows(report))
    return report


def thread_notes(threads: Sequence[int], usable_cpus: int) -> list[str]:
    """A warning when a thread count exceeds the cores this process may use: the threads then take turns."""
    over = [t for t in threads if t > usable_cpus]
    if not over:
        return []
    counts = ", ".join(str(t) for t in over)
    return [f"--threads {counts} exceeds the {usable_cpus} CPU core(s) this process may use: the extra threads share "
            f"cores, so those rows measure oversubscription, not a {max(over)}-core machine"]


def index_model(index_dir: Path, rec: Path | None) -> Path:
    """The rec model to search `index_dir` with: the given one if its features fit the index, else the index's own."""
    from shitu_cli.index.store import read_index_manifest
    from shitu_cli.infer.pipeline import check_model_fits_index

    manifest = read_index_manifest(index_dir)
    rec_dir = Path(rec) if rec is not None else Path(manifest.model.dir)
    check_model_fits_index(manifest.model, read_model_manifest(rec_dir, task="rec"), rec_dir)
    return rec_dir


def _boxes_histogram(outputs: list[dict[str, Any]], results: list[SettingResult], reference: str | None) -> dict[int, int]:
    """How many images had how many boxes, as the reference setting's detector saw them."""
    chosen = next((o for o, r in zip(outputs, results) if r.setting == reference), None) or next((o for o in outputs if o), {})
    counts: dict[int, int] = {}
    for boxes in chosen.get("det", []):
        counts[len(boxes)] = counts.get(len(boxes), 0) + 1
    return dict(sorted(counts.items()))


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


def default_setup() -> tuple[dict[str, Path | None], Path]:
    """The demo's det and rec models (official when cached, else built-in) and the demo gallery's
    index, built on first use, so a bare `shitu benchmark-cpu` works on a fresh install."""
    from shitu_cli import demo

    try:
        index, models, _ = demo.ensure_demo_index()
    except BadInput as exc:
        raise BadInput(exc.message, path=exc.path,
                       hint="run `shitu demo --rebuild`, or pass models: --rec DIR / --det DIR / --cls DIR and --images DIR") from None
    return {"det": models.det, "rec": models.rec, "cls": None}, index


def default_images() -> Path:
    for name in ("queries", "gallery"):
        if (demo_root() / name).is_dir():
            return demo_root() / name
    raise BadInput(f"no built-in demo images in {demo_root()}", hint="pass --images DIR")


