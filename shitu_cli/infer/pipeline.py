"""The recognition pipeline: image -> boxes (detector or whole image) -> crops -> one batched rec call
-> index search -> score threshold -> per-label NMS -> result dataclasses. Usable from a notebook as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from shitu_cli.errors import BadInput, ShituError
from shitu_cli.infer.options import WHOLE_IMAGE_POLICIES, PipelineOptions

UNKNOWN = "unknown"
# Each distinct label needs its nearest gallery item; a few neighbours per label finds them.
NEIGHBOURS_PER_LABEL = 4

Box = list[float]  # x1, y1, x2, y2 in pixels of the original image


@dataclass
class Match:
    label: str
    score: float  # cosine similarity to the nearest gallery item of this label
    gallery_path: str


@dataclass
class Recognition:
    box: Box
    label: str  # "unknown" when the best score is below rec_thresh
    score: float
    matches: list[Match]  # top-k distinct labels, best first
    source: str = "whole_image"  # "whole_image" or "detection"
    det_score: float | None = None
    det_label: str | None = None  # the detector's own class, from a multi-class detector


@dataclass
class ImageResult:
    path: str
    recognitions: list[Recognition] = field(default_factory=list)
    whole_image_policy: str = "fallback"
    size: tuple[int, int] | None = None  # (width, height)
    error: str | None = None




class DetectionLike(Protocol):
    box: Sequence[float]
    score: float
    label: str


class DetectorLike(Protocol):
    """What shitu_cli.infer.detector.Detector offers the pipeline."""

    def detect(self, rgb: np.ndarray, thresh: float, max_boxes: int) -> list[Any]: ...


# ----------------------------------------------------------------------------- pure rules


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def greedy_matches(reference: Sequence[Sequence[float]], candidates: Sequence[Sequence[float]], iou_thresh: float) -> list[float]:
    """IoUs of the one-to-one matches: each reference box, in order, takes the free candidate it overlaps
    most, when that overlap reaches iou_thresh. How two detectors' outputs are compared."""
    free = list(range(len(candidates)))
    overlaps = []
    for box in reference:
        best = max(free, key=lambda j: iou(box, candidates[j]), default=None)
        if best is not None and iou(box, candidates[best]) >= iou_thresh:
            free.remove(best)
            overlaps.append(iou(box, candidates[best]))
    return overlaps


def covered_share(a: Sequence[float], b: Sequence[float]) -> float:
    """The intersection of two boxes over the smaller one's area: 1.0 when one lies inside the other."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    if width <= 0 or height <= 0 or smaller <= 0:
        return 0.0
    return float(width * height / smaller)


def nms_per_label(recognitions: Sequence[Recognition], iou_thresh: float, cover_thresh: float = 1.0) -> list[Recognition]:
    """Greedy NMS, best score first; returns survivors in score order.

    Two rules remove a box. Same label and IoU above iou_thresh: PaddleClas's recognition NMS ignores
    labels, so a crisp "cola" box could swallow an overlapping "fanta" box; here IoU only counts
    between boxes that name the same thing. Any labels, both from the detector, and the smaller box
    more than cover_thresh inside the other: a loose second detection around an object gets named
    after something else ("cameraman" around a rocket); two products side by side overlap far less.
    The whole-image box never takes part in the second rule: it covers every detection.
    """
    kept: list[Recognition] = []
    for candidate in sorted(recognitions, key=lambda r: -r.score):
        if not any(_suppresses(better, candidate, iou_thresh, cover_thresh) for better in kept):
            kept.append(candidate)
    return kept


def _suppresses(better: Recognition, worse: Recognition, iou_thresh: float, cover_thresh: float) -> bool:
    if better.label == worse.label and iou(better.box, worse.box) > iou_thresh:
        return True
    from_detector = better.source == "detection" and worse.source == "detection"
    return from_detector and cover_thresh < 1.0 and covered_share(better.box, worse.box) > cover_thresh


def boxes_to_recognise(detections: Sequence[DetectionLike], width: int, height: int,
                       policy: str) -> list[tuple[Box, float | None]]:
    """Which (box, detector score) pairs get recognised under a whole-image policy.

    always: every detection plus the whole image (PaddleClas's behaviour); fallback: the
    detections, or the whole image when there are none; off: the detections only.
    """
    return [(box, score) for box, score, _ in labelled_boxes(detections, width, height, policy)]


def labelled_boxes(detections: Sequence[DetectionLike], width: int, height: int,
                   policy: str) -> list[tuple[Box, float | None, str | None]]:
    """boxes_to_recognise with each box's detector class (None for the whole image)."""
    if policy not in WHOLE_IMAGE_POLICIES:
        raise BadInput(f"unknown whole-image policy {policy!r}", hint=f"choose one of: {', '.join(WHOLE_IMAGE_POLICIES)}")
    boxes: list[tuple[Box, float | None, str | None]] = [
        (clip_box(d.box, width, height), float(d.score), getattr(d, "label", None)) for d in detections]
    boxes = [(box, score, label) for box, score, label in boxes if box[2] > box[0] and box[3] > box[1]]
    if policy == "always" or (policy == "fallback" and not boxes):
        boxes.append(([0.0, 0.0, float(width), float(height)], None, None))
    return boxes


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]


def crop(rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
    height, width = rgb.shape[:2]
    x1, y1 = int(np.floor(box[0])), int(np.floor(box[1]))
    x2, y2 = max(x1 + 1, int(np.ceil(box[2]))), max(y1 + 1, int(np.ceil(box[3])))
    return rgb[max(0, y1) : min(height, y2), max(0, x1) : min(width, x2)]


def main_object_crop(detector: DetectorLike, thresh: float) -> Callable[[np.ndarray], tuple[np.ndarray, Box | None]]:
    """image -> (crop of the detector's best box, that box), or (whole image, None) when none passes."""

    def cropper(rgb: np.ndarray) -> tuple[np.ndarray, Box | None]:
        found = detector.detect(rgb, thresh, 1)
        if not found:
            return rgb, None
        box = clip_box(found[0].box, rgb.shape[1], rgb.shape[0])
        return crop(rgb, box), box

    return cropper


def top_labels(scores: np.ndarray, ids: np.ndarray, items: dict, topk: int) -> list[Match]:
    """The best `topk` distinct labels among one query's neighbours, each with its nearest gallery item."""
    matches: list[Match] = []
    seen = set()
    for score, item_id in zip(scores.tolist(), ids.tolist()):
        item = items.get(item_id)
        if item is None or item.label in seen:
            continue  # id -1: fewer neighbours than asked for
        seen.add(item.label)
        matches.append(Match(item.label, float(score), item.path))
        if len(matches) == topk:
            break
    return matches


def check_model_fits_index(index_model, rec_manifest, rec_dir: Path) -> str | None:
    """Refuse a rec model whose features are not comparable with the index's; return a note if only related."""
    if rec_manifest.embedding_dim != index_model.embedding_dim:
        raise BadInput(f"rec model gives {rec_manifest.embedding_dim}-d features but the index holds {index_model.embedding_dim}-d ones",
                       hint="use the model the index was built with, or rebuild the index with this one", path=rec_dir)
    if rec_manifest.model_hash == index_model.model_hash:
        return None
    if index_model.model_hash and rec_manifest.parent_model_hash == index_model.model_hash:
        return f"using {rec_dir}, a {rec_manifest.method or 'derived'} version of the index's model"
    raise BadInput(f"rec model (hash {str(rec_manifest.model_hash)[:12]}) is not the model the index was built with "
                   f"(hash {str(index_model.model_hash)[:12]}); their features are not comparable",
                   hint="drop --rec to use the index's own model, or rebuild the index with this one", path=rec_dir)


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """Recognise objects in images against a gallery index.

    >>> pipe = Pipeline("index/")                  # rec model from the index manifest
    >>> pipe.predict_file("shelf.jpg").recognitions[0].label
    """

    def __init__(self, index_dir: Path | str, rec: Path | str | None = None, detector: DetectorLike | None = None,
                 options: PipelineOptions | None = None, predictor_options=None, batch_size: int = 32):
        from shitu_cli.index import backend
        from shitu_cli.index.store import load_index
        from shitu_cli.infer.embedder import Embedder
        from shitu_cli.infer.predictor import PredictorOptions

        self.options = options or PipelineOptions()
        _check_options(self.options)
        self.index_dir = Path(index_dir)
        self.index = load_index(self.index_dir)
        _close_with(self, self.index)
        rec_dir = Path(rec) if rec is not None else Path(self.index.manifest.model.dir)
        # predict's default backend: the Python API gives what the CLI gives with its defaults
        predictor_options = predictor_options or PredictorOptions(backend="auto")
        self.embedder = Embedder(rec_dir, predictor_options, batch_size=batch_size)
        backend.set_threads(predictor_options.threads)  # faiss's budget; small searches still take one thread
        self.notes = [n for n in [check_model_fits_index(self.index.manifest.model, self.embedder.manifest, rec_dir)] if n]
        self.detector = detector
        # A mainbody detector's one class says nothing; a multi-class detector's class goes with each box.
        self.detector_classes = len(getattr(detector, "labels", ())) > 1
        self._k = min(self.index.index.ntotal, max(1, self.options.topk) * NEIGHBOURS_PER_LABEL + 8)

    def with_index(self, stored) -> "Pipeline":
        """This pipeline (same models, options) on another loaded generation of its index; self is unchanged,
        so a search already running on self keeps reading the generation it started on."""
        import copy

        check_model_fits_index(stored.manifest.model, self.embedder.manifest, self.embedder.model_dir)
        other = copy.copy(self)
        other.index = stored
        _close_with(other, stored)
        other._k = min(stored.index.ntotal, max(1, self.options.topk) * NEIGHBOURS_PER_LABEL + 8)
        return other

    def recognise(self, rgb: np.ndarray) -> list[Recognition]:
        """All recognitions in one RGB uint8 image, after rec-thresh and per-label NMS."""
        return self.recognise_many([rgb])[0]

    def recognise_many(self, images: Sequence[np.ndarray]) -> list[list[Recognition]]:
        """recognise() for several images, with ONE batched rec call and one search for all their crops."""
        options = self.options
        boxes = [self._boxes(rgb) for rgb in images]
        crops = [crop(rgb, box) for rgb, found in zip(images, boxes) for box, _, _ in found]
        if not crops:
            return [[] for _ in images]
        scores, ids = self._search(self.embedder.embed(crops))
        results, row = [], 0
        for found in boxes:
            recognitions = [self._recognition(box, det_score, scores[row + i], ids[row + i], det_label)
                            for i, (box, det_score, det_label) in enumerate(found)]
            row += len(found)
            results.append(nms_per_label(recognitions, options.nms_thresh, options.cover_thresh))
        return results

    def _boxes(self, rgb: np.ndarray) -> list[tuple[Box, float | None, str | None]]:
        options = self.options
        detections = self.detector.detect(rgb, options.det_thresh, options.max_boxes) if self.detector else []
        return labelled_boxes(detections, rgb.shape[1], rgb.shape[0], options.whole_image)

    def _search(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from shitu_cli.index import backend

        if self._k == 0:
            return np.zeros((len(features), 0), np.float32), np.zeros((len(features), 0), np.int64)
        return backend.search(self.index.index, features, self._k)

    def _recognition(self, box: Box, det_score: float | None, scores: np.ndarray, ids: np.ndarray,
                     det_label: str | None = None) -> Recognition:
        matches = top_labels(scores, ids, self.index.items, self.options.topk)
        best = matches[0] if matches else None
        known = best is not None and best.score >= self.options.rec_thresh
        return Recognition(box=box, label=best.label if known else UNKNOWN, score=best.score if best else 0.0,
                           matches=matches, source="whole_image" if det_score is None else "detection", det_score=det_score,
                           det_label=det_label if self.detector_classes else None)

    def predict_file(self, path: Path | str) -> ImageResult:
        """Read and recognise one file; a file that cannot be read gives an ImageResult with `error`."""
        return self._group_results([_read(path)])[0]

    def predict_files(self, paths: Iterable[Path | str], progress: Callable[..., None] | None = None,
                      workers: int = 2) -> list[ImageResult]:
        """Recognise files as a stream: worker threads decode the next group of images while the models run
        on this one (Pillow and OpenCV release the GIL), and each group's crops go through the rec model in
        one batch. Unreadable files give ImageResults with `error`."""
        from concurrent.futures import ThreadPoolExecutor

        paths = list(paths)
        size = self.images_per_group()
        groups = [paths[start : start + size] for start in range(0, len(paths), size)]
        results: list[ImageResult] = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pending = [pool.submit(_read, p) for p in groups[0]] if groups else []
            for number in range(len(groups)):
                loaded = [job.result() for job in pending]
                pending = [pool.submit(_read, p) for p in groups[number + 1]] if number + 1 < len(groups) else []
                results.extend(self._group_results(loaded))
                if progress:
                    progress(len(loaded))
        return results

    def images_per_group(self) -> int:
        """Enough images to fill about one rec batch with their crops."""
        crops_per_image = 1 if self.detector is None else max(1, self.options.max_boxes) + (self.options.whole_image == "always")
        return max(1, self.embedder.batch_size // crops_per_image)

    def _group_results(self, loaded: list[tuple[Path | str, np.ndarray | None, str | None]]) -> list[ImageResult]:
        policy = self.options.whole_image
        readable = [rgb for _, rgb, _ in loaded if rgb is not None]
        recognised = iter(self.recognise_many(readable))
        results = []
        for path, rgb, error in loaded:
            if rgb is None:
                results.append(ImageResult(Path(path).as_posix(), whole_image_policy=policy, error=error))
            else:
                results.append(ImageResult(Path(path).as_posix(), next(recognised), policy, (rgb.shape[1], rgb.shape[0])))
        return results


def _close_with(pipeline: Pipeline, stored) -> None:
    """Close `stored` (an external store's connection) once `pipeline` is gone: a reloading reader drops its
    old generation's pipeline, and a search still running on it holds it until that search ends."""
    import weakref

    weakref.finalize(pipeline, stored.close)


def _read(path: Path | str) -> tuple[Path | str, np.ndarray | None, str | None]:
    from shitu_cli.data.images import read_image

    try:
        return path, read_image(path), None
    except ShituError as exc:
        return path, None, exc.message


def _check_options(options: PipelineOptions) -> None:
    if options.topk < 1:
        raise BadInput(f"--topk must be at least 1, got {options.topk}")
    if options.whole_image not in WHOLE_IMAGE_POLICIES:
        raise BadInput(f"unknown whole-image policy {options.whole_image!r}", hint=f"choose one of: {', '.join(WHOLE_IMAGE_POLICIES)}")
    if options.max_boxes < 0:
        raise BadInput(f"--max-boxes must not be negative, got {options.max_boxes}")
    if not 0.0 < options.cover_thresh <= 1.0:
        raise BadInput(f"--cover-thresh must be in (0, 1], got {options.cover_thresh}", hint="1 turns the rule off")


def expand_all(targets: list[str]) -> list[Path]:
    """Several IMAGE / DIR / GLOB arguments (a glob the shell expanded arrives as many paths) -> image paths,
    in the order given, each file once."""
    paths: dict[Path, None] = {}
    for target in targets:
        paths.update(dict.fromkeys(expand_inputs(target)))
    return list(paths)


def expand_inputs(target: str) -> list[Path]:
    """IMAGE, DIR (recursively, image files only) or GLOB -> sorted image paths."""
    import glob

    from shitu_cli.data.images import iter_image_files

    path = Path(target)
    if path.is_dir():
        files = list(iter_image_files(path))
        if not files:
            raise BadInput("folder holds no image files", path=path)
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(target):
        files = sorted(Path(p) for p in glob.glob(target, recursive=True) if Path(p).is_file())
        if not files:
            raise BadInput(f"no files match {target!r}")
        return files
    raise BadInput("no such image, folder or glob", path=path)
