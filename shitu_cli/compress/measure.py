"""Measurements behind the before/after table: file size, latency p50, agreement with the original and
the task metric (cls top-1, rec recall@1, det mAP), all from the exported models through build_predictor.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shitu_cli.compress.images import ImageSet, Sample, iter_batches, iter_readable
from shitu_cli.infer.pipeline import PipelineOptions
from shitu_cli.models.manifest import MODEL_MANIFEST, ModelManifest


@dataclass
class Outputs:
    values: np.ndarray  # cls: scores [N, C]; rec: embeddings [N, D]
    labels: list[str | None]


def model_size_bytes(model_dir: Path, manifest: ModelManifest) -> int:
    files = {manifest.model_file, manifest.params_file}  # one file for an ONNX model
    return sum((Path(model_dir) / name).stat().st_size for name in files)


def run_outputs(predictor, images: ImageSet, manifest: ModelManifest, batch_size: int) -> Outputs:
    values, labels = [], []
    for batch, samples in iter_batches(images, manifest, batch_size):
        values.append(predictor.run(batch)[0].reshape(len(samples), -1))
        labels.extend(s.label for s in samples)
    return Outputs(np.concatenate(values) if values else np.zeros((0, 0), np.float32), labels)


def latency_p50_ms(predictor, sample: np.ndarray, runs: int, warmup: int = 3) -> float:
    """Median wall time of one batch-1 call; the median shrugs off the noise of shared cores."""
    for _ in range(warmup):
        predictor.run(sample)
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        predictor.run(sample)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- agreement


def agreement(task: str, before: np.ndarray, after: np.ndarray, labels: list[str | None] | None = None) -> dict[str, float]:
    """How often the compressed model says what the original said.

    cls: share of images with the same top-1 class. rec: share of images whose nearest
    neighbour among the other images carries the same label under both models (the answer a
    search gives; with unlabelled images, the same image), plus the mean cosine similarity of
    each image's two embeddings.
    """
    if task == "cls":
        return {"agreement": float(np.mean(before.argmax(1) == after.argmax(1)))}
    cosine = float(np.mean(np.sum(_unit(before) * _unit(after), axis=1)))
    answer = np.arange(len(before))
    if labels and all(label is not None for label in labels):
        answer = np.array([str(label) for label in labels])  # two views of one product are the same answer
    return {"agreement": float(np.mean(answer[_nearest_other(before)] == answer[_nearest_other(after)])), "cosine": cosine}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest_other(embeddings: np.ndarray) -> np.ndarray:
    unit = _unit(embeddings.astype(np.float32))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(1)


# ----------------------------------------------------------------------------- task metric


def task_metric(task: str, outputs: Outputs, class_names: list[str]) -> tuple[str, float] | None:
    """(name, value) of the real metric on labelled images, or None when no image has a usable label."""
    if task == "cls":
        return _top1(outputs, class_names)
    if task == "rec":
        return _recall_at_1(outputs)
    return None


def _class_index(label: str | None, class_names: list[str]) -> int | None:
    if label is None:
        return None
    if label in class_names:
        return class_names.index(label)
    return int(label) if label.lstrip("-").isdigit() else None


def _top1(outputs: Outputs, class_names: list[str]) -> tuple[str, float] | None:
    truth = [_class_index(label, class_names) for label in outputs.labels]
    keep = [i for i, t in enumerate(truth) if t is not None]
    if not keep:
        return None
    predicted = outputs.values[keep].argmax(1)
    return "top1", float(np.mean(predicted == np.array([truth[i] for i in keep])))


def _recall_at_1(outputs: Outputs) -> tuple[str, float] | None:
    """Leave-one-out recall@1: each image queries all the others; images alone in their class are left out."""
    labels = np.array([str(label) for label in outputs.labels])
    if any(label is None for label in outputs.labels) or len(labels) < 2:
        return None
    answerable = np.array([np.sum(labels == label) > 1 for label in labels])
    if not answerable.any():
        return None
    nearest = _nearest_other(outputs.values)
    return "recall@1", float(np.mean(labels[nearest][answerable] == labels[answerable]))


# ----------------------------------------------------------------------------- detectors

# What the pipeline acts on (predict's default --det-thresh and --max-boxes): agreement compares these boxes.
DET_THRESH = PipelineOptions.det_thresh
DET_MAX_BOXES = PipelineOptions.max_boxes
# mAP ranks every box the detector returns above this score, as ppdet's evaluation does with its NMS.
MAP_MIN_SCORE = 0.01
MAP_MAX_BOXES = 100  # COCO's maxDets
MATCH_IOU = 0.5


@dataclass
class Detections:
    per_image: list[np.ndarray]  # [k, 6] rows: class index, score, x1, y1, x2, y2 (original pixels), best first
    samples: list[Sample]


def detect_all(detector, images: ImageSet) -> tuple[Detections, dict[str, np.ndarray] | None]:
    """Every readable image through `detector`; also the first image's feeds, for timing."""
    class_index = {label: i for i, label in enumerate(detector.labels)}
    per_image, samples, first = [], [], None
    for rgb, sample in iter_readable(images):
        if first is None:
            first = dict(zip(("image", "scale_factor"), detector.preprocess(rgb)))
        found = detector.detect(rgb, MAP_MIN_SCORE, MAP_MAX_BOXES)
        per_image.append(np.array([[class_index.get(d.label, -1), d.score, *d.box] for d in found], np.float32).reshape(-1, 6))
        samples.append(sample)
    return Detections(per_image, samples), first


def box_agreement(before: list[np.ndarray], after: list[np.ndarray]) -> dict[str, float]:
    """How far the compressed detector finds the original's boxes: F1 of same-class IoU >= 0.5 matches
    between the two models' boxes above the pipeline's threshold (1.0 when neither finds any), and the
    mean IoU of the matched pairs."""
    from shitu_cli.infer.pipeline import greedy_matches

    total, overlaps = 0, []
    for rows_before, rows_after in zip(before, after):
        kept_before, kept_after = _acted_on(rows_before), _acted_on(rows_after)
        total += len(kept_before) + len(kept_after)
        for cls in np.unique(kept_before[:, 0]):  # a box only matches a box of its own class
            overlaps += greedy_matches(kept_before[kept_before[:, 0] == cls, 2:], kept_after[kept_after[:, 0] == cls, 2:], MATCH_IOU)
    agreement = 1.0 if total == 0 else 2.0 * len(overlaps) / total
    return {"agreement": agreement, "matched_iou": float(np.mean(overlaps)) if overlaps else 1.0 if total == 0 else 0.0}


def _acted_on(rows: np.ndarray) -> np.ndarray:
    return rows[rows[:, 1] >= DET_THRESH][:DET_MAX_BOXES]


def map_against(reference: list[np.ndarray], found: list[np.ndarray], class_names: list[str]) -> float:
    """COCO mAP of `found` with the boxes the original acted on (`reference` above predict's threshold) as the
    ground truth: how well a compressed detector finds, ranks and places the original's boxes."""
    def name(index: float) -> str:
        return class_names[int(index)] if 0 <= int(index) < len(class_names) else "?"

    truth = [Sample(Path(str(i)), None, tuple((x1, y1, x2, y2, name(c)) for c, _, x1, y1, x2, y2 in _acted_on(rows).tolist()))
             for i, rows in enumerate(reference)]
    scored = detection_map(Detections(list(found), truth), class_names)
    if scored is None:  # the original acted on no box: agreeing with it is finding none either
        return float(all(len(_acted_on(rows)) == 0 for rows in found))
    return scored[1]


def detection_map(found: Detections, class_names: list[str]) -> tuple[str, float] | None:
    """COCO mAP@[.5:.95] (pycocotools) against the ground-truth boxes of a COCO --eval json; None without one.

    A one-class detector (a mainbody detector) is scored class-agnostic: every ground-truth box is
    an object to find, whatever its category.
    """
    if not found.samples or any(s.boxes is None for s in found.samples):
        return None
    class_of = (lambda name: 0) if len(class_names) == 1 else (lambda name: class_names.index(name) if name in class_names else None)
    truth, detections = [], []
    for image_id, (sample, rows) in enumerate(zip(found.samples, found.per_image)):
        for x1, y1, x2, y2, name in sample.boxes:
            category = class_of(name)
            if category is not None:
                truth.append({"id": len(truth) + 1, "image_id": image_id, "category_id": category + 1,
                              "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for cls, score, x1, y1, x2, y2 in rows.tolist():
            detections.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    if not truth:
        return None
    return "mAP", _coco_map(truth, detections, len(found.samples), len(class_names))


def _coco_map(truth: list[dict], detections: list[dict], image_count: int, class_count: int) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        ground = COCO()
        ground.dataset = {"images": [{"id": i} for i in range(image_count)], "annotations": truth,
                          "categories": [{"id": c + 1} for c in range(class_count)]}
        ground.createIndex()
        if not detections:
            return 0.0
        evaluation = COCOeval(ground, ground.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return max(0.0, float(evaluation.stats[0]))  # -1 means "no ground truth", already excluded


def is_model_dir(path: Path) -> bool:
    return (Path(path) / MODEL_MANIFEST).is_file()
