"""Calibration and evaluation images: a list file (split-dataset formats), a COCO json (detectors) or a
folder, read lazily in preprocessed batches; unreadable images are skipped and remembered so the report
can name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shitu_cli.data.images import iter_image_files, read_image
from shitu_cli.errors import BadInput, ImageReadError
from shitu_cli.models.manifest import ModelManifest


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str | None  # class name or id as written in the list; None when unknown
    boxes: tuple[tuple[float, float, float, float, str], ...] | None = None  # det ground truth: x1, y1, x2, y2, class


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class ImageSet:
    source: Path
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)

    def subset(self, count: int) -> "ImageSet":
        """At most `count` samples spread evenly over the set (so every class of a sorted list shows up)."""
        if count <= 0 or count >= len(self.samples):
            return self
        picks = np.linspace(0, len(self.samples) - 1, count).round().astype(int)
        return ImageSet(self.source, [self.samples[i] for i in picks], self.skipped)


def load_image_set(path: Path | str, what: str) -> ImageSet:
    """Samples of a folder (label = first folder under it) or of a list file (imagenet, rec or voc lines)."""
    path = Path(path)
    if path.is_dir():
        samples = [Sample(p, _folder_label(p, path)) for p in iter_image_files(path)]
    elif path.is_file() and path.suffix.lower() == ".json":
        samples = _coco_samples(path)
    elif path.is_file():
        samples = _list_samples(path)
    else:
        raise BadInput(f"{what} not found", hint="pass a list file (e.g. val.txt) or a folder of images", path=path)
    if not samples:
        raise BadInput(f"{what} holds no images", hint="pass a list file or a folder with .jpg/.png images", path=path)
    return ImageSet(path, samples)


def _folder_label(image: Path, root: Path) -> str | None:
    parts = image.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _list_samples(list_path: Path) -> list[Sample]:
    """A VOC pair list (image xml) gives unlabelled images; any labelled list is read the way training reads it."""
    from shitu_cli.data.lists import list_image_root, read_labelled_list, read_pair_list

    text = list_path.read_text(encoding="utf-8-sig", errors="replace")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if "\t" not in first and first.rsplit(maxsplit=1)[-1].lower().endswith(".xml"):
        images = [image for image, _ in read_pair_list(list_path)]
        root = list_image_root(list_path, images)
        return [Sample(root / image, None) for image in images]
    return [Sample(entry.path, entry.label) for entry in read_labelled_list(list_path)]


def _coco_samples(json_path: Path) -> list[Sample]:
    """One sample per COCO image with its boxes (x, y, w, h -> x1, y1, x2, y2), as train-det reads the json."""
    from shitu_cli.train.det import coco_image_dir, read_coco

    document = read_coco(json_path)
    names = {c["id"]: str(c["name"]) for c in document["categories"]}
    boxes: dict[Any, list] = {image["id"]: [] for image in document["images"]}
    for ann in document["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if ann.get("image_id") in boxes and w > 0 and h > 0 and not ann.get("iscrowd", 0):
            boxes[ann["image_id"]].append((x, y, x + w, y + h, names.get(ann.get("category_id"), "?")))
    root = coco_image_dir(json_path.parent, document)
    return [Sample(root / image["file_name"], None, tuple(boxes[image["id"]])) for image in document["images"]]


def iter_readable(images: ImageSet) -> Iterator[tuple[np.ndarray, Sample]]:
    """(RGB image, sample) for each readable image; unreadable ones go to images.skipped once."""
    known_bad = {s.path for s in images.skipped}
    for sample in images.samples:
        if str(sample.path) in known_bad:
            continue
        try:
            rgb = read_image(sample.path)
        except ImageReadError as exc:
            images.skipped.append(Skipped(str(sample.path), exc.message))
            known_bad.add(str(sample.path))
            continue
        yield rgb, sample


def iter_batches(images: ImageSet, manifest: ModelManifest, batch_size: int) -> Iterator[tuple[np.ndarray, list[Sample]]]:
    """(float32 NCHW batch, its samples) per batch; unreadable images go to images.skipped once."""
    from shitu_cli.infer.preprocess import preprocess_batch

    pending: list[tuple[np.ndarray, Sample]] = []
    for rgb, sample in iter_readable(images):
        pending.append((rgb, sample))
        if len(pending) == batch_size:
            yield preprocess_batch([p[0] for p in pending], manifest.preprocess, manifest.input_size), [p[1] for p in pending]
            pending = []
    if pending:
        yield preprocess_batch([p[0] for p in pending], manifest.preprocess, manifest.input_size), [p[1] for p in pending]


def readable_count(images: ImageSet) -> int:
    bad = {s.path for s in images.skipped}
    return sum(1 for s in images.samples if str(s.path) not in bad)
