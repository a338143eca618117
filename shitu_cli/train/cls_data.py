"""train-cls datasets: imagenet-style lists (train_list.txt, val_list.txt, labels.txt) or class folders
split into the run dir, resolved to image paths and class names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.data.loader import LabeledImage
from shitu_cli.errors import BadInput
from shitu_cli.models.manifest import Preprocess
from shitu_cli.train.image_check import SkippedImage, unreadable_images

SPLIT_DIR = "split"
# Eval resizes the short side to input_size / EVAL_CROP, then centre-crops: 224 -> 256 -> 224, as ppcls does.
EVAL_CROP = 224 / 256


@dataclass
class ClsData:
    """A classification dataset resolved to absolute image paths and class names."""

    root: Path  # list paths are relative to this
    labels: list[str]
    train: list[LabeledImage]
    val: list[LabeledImage]
    lists_dir: Path
    split: dict[str, Any] | None = None  # set when train-cls split a class-folder tree itself
    skipped: list[SkippedImage] = field(default_factory=list)  # listed images that cannot be read, left out


def resolve_dataset(dataset: Path, run_dir: Path, val_fraction: float, seed: int) -> ClsData:
    """Lists in the dataset dir (train_list.txt, val_list.txt, labels.txt; either PaddleClas dialect,
    paths relative to the dataset dir that split-dataset's recipe beside them names), or a class-folder
    tree split here into RUN_DIR/split (the dataset folder itself is left untouched)."""
    dataset = Path(dataset)
    if not dataset.exists():
        raise BadInput("dataset not found", hint="pass a folder with train_list.txt + labels.txt, or class folders", path=dataset)
    if not dataset.is_dir():
        raise BadInput("not a folder", hint="pass the dataset folder", path=dataset)
    if (dataset / "train_list.txt").is_file():
        return read_lists(dataset.resolve(), check_images=True)
    from shitu_cli.data.split import split_dataset

    result = split_dataset(dataset, out=Path(run_dir) / SPLIT_DIR, val=val_fraction, test=0.0, seed=seed, format="imagenet")
    data = read_lists(result.out_dir, check_images=False)  # split-dataset decoded every image already
    data.skipped = [SkippedImage(s.path, s.reason) for s in result.skipped]
    data.split = {"dir": SPLIT_DIR, "val": val_fraction, "seed": seed, "counts": dict(result.counts),
                  "skipped": len(result.skipped), "warnings": list(result.warnings)}
    return data


def read_lists(lists_dir: Path, check_images: bool = True) -> ClsData:
    """train/val lists and labels.txt in `lists_dir`; unreadable images are left out and named in `skipped`."""
    from shitu_cli.data.lists import list_image_root, read_labelled_list, read_labels

    label_file = lists_dir / "labels.txt"
    if not label_file.is_file():
        raise BadInput("labels.txt is missing beside train_list.txt", hint="run `shitu split-dataset` to write it", path=label_file)
    labels = read_labels(label_file)
    if len(set(labels)) != len(labels):
        dup = next(name for name in labels if labels.count(name) > 1)
        raise BadInput(f"class {dup!r} is listed twice", path=label_file)
    ids = {name: i for i, name in enumerate(labels)}
    list_files = {part: lists_dir / f"{part}_list.txt" for part in ("train", "val")}
    parts: dict[str, list[LabeledImage]] = {}
    for part, list_file in list_files.items():
        if not list_file.is_file():
            raise BadInput(f"{list_file.name} is missing", hint="split with a validation share, e.g. `shitu split-dataset DIR --val 0.2`", path=list_file)
        parts[part] = [LabeledImage(entry.path, _label_id(entry, ids, number, list_file))
                       for number, entry in enumerate(read_labelled_list(list_file), start=1)]
        if not parts[part]:
            raise BadInput(f"{list_file.name} lists no images", hint="split with more images or a larger --val", path=list_file)
    root = list_image_root(list_files["train"], [])
    bad = unreadable_images([s.path for s in parts["train"] + parts["val"]], root) if check_images else {}
    for part, list_file in list_files.items():
        kept = [s for s in parts[part] if s.path not in bad]
        if not kept:
            example = bad[parts[part][0].path]
            raise BadInput(f"none of the {len(parts[part])} images in {list_file.name} can be read "
                           f"(e.g. {example.path}: {example.reason})", path=list_file,
                           hint=f"list paths are relative to the dataset folder ({root})")
        parts[part] = kept
    return ClsData(root, labels, parts["train"], parts["val"], lists_dir, skipped=list(bad.values()))


def _label_id(entry, ids: dict[str, int], number: int, list_file: Path) -> int:
    if entry.label_id is not None:
        return entry.label_id
    if entry.label not in ids and entry.label.isdigit():
        # A TAB-separated `path<TAB>class_id` list (split-dataset writes them when paths hold spaces)
        # that travelled without the recipe saying so: a number labels.txt does not name is an id.
        label_id = int(entry.label)
        if label_id >= len(ids):
            raise BadInput(f"line {number} uses class id {label_id} but labels.txt names {len(ids)} classes",
                           hint="labels.txt must name one class per id, in id order", path=list_file)
        return label_id
    if entry.label not in ids:
        raise BadInput(f"line {number} has label {entry.label!r}, which labels.txt does not name",
                       hint="make the lists and labels.txt come from the same split", path=list_file)
    return ids[entry.label]


def _unlabeled_images(folder: Path | None) -> list[LabeledImage]:
    if not folder:
        return []
    from shitu_cli.data.images import iter_image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput("--unlabeled folder not found", path=folder)
    images = [LabeledImage(p, -1) for p in iter_image_files(folder)]
    if not images:
        raise BadInput("--unlabeled folder holds no images", path=folder)
    return images


def eval_preprocess(input_size: int) -> Preprocess:
    return Preprocess(resize="short", resize_short=int(round(input_size / EVAL_CROP)))


def _epoch_batches(count: int, batch_size: int, rng_order: np.ndarray) -> list[list[int]]:
    """Shuffled full batches; a last partial batch is dropped (batch norm dislikes a batch of 1)."""
    if count <= batch_size:
        return [list(rng_order)]
    return [list(rng_order[i : i + batch_size]) for i in range(0, count - batch_size + 1, batch_size)]
