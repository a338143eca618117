"""Detection without an index: a detector's boxes with its own class and score, in the pipeline's result
types, so predict's sources, JSON, table and drawing serve both."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from shitu_cli.infer.options import PipelineOptions
from shitu_cli.infer.pipeline import DetectorLike, ImageResult, Recognition, _read, clip_box


class DetectionOnly:
    """The pipeline's interface (recognise, predict_files, options, notes) over a detector alone.

    >>> DetectionOnly(Detector("runs/det/export")).predict_file("street.jpg").recognitions[0].label
    """

    def __init__(self, detector: DetectorLike, options: PipelineOptions | None = None):
        self.detector = detector
        # no whole-image box: there is nothing to recognise it against
        self.options = dataclasses.replace(options or PipelineOptions(), whole_image="off")
        self.notes: list[str] = []

    def recognise(self, rgb: np.ndarray) -> list[Recognition]:
        """The detector's boxes (score >= det_thresh, at most max_boxes, best first), labelled with its classes."""
        height, width = rgb.shape[:2]
        found = []
        for detection in self.detector.detect(rgb, self.options.det_thresh, self.options.max_boxes):
            box = clip_box(detection.box, width, height)
            if box[2] > box[0] and box[3] > box[1]:
                found.append(Recognition(box=box, label=detection.label, score=float(detection.score), matches=[],
                                         source="detection", det_score=float(detection.score),
                                         det_label=detection.label))
        return found

    def predict_file(self, path: Path | str) -> ImageResult:
        return self.predict_files([path])[0]

    def predict_files(self, paths: Iterable[Path | str], progress: Callable[..., None] | None = None) -> list[ImageResult]:
        results = []
        for path in paths:
            path, rgb, error = _read(path)
            if rgb is None:
                results.append(ImageResult(Path(path).as_posix(), whole_image_policy="off", error=error))
            else:
                results.append(ImageResult(Path(path).as_posix(), self.recognise(rgb), "off", (rgb.shape[1], rgb.shape[0])))
            if progress:
                progress(1)
        return results
