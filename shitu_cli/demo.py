"""`shitu demo`: recognise the objects in the shipped query photos against the shipped gallery,
with the official PP-ShiTuV2 models when they are cached, else the small built-in ones.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shitu_cli.demo_data import DEMO_DIR, build_training_data
from shitu_cli.errors import BadInput

DEMO_MODELS = DEMO_DIR / "models"
GALLERY = DEMO_DIR / "gallery"
QUERIES = DEMO_DIR / "queries"
OFFICIAL = ("PP-ShiTuV2-det", "PP-ShiTuV2-rec")
DET_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "det" / "demo.yml"
REC_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "rec" / "demo.yml"
MATCH_IOU = 0.5


@dataclass
class DemoModels:
    det: Path
    rec: Path
    source: str  # "official" or "built-in"


@dataclass
class ObjectCheck:
    image: str
    label: str
    box: list[float]
    found_label: str | None  # label of the best-overlapping result, None if nothing overlaps
    score: float | None
    iou: float

    @property
    def correct(self) -> bool:
        return self.found_label == self.label and self.iou >= MATCH_IOU


@dataclass
class DemoReport:
    models: DemoModels
    index_dir: Path
    index: Any  # the build-index report of this run's (re-)sync
    results: list[Any]  # ImageResult per query image
    checks: list[ObjectCheck]
    extra_results: int  # results that overlap no ground-truth object (IoU < 0.5 with each)
    boxes: int  # results in all
    right_boxes: int  # results on a ground-truth object (IoU >= 0.5) with its label
    vis_dir: Path | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return sum(c.correct for c in self.checks) / max(1, len(self.checks))

    @property
    def precision(self) -> float:
        return self.right_boxes / self.boxes if self.boxes else 1.0


@dataclass
class Scoring:
    checks: list[ObjectCheck]
    extra: int
    boxes: int
    right: int


def pick_models() -> DemoModels:
    """The official models when both are cached; otherwise the ones shipped in assets/demo/models."""
    from shitu_cli.models.registry import is_cached, read_registry

    registry = read_registry()
    entries = [registry.get(name) for name in OFFICIAL]
    if all(is_cached(entry) for entry in entries):
        return DemoModels(entries[0].location(), entries[1].location(), "official")
    det, rec = DEMO_MODELS / "det", DEMO_MODELS / "rec"
    if not (det / "shitu.yaml").is_file() or not (rec / "shitu.yaml").is_file():
        raise BadInput("the built-in demo models are missing", path=DEMO_MODELS, hint="run `shitu demo --rebuild`")
    return DemoModels(det, rec, "built-in")


def work_dir() -> Path:
    from shitu_cli.models.registry import cache_root

    return cache_root().parent / "demo"


def ensure_demo_index(work: Path | None = None, threads: int = 1) -> tuple[Path, DemoModels, Any]:
    """The demo gallery's index for the models in use, built or re-synced (cheap when unchanged)."""
    from shitu_cli.index.build import build_index

    models = pick_models()
    index_dir = (Path(work) if work else work_dir()) / f"index-{models.source}"
    return index_dir, models, build_index(GALLERY, index_dir, rec=models.rec, threads=threads)


def run_demo(work: Path | None = None, threads: int = 1, save_vis: bool = True,
             progress: Callable[..., None] | None = None) -> DemoReport:
    """Build (or re-sync) the demo index, recognise every query scene and score it against the truth."""
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.pipeline import Pipeline, PipelineOptions
    from shitu_cli.infer.predictor import PredictorOptions

    started = time.perf_counter()
    work = Path(work) if work else work_dir()
    index_dir, models, built = ensure_demo_index(work, threads)
    predictor_options = PredictorOptions(threads=threads)
    detector = Detector(models.det, predictor_options)
    # predict's defaults (the demo shows what `shitu predict` does), fewer labels per box for the table
    pipeline = Pipeline(index_dir, detector=detector, predictor_options=predictor_options, options=PipelineOptions(topk=3))
    truth = json.loads((QUERIES / "ground_truth.json").read_text(encoding="utf-8"))
    results = []
    for name in sorted(truth):
        results.append(pipeline.predict_file(QUERIES / name))
        if progress:
            progress(1)
    scoring = score(results, truth)
    vis_dir = draw_all(results, work / "vis") if save_vis else None
    return DemoReport(models, index_dir, built, results, scoring.checks, scoring.extra, scoring.boxes, scoring.right,
                      vis_dir, time.perf_counter() - started, notes=pipeline.notes)


def score(results: list[Any], truth: dict[str, list[dict[str, Any]]], root: Path | None = None) -> Scoring:
    """Each true object against the result that overlaps it most (recall); each result against the true
    objects: extra when it overlaps none at IoU >= 0.5, right when one of those has its label (precision)."""
    from shitu_cli.infer.pipeline import iou

    root = Path(root) if root is not None else QUERIES
    checks, extra, boxes, right = [], 0, 0, 0
    for result in results:
        name = Path(result.path).relative_to(root).as_posix() if Path(result.path).is_absolute() else result.path
        objects = truth.get(name, [])
        for obj in objects:
            overlaps = [(iou(obj["box"], r.box), r) for r in result.recognitions]
            best_iou, best = max(overlaps, key=lambda pair: pair[0], default=(0.0, None))
            found = best if best is not None and best_iou > 0 else None
            checks.append(ObjectCheck(name, obj["label"], obj["box"], found.label if found else None,
                                      found.score if found else None, round(best_iou, 3)))
        extra += sum(all(iou(o["box"], r.box) < MATCH_IOU for o in objects) for r in result.recognitions)
        right += sum(any(o["label"] == r.label and iou(o["box"], r.box) >= MATCH_IOU for o in objects) for r in result.recognitions)
        boxes += len(result.recognitions)
    return Scoring(checks, extra, boxes, right)


def draw_all(results: list[Any], out: Path) -> Path:
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.draw import draw_recognitions, write_image

    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        if result.error is None:
            write_image(out / Path(result.path).name, draw_recognitions(read_image(result.path), result.recognitions))
    return out


DET_STAGES = ({"val": 0.15, "settings": {}}, {"val": 0.1, "settings": {"epochs": 30}})


def rebuild_models(work: Path | None = None, on_stage: Callable[[str], None] | None = None) -> DemoModels:
    """Re-create assets/demo/models the way the shipped ones were made: recipes/rec/demo.yml on object
    shots, and recipes/det/demo.yml in two stages (160 scenes, then 400 new ones from the stage-1 best)."""
    from shitu_cli.data.split import split_dataset
    from shitu_cli.train.det import best_weights, train_det
    from shitu_cli.train.rec import train_rec

    work = Path(work) if work else work_dir() / "rebuild"
    shutil.rmtree(work, ignore_errors=True)
    say = on_stage or (lambda _: None)
    say("generating training scenes and object shots")
    data = build_training_data(work)
    say("training the demo recogniser (recipes/rec/demo.yml)")
    rec = train_rec(data.rec_objects, work / "rec_run", recipe=str(REC_RECIPE))
    pretrained = None
    for number, (scenes, stage) in enumerate(zip(data.det_stages, DET_STAGES), start=1):
        say(f"training the demo detector, stage {number} (recipes/det/demo.yml)")
        split_dataset(scenes, val=stage["val"], test=0.0, format="coco")
        settings = {**stage["settings"], **({"pretrained": str(pretrained)} if pretrained else {})}
        det = train_det(scenes, work / f"det_run{number}", recipe=DET_RECIPE, settings=settings, merge_classes=True)
        pretrained = best_weights(det.run_dir)
    for name, export in (("rec", rec.export_dir), ("det", det.export_dir)):
        target = DEMO_MODELS / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(export, target)
    return DemoModels(DEMO_MODELS / "det", DEMO_MODELS / "rec", "built-in")
