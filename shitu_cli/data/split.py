"""Split a dataset folder into PaddleX-2-style lists (imagenet, coco, voc, rec): seeded, stratified, reproducible.

`split_groups` and `split_classes` (split_rules) are the pure splitting rules; `split_dataset`
scans a tree, checks every image (split_scan), builds every output in memory (class folders
here, VOC and COCO in split_detection), then writes them all or none, and a recipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from shitu_cli.data.lists import TAB, image_list_text, labels_text, list_delimiter, rec_list_text
from shitu_cli.data.split_detection import build_coco, build_voc, coco_candidates
from shitu_cli.data.split_paddlex import PADDLEX_FORMATS, paddlex_files
from shitu_cli.data.split_rules import PARTS, REC_PARTS, Plan, check_fractions, split_classes, split_groups
from shitu_cli.data.split_scan import (
    Built,
    Progress,
    Skipped,
    readable_images,
    rel_path,
    require_images,
    sorted_skips,
    unusable_name,
    visible_files,
)
from shitu_cli.errors import BadInput

__all__ = ["DEFAULT_SEED", "FORMATS", "PARTS", "REC_PARTS", "Plan", "Skipped", "SplitResult", "check_fractions",
           "resolve_format", "split_classes", "split_dataset", "split_groups"]

DEFAULT_SEED = 42
FORMATS = ("imagenet", "coco", "voc", "rec", "paddlex", "paddlex-rec")
CORE = "shitu_cli.data.split:split_dataset"


@dataclass
class SplitResult:
    format: str
    detected: str | None  # why auto chose this format; None when --format named it
    dataset_dir: Path
    out_dir: Path
    seed: int
    val: float
    test: float
    counts: dict[str, int]
    per_class: dict[str, dict[str, int]]
    skipped: list[Skipped]
    warnings: list[str]
    files: list[Path]
    recipe: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)  # format-specific counts (coco annotations)


# ----------------------------------------------------------------------------- entry point


def split_dataset(
    dataset_dir: Path | str,
    out: Path | str | None = None,
    val: float = 0.2,
    test: float = 0.1,
    seed: int = DEFAULT_SEED,
    format: str = "auto",
    progress: Progress | None = None,
) -> SplitResult:
    """Split `dataset_dir` into list files under `out` (default: the dataset dir) plus recipe.yaml.

    Paths in the lists are relative to the dataset dir wherever the lists go. Every
    output is built and validated before the first write.
    """
    root = _dataset_root(dataset_dir)
    check_fractions(val, test)
    fmt, detected = resolve_format(root, format)
    out_dir = Path(out).resolve() if out is not None else root
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput("--out is a file, not a folder", path=out_dir)
    built = _BUILDERS[fmt](root, out_dir, val, test, seed, progress)
    written = _write_all(out_dir, built.files)
    result = SplitResult(
        format=fmt, detected=detected, dataset_dir=root, out_dir=out_dir, seed=seed, val=val, test=test,
        counts={part: len(items) for part, items in built.plan.parts.items()},
        per_class=built.plan.per_group, skipped=built.skipped, warnings=built.warnings, files=written, extra=built.extra,
    )
    result.recipe = _write_recipe(result, built.inputs)
    return result


def _dataset_root(dataset_dir: Path | str) -> Path:
    root = Path(dataset_dir)
    if not root.exists():
        raise BadInput("dataset folder not found", hint="pass the folder holding your images", path=root)
    if not root.is_dir():
        raise BadInput("not a folder", hint="pass the dataset folder, not a file in it", path=root)
    return root.resolve()


def resolve_format(root: Path, requested: str) -> tuple[str, str | None]:
    """The format to use, and (for auto) a few words on why it was chosen."""
    if requested != "auto":
        if requested not in FORMATS:
            raise BadInput(f"unknown format {requested!r}", hint=f"use one of: auto, {', '.join(FORMATS)}")
        return requested, None
    if (root / "annotations.json").is_file() or coco_candidates(root):
        return "coco", "COCO annotations json"
    if (root / "JPEGImages").is_dir() and (root / "Annotations").is_dir():
        return "voc", "JPEGImages/ and Annotations/ folders"
    if any(_class_dirs(root, None)):
        return "imagenet", "one folder per class; pass --format rec for a retrieval split"
    raise BadInput(
        "cannot tell the dataset format: no class folders, COCO json or VOC folders",
        hint="put images in one folder per class, or pass --format",
        path=root,
    )


# ----------------------------------------------------------------------------- scanning and checking


def _class_dirs(root: Path, out_dir: Path | None) -> list[Path]:
    # A folder holding a recipe.yaml is an earlier split's output (--out inside the dataset), not a class.
    return [
        d for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".") and d != out_dir
        and not (d / "recipe.yaml").is_file() and _has_files(d)
    ]


def _has_files(folder: Path) -> bool:
    return any(p.is_file() for p in folder.rglob("*"))


def _scan_class_folders(root: Path, out_dir: Path, fmt: str) -> tuple[dict[str, list[Path]], list[Skipped]]:
    """Candidate images per class folder, and the files that cannot be used, with why."""
    from shitu_cli.data.images import is_image_name

    classes: dict[str, list[Path]] = {}
    skipped = []
    for class_dir in _class_dirs(root, out_dir):
        found = classes.setdefault(class_dir.name, [])
        for path in visible_files(class_dir):
            reason = unusable_name(path, root, is_image_name)
            if reason:
                skipped.append(Skipped(rel_path(path, root), reason))
            else:
                found.append(path)
    for path in sorted(root.iterdir()):
        if path.is_file() and is_image_name(path) and not path.name.startswith("."):
            skipped.append(Skipped(rel_path(path, root), "image outside any class folder"))
    return classes, skipped



# ----------------------------------------------------------------------------- formats


def _build_class_folders(root: Path, out_dir: Path, val: float, test: float, seed: int, progress: Progress | None, fmt: str) -> Built:
    candidates, skipped = _scan_class_folders(root, out_dir, fmt)
    all_paths = [p for paths in candidates.values() for p in paths]
    require_images(root, len(all_paths), len(all_paths), fmt)
    good, bad = readable_images(root, all_paths, progress)
    require_images(root, len(all_paths), len(good), fmt)
    groups = {name: [rel_path(p, root) for p in paths if p in good] for name, paths in candidates.items()}
    warnings = [f"class {name!r} has no readable images; left out of labels.txt" for name, items in groups.items() if not items]
    groups = {name: items for name, items in groups.items() if items}
    labels = sorted(groups)
    label_id = {name: i for i, name in enumerate(labels)}
    id_of = {rel: label_id[name] for name, items in groups.items() for rel in items}
    delimiter = list_delimiter(rel for items in groups.values() for rel in items)
    if fmt in ("rec", "paddlex-rec"):
        plan = split_classes(groups, val, test, seed)
        label_of = {rel: name for name, items in groups.items() for rel in items}
        files = {f"{part}_list.txt": _rec_list(plan.parts[part], label_of) for part in REC_PARTS}
        dialect = "path<TAB>label"
        warnings += _small_class_warnings(plan.kept_in_train, groups, "a single image cannot be held out (needs one gallery and one query image)")
        if val > 0 and not plan.parts["query"]:
            warnings.append("no class could be held out; gallery and query lists are empty")
    else:
        plan = split_groups(groups, val, test, seed)
        files = {f"{part}_list.txt": _image_list(plan.parts[part], id_of, delimiter) for part in PARTS}
        dialect = "path<TAB>class_id" if delimiter == TAB else "path class_id"
        warnings += _small_class_warnings(plan.kept_in_train, groups, "too few to split")
        if delimiter == TAB:
            warnings.append('some paths hold spaces, so the lists separate path and class id with a TAB: '
                            'in a PaddleClas dataset config set `delimiter: "\\t"`')
    files["labels.txt"] = labels_text(labels).encode("utf-8")
    if fmt in PADDLEX_FORMATS:
        files, dialect = paddlex_files(fmt, plan.parts, id_of, delimiter, labels)
    inputs = {"images_found": len(all_paths), "images_used": len(good), "files_skipped": len(skipped) + len(bad), "classes": len(labels)}
    return Built(files, plan, sorted_skips(skipped + bad), warnings, inputs, {"list_dialect": dialect})


def _image_list(rels: list[str], id_of: dict[str, int], delimiter: str) -> bytes:
    return image_list_text(((rel, id_of[rel]) for rel in rels), delimiter).encode("utf-8")


def _rec_list(rels: list[str], label_of: dict[str, str]) -> bytes:
    return rec_list_text((rel, label_of[rel]) for rel in rels).encode("utf-8")


def _small_class_warnings(names: list[str], groups: Mapping[str, Sequence[str]], why: str, limit: int = 5) -> list[str]:
    notes = [f"class {name!r} has {len(groups[name])} image(s), {why}; kept in train" for name in names[:limit]]
    if len(names) > limit:
        notes.append(f"... and {len(names) - limit} more classes kept whole in train for the same reason")
    return notes



def _build_imagenet(root, out_dir, val, test, seed, progress) -> Built:
    return _build_class_folders(root, out_dir, val, test, seed, progress, "imagenet")


def _build_rec(root, out_dir, val, test, seed, progress) -> Built:
    return _build_class_folders(root, out_dir, val, test, seed, progress, "rec")



def _build_paddlex(root, out_dir, val, test, seed, progress) -> Built:
    return _build_class_folders(root, out_dir, val, test, seed, progress, "paddlex")


def _build_paddlex_rec(root, out_dir, val, test, seed, progress) -> Built:
    return _build_class_folders(root, out_dir, val, test, seed, progress, "paddlex-rec")


_BUILDERS = {"imagenet": _build_imagenet, "rec": _build_rec, "voc": build_voc, "coco": build_coco,
             "paddlex": _build_paddlex, "paddlex-rec": _build_paddlex_rec}


# ----------------------------------------------------------------------------- writing


def _write_all(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file or none: all are staged as temp files first (where a full disk or a
    read-only folder shows), then renamed into place, which needs no space."""
    import os

    from shitu_cli.artifacts import staged_bytes
    from shitu_cli.errors import writing_to

    staged: list[tuple[Path, Path]] = []
    try:
        with writing_to(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                staged.append((staged_bytes(out_dir / name, data), out_dir / name))
            for temp, final in staged:
                os.replace(temp, final)
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)  # gone already once renamed
    return [final for _, final in staged]


def _write_recipe(result: SplitResult, inputs: dict[str, object]) -> Path:
    from shitu_cli.recipes import Recipe, write_recipe

    options = {
        "dataset_dir": result.dataset_dir.as_posix(),
        "out": result.out_dir.as_posix(),
        "val": result.val,
        "test": result.test,
        "seed": result.seed,
        "format": result.format,
    }
    from shitu_cli.errors import writing_to

    recipe = Recipe(command="split-dataset", core=CORE, options=options, seed=result.seed,
                    inputs=inputs, metrics={"counts": dict(result.counts), **_plain(result.extra)})
    with writing_to(result.out_dir):
        return write_recipe(result.out_dir, recipe, result.files)


def _plain(value):
    return json.loads(json.dumps(value))  # YAML-safe copy: plain dicts, lists and scalars only
