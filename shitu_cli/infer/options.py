"""Predict's settings and their defaults, in a module light enough for the CLI to import at start-up."""

from __future__ import annotations

from dataclasses import dataclass

WHOLE_IMAGE_POLICIES = ("always", "fallback", "off")


@dataclass
class PipelineOptions:
    """The one home of predict's defaults: `shitu predict`'s flags, the demo and benchmark-cpu read them here.

    det_thresh and cover_thresh were tuned on the demo's query scenes (ground-truth boxes): see
    benchmarks/vs_paddleclas_thresholds.md (and benchmarks/vs_paddleclas.md against PaddleClas).
    """

    topk: int = 5
    rec_thresh: float = 0.5
    nms_thresh: float = 0.3  # per label: IoU above which the worse of two same-label boxes goes
    # Any labels: the worse of two detector boxes goes when their intersection covers more than this share
    # of the smaller box (a loose second box around an object, named after something else). 1 turns it off.
    cover_thresh: float = 0.6
    det_thresh: float = 0.2
    max_boxes: int = 5
    whole_image: str = "fallback"  # always | fallback | off


DEFAULTS = PipelineOptions()
