"""train-rec datasets: rec lists (train/gallery/query_list.txt, `path<TAB>label`) or class folders split
here into RUN_DIR/split, resolved to image paths and label indices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu_cli.artifacts import read_yaml, sha256_file
from shitu_cli.data.loader import LabeledImage
from shitu_cli.errors import BadInput
from shitu_cli.train.image_check import SkippedImage, unreadable_images
from shitu_cli.train.rec_settings import RecSettings

LISTS = ("train_list.txt", "gallery_list.txt", "query_list.txt")
SPLIT_DIR = "split"


@dataclass
class RecData:
    root: Path  # list paths are relative to this
    lists_dir: Path
    train: list[LabeledImage]
    gallery: list[LabeledImage]
    query: list[LabeledImage]
    train_classes: list[str]  # head index -> class name
    eval_labels: list[str]  # gallery/query label index -> name
    split: dict[str, Any] | None  # how a class-folder dataset was split, None for given lists
    list_files: list[Path]
    warnings: list[str] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)  # listed images that cannot be read, left out


def resolve_data(dataset: Path, run_dir: Path, settings: RecSettings) -> RecData:
    """Rec lists in `dataset` (split-dataset's output), or class folders split here into RUN_DIR/split."""
    dataset = Path(dataset)
    if not dataset.exists():
        raise BadInput("dataset folder not found", hint="pass a folder of class folders or of split-dataset rec lists", path=dataset)
    if not dataset.is_dir():
        raise BadInput("not a folder", hint="pass the dataset folder, not a file in it", path=dataset)
    dataset = dataset.resolve()
    if (dataset / "train_list.txt").is_file():
        return read_rec_lists(dataset)
    lists_dir, split, skipped = _split_here(dataset, run_dir, settings)
    data = read_rec_lists(lists_dir, split, check_images=False)  # split-dataset decoded every image already
    data.skipped = skipped
    return data


def _split_here(dataset: Path, run_dir: Path, settings: RecSettings) -> tuple[Path, dict[str, Any], list[SkippedImage]]:
    from shitu_cli.data.split import split_dataset

    out = Path(run_dir).resolve() / SPLIT_DIR
    if dataset in out.parents:
        raise BadInput("RUN_DIR is inside the dataset folder, whose class folders train-rec splits",
                       hint="put the run folder outside the dataset", path=run_dir)
    result = split_dataset(dataset, out=out, val=settings.holdout, test=settings.query_fraction,
                           seed=settings.seed, format="rec")
    split = {
        "dataset_dir": dataset.as_posix(), "lists_dir": f"{SPLIT_DIR}/", "core": "shitu_cli.data.split:split_dataset",
        "holdout": settings.holdout, "query_fraction": settings.query_fraction, "seed": settings.seed,
        "counts": dict(result.counts), "skipped": len(result.skipped),
    }
    return out, split, [SkippedImage(s.path, s.reason) for s in result.skipped]


def read_rec_lists(lists_dir: Path, split: dict[str, Any] | None = None, check_images: bool = True) -> RecData:
    """The rec lists in `lists_dir`; listed images that are missing or do not decode are left out and
    named in `skipped` (all of the training list unreadable is an error)."""
    from shitu_cli.data.lists import read_labels, read_rec_list

    entries = {name: read_rec_list(lists_dir / name) if (lists_dir / name).is_file() else [] for name in LISTS}
    train_file = lists_dir / "train_list.txt"
    if not entries["train_list.txt"]:
        raise BadInput("the training list is empty", hint="list `relpath<TAB>label` lines, or run shitu split-dataset --format rec", path=train_file)
    root = _image_root(lists_dir, entries["train_list.txt"][0][0], split)
    entries, skipped = _readable_entries(entries, root, train_file) if check_images else (entries, [])
    labels_file = lists_dir / "labels.txt"
    if labels_file.is_file():
        _check_labels(read_labels(labels_file), entries, lists_dir)
    warnings: list[str] = []
    train_classes = list(dict.fromkeys(label for _, label in entries["train_list.txt"]))
    train_classes.sort()
    if len(train_classes) < 2:
        raise BadInput(f"the training list has {len(train_classes)} class; training needs at least two", path=train_file)
    train = _labeled(root, entries["train_list.txt"], {name: i for i, name in enumerate(train_classes)}, train_file)
    gallery_rows, query_rows = entries["gallery_list.txt"], entries["query_list.txt"]
    _check_eval_lists(lists_dir, gallery_rows, query_rows, warnings)
    eval_labels = sorted({label for _, label in gallery_rows + query_rows})
    eval_index = {name: i for i, name in enumerate(eval_labels)}
    gallery = _labeled(root, gallery_rows, eval_index, lists_dir / "gallery_list.txt")
    query = _labeled(root, query_rows, eval_index, lists_dir / "query_list.txt")
    warnings += _small_class_warnings(entries["train_list.txt"])
    files = [lists_dir / name for name in (*LISTS, "labels.txt") if (lists_dir / name).is_file()]
    return RecData(root, lists_dir, train, gallery, query, train_classes, eval_labels, split, files, warnings, skipped)


def _readable_entries(entries: dict[str, list[tuple[str, str]]], root: Path,
                      train_file: Path) -> tuple[dict[str, list[tuple[str, str]]], list[SkippedImage]]:
    bad = unreadable_images([root / rel for rows in entries.values() for rel, _ in rows], root)
    if not bad:
        return entries, []
    kept = {name: [(rel, label) for rel, label in rows if root / rel not in bad] for name, rows in entries.items()}
    if not kept["train_list.txt"]:
        example = bad[root / entries["train_list.txt"][0][0]]
        raise BadInput(f"none of the images in train_list.txt can be read (e.g. {example.path}: {example.reason})",
                       hint=f"list paths are relative to the dataset folder ({root})", path=train_file)
    return kept, list(bad.values())


def _image_root(lists_dir: Path, first: str, split: dict[str, Any] | None) -> Path:
    """List paths are relative to the dataset dir; split-dataset --out may have put the lists elsewhere."""
    if split is not None:
        return Path(split["dataset_dir"])
    if (lists_dir / first).is_file():
        return lists_dir
    recipe = lists_dir / "recipe.yaml"
    if recipe.is_file():
        recorded = (read_yaml(recipe) or {}).get("options", {}).get("dataset_dir")
        if recorded and (Path(recorded) / first).is_file():
            return Path(recorded)
    return lists_dir


def _check_labels(known: list[str], entries: dict[str, list[tuple[str, str]]], lists_dir: Path) -> None:
    names = set(known)
    for list_name, rows in entries.items():
        for number, (_, label) in enumerate(rows, start=1):
            if label not in names:
                raise BadInput(
                    f"entry {number} has label {label!r}, which labels.txt does not name",
                    hint="make the lists and labels.txt come from the same split", path=lists_dir / list_name,
                )


def _check_eval_lists(lists_dir: Path, gallery: list, query: list, warnings: list[str]) -> None:
    if not gallery and not query:
        warnings.append("no gallery_list.txt / query_list.txt entries: training without evaluation, the last weights are exported")
        return
    for name, rows in (("gallery_list.txt", gallery), ("query_list.txt", query)):
        if not rows:
            raise BadInput("this list is empty or missing but its partner is not; evaluation needs both",
                           hint="split with shitu split-dataset --format rec", path=lists_dir / name)
    both = sorted({path for path, _ in gallery} & {path for path, _ in query})
    if both:
        raise BadInput(
            f"{len(both)} image(s) are in both query_list.txt and gallery_list.txt (e.g. {both[0]}); "
            "a query would find itself", hint="make query and gallery disjoint (shitu split-dataset --format rec does)",
            path=lists_dir,
        )
    unanswerable = {label for _, label in query} - {label for _, label in gallery}
    if unanswerable:
        warnings.append(f"{len(unanswerable)} query label(s) have no gallery image (e.g. {sorted(unanswerable)[0]!r}); those queries are not scored")


def _labeled(root: Path, rows: list[tuple[str, str]], index: dict[str, int], list_file: Path) -> list[LabeledImage]:
    samples = []
    for number, (rel, label) in enumerate(rows, start=1):
        path = root / rel
        if not path.is_file():
            raise BadInput(f"entry {number} names {rel}, which is not a file under {root}",
                           hint="list paths are relative to the dataset folder", path=list_file)
        samples.append(LabeledImage(path, index[label]))
    return samples


def _small_class_warnings(rows: list[tuple[str, str]]) -> list[str]:
    counts: dict[str, int] = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    single = sorted(name for name, n in counts.items() if n < 2)
    if not single:
        return []
    return [f"{len(single)} training class(es) have a single image (e.g. {single[0]!r}); "
            "PK batches repeat it, augmented, as its own positive"]


def list_checksums(data: RecData) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in data.list_files}
