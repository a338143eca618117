"""Per-class COCO AP of a detector's evaluation: pycocotools' own COCOeval over the detections ppdet's
COCOMetric wrote (bbox.json), read per category from its precision array."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np


def class_aps(val_json: Path, detections_json: Path) -> dict[str, dict[str, float]]:
    """{class name: {"AP": AP@[.5:.95], "AP50": AP@.5, "boxes": val boxes}} for every category of val_json.

    A class with no val box has AP -1 (COCO's "absent"); no detections at all give 0 for the others.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(val_json))
    categories = sorted(truth.getCatIds())
    boxes = {cat: len(truth.getAnnIds(catIds=[cat])) for cat in categories}
    names = {cat: truth.loadCats(cat)[0]["name"] for cat in categories}
    detections = json.loads(Path(detections_json).read_text(encoding="utf-8")) if Path(detections_json).is_file() else []
    if not detections:
        return {names[c]: {"AP": 0.0 if boxes[c] else -1.0, "AP50": 0.0 if boxes[c] else -1.0, "boxes": boxes[c]}
                for c in categories}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]
    result = {}
    for index, cat in enumerate(evaluation.params.catIds):
        all_areas = precision[:, :, index, 0, -1]
        result[names[cat]] = {"AP": _mean_present(all_areas), "AP50": _mean_present(all_areas[0]), "boxes": boxes[cat]}
    return result


def _mean_present(values: np.ndarray) -> float:
    """COCO marks (threshold, recall) cells without ground truth as -1; the AP is the mean of the rest."""
    present = values[values > -1]
    return round(float(present.mean()), 6) if present.size else -1.0
