"""Split a dataset folder into PaddleX-2-style lists (imagenet, coco, voc, rec): seeded, stratified, reproducible.

`split_groups` and `split_classes` are the pure splitting rules; `split_dataset` scans a
tree, checks every image, builds every output in memory, then writes them and a recipe.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Mapping, Sequence

from shitu_cli.data.lists import TAB, image_list_text, labels_text, list_delimiter, pair_list_text, rec_list_text
from shitu_cli.errors import BadInput

DEFAULT_SEED = 42
FORMATS = ("imagenet", "coco", "voc", "rec")
PARTS = ("train", "val", "test")
REC_PARTS = ("train", "gallery", "query")
CORE = "shitu_cli.data.split:split_dataset"

# A list line cannot hold these in a path; PaddleX 2 wrote `\` paths on Windows.
_NEVER_IN_LIST_PATHS = ("\n", "\r", "\t", "\\")

Progress = Callable[[int, int], None]  # (images checked so far, images to check)


# ----------------------------------------------------------------------------- pure rules


@dataclass
class Plan:
    """Which items went where. `parts` lists are sorted; `kept_in_train` names groups too small to split."""

    parts: dict[str, list[str]]
    per_group: dict[str, dict[str, int]]
    kept_in_train: list[str] = field(default_factory=list)


def check_fractions(val: float, test: float) -> None:
    for name, value in (("--val", val), ("--test", test)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise BadInput(f"{name} must be a fraction in [0, 1), got {value!r}", hint="e.g. --val 0.2 --test 0.1")
    if val + test >= 1:
        raise BadInput(f"--val {val} + --test {test} leaves nothing to train on", hint="make --val + --test less than 1")


def split_groups(groups: Mapping[str, Sequence[str]], val: float, test: float, seed: int) -> Plan:
    """Stratified train/val/test split of each group's items.

    Each group keeps at least one training item and gets floor or ceil of its exact share
    of val and test; the totals are round(N * fraction), the leftover units going to the
    groups with the largest remainders (ties in seeded order). A group with fewer items
    than parts requested stays whole in train.
    """
    check_fractions(val, test)
    needed = 1 + (val > 0) + (test > 0)
    names = sorted(groups)
    big = [g for g in names if len(groups[g]) >= needed]
    small = [g for g in names if len(groups[g]) < needed]
    sizes = [len(groups[g]) for g in big]
    n_val = _apportion(sizes, val, [n - 1 for n in sizes], _tiebreak(big, seed, "val"))
    n_test = _apportion(sizes, test, [n - 1 - v for n, v in zip(sizes, n_val)], _tiebreak(big, seed, "test"))
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    per_group = {}
    for name, nv, nt in zip(big, n_val, n_test):
        items = _shuffled(groups[name], seed, name)
        chunks = {"val": items[:nv], "test": items[nv : nv + nt], "train": items[nv + nt :]}
        for part in PARTS:
            parts[part].extend(chunks[part])
        per_group[name] = {p: len(chunks[p]) for p in PARTS}
    for name in small:
        parts["train"].extend(groups[name])
        per_group[name] = {"train": len(groups[name]), "val": 0, "test": 0}
    return Plan({p: sorted(items) for p, items in parts.items()}, dict(sorted(per_group.items())), small)


def split_classes(groups: Mapping[str, Sequence[str]], val: float, test: float, seed: int) -> Plan:
    """Retrieval split: held-out classes feed gallery and query only, never train.

    round(classes * val) classes are held out (at least one when val > 0 and there are
    two classes); only classes with 2+ items qualify. Each held-out class gives
    max(1, round(n * test)) items to query, keeping at least one for the gallery.
    """
    check_fractions(val, test)
    names = sorted(groups)
    eligible = [g for g in names if len(groups[g]) >= 2]
    n_held = _round(len(names) * Fraction(repr(val)))
    if val > 0 and len(names) >= 2:
        n_held = max(n_held, 1)
    n_held = min(n_held, len(eligible), max(len(names) - 1, 0))
    held = set(_shuffled(eligible, seed, "held-out classes")[:n_held])
    parts: dict[str, list[str]] = {p: [] for p in REC_PARTS}
    per_group = {}
    for name in names:
        items = _shuffled(groups[name], seed, name)
        if name in held:
            n_query = min(len(items) - 1, max(1, _round(len(items) * Fraction(repr(test)))))
            chunks = {"train": [], "query": items[:n_query], "gallery": items[n_query:]}
        else:
            chunks = {"train": items, "query": [], "gallery": []}
        for part in REC_PARTS:
            parts[part].extend(chunks[part])
        per_group[name] = {p: len(chunks[p]) for p in REC_PARTS}
    single = [g for g in names if len(groups[g]) < 2] if val > 0 else []
    return Plan({p: sorted(items) for p, items in parts.items()}, per_group, single)


def _apportion(sizes: list[int], fraction: float, caps: list[int], tiebreak: list[int]) -> list[int]:
    """Largest-remainder apportionment of round(sum * fraction) units, each group within its cap."""
    exact = [n * Fraction(repr(fraction)) for n in sizes]  # repr: 0.1 means 1/10, not its binary cousin
    counts = [min(math.floor(e), cap) for e, cap in zip(exact, caps)]
    remaining = min(_round(sum(exact)), sum(caps)) - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), tiebreak[i]))
    for limit in (lambda i: math.ceil(exact[i]), lambda i: caps[i]):  # ceil first; past it only if caps forced a floor down
        for i in by_remainder:
            if remaining > 0 and counts[i] < min(limit(i), caps[i]):
                counts[i] += 1
                remaining -= 1
    return counts


def _round(value: Fraction | float) -> int:
    return math.floor(value + Fraction(1, 2))  # half up, not Python's round-half-even


def _shuffled(items: Sequence[str], seed: int, salt: str) -> list[str]:
    # One RNG per group, seeded by (seed, group): adding a class leaves the others' splits alone.
    result = sorted(items)
    random.Random(f"{seed}/{salt}").shuffle(result)
    return result


def _tiebreak(names: list[str], seed: int, salt: str) -> list[int]:
    order = {name: rank for rank, name in enumerate(_shuffled(names, seed, f"tiebreak/{salt}"))}
    return [order[name] for name in names]


# ----------------------------------------------------------------------------- the report


@dataclass
class Skipped:
    path: str
    reason: str


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


@dataclass
class _Built:
    """Everything a format produces, in memory, before anything touches the disk."""

    files: dict[str, bytes]
    plan: Plan
    skipped: list[Skipped]
    warnings: list[str]
    inputs: dict[str, object]
    extra: dict[str, object] = field(default_factory=dict)


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
    if (root / "annotations.json").is_file() or _coco_candidates(root):
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


def _visible_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)]


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a COCO file_name may be absolute or climb out of the dataset
        return path.as_posix()


def _scan_class_folders(root: Path, out_dir: Path, fmt: str) -> tuple[dict[str, list[Path]], list[Skipped]]:
    """Candidate images per class folder, and the files that cannot be used, with why."""
    from shitu_cli.data.images import is_image_name

    classes: dict[str, list[Path]] = {}
    skipped = []
    for class_dir in _class_dirs(root, out_dir):
        found = classes.setdefault(class_dir.name, [])
        for path in _visible_files(class_dir):
            reason = _unusable_name(path, root, is_image_name)
            if reason:
                skipped.append(Skipped(_rel(path, root), reason))
            else:
                found.append(path)
    for path in sorted(root.iterdir()):
        if path.is_file() and is_image_name(path) and not path.name.startswith("."):
            skipped.append(Skipped(_rel(path, root), "image outside any class folder"))
    return classes, skipped


def _unusable_name(path: Path, root: Path, is_image_name: Callable[[Path], bool]) -> str | None:
    if not is_image_name(path):
        return f"not an image file ({path.suffix or 'no extension'})"
    if any(c in _rel(path, root) for c in _NEVER_IN_LIST_PATHS):
        return "path holds a tab, newline or backslash, which a list line cannot hold"
    return None


def _readable(root: Path, paths: list[Path], progress: Progress | None) -> tuple[set[Path], list[Skipped]]:
    """Decode every candidate (JPEGs at 1/8 scale, which still reads every byte) and sort out the bad."""
    from concurrent.futures import ThreadPoolExecutor

    from shitu_cli.data.images import read_image
    from shitu_cli.errors import ImageReadError

    def check(path: Path) -> str | None:
        try:
            read_image(path, max_side=32)
        except ImageReadError as exc:
            return exc.message
        return None

    good, bad = set(), []
    with ThreadPoolExecutor(max_workers=4) as pool:  # Pillow decodes outside the GIL
        for done, (path, reason) in enumerate(zip(paths, pool.map(check, paths)), start=1):
            if reason is None:
                good.add(path)
            else:
                bad.append(Skipped(_rel(path, root), reason))
            if progress:
                progress(done, len(paths))
    return good, bad


def _require_images(root: Path, found: int, usable: int, fmt: str) -> None:
    if found == 0:
        raise BadInput(f"no images found for a {fmt} dataset", hint=_LAYOUT_HINTS[fmt], path=root)
    if usable == 0:
        raise BadInput(f"none of the {found} images can be read", hint="see which files are broken with any image viewer", path=root)


_LAYOUT_HINTS = {
    "imagenet": "put images in one folder per class: DATASET/<class>/<image>.jpg",
    "rec": "put images in one folder per class: DATASET/<class>/<image>.jpg",
    "coco": "list images in annotations.json and keep them in images/ or beside it",
    "voc": "put images in JPEGImages/ and one xml per image in Annotations/",
}


# ----------------------------------------------------------------------------- formats


def _build_class_folders(root: Path, out_dir: Path, val: float, test: float, seed: int, progress: Progress | None, fmt: str) -> _Built:
    candidates, skipped = _scan_class_folders(root, out_dir, fmt)
    all_paths = [p for paths in candidates.values() for p in paths]
    _require_images(root, len(all_paths), len(all_paths), fmt)
    good, bad = _readable(root, all_paths, progress)
    _require_images(root, len(all_paths), len(good), fmt)
    groups = {name: [_rel(p, root) for p in paths if p in good] for name, paths in candidates.items()}
    warnings = [f"class {name!r} has no readable images; left out of labels.txt" for name, items in groups.items() if not items]
    groups = {name: items for name, items in groups.items() if items}
    labels = sorted(groups)
    if fmt == "rec":
        plan = split_classes(groups, val, test, seed)
        label_of = {rel: name for name, items in groups.items() for rel in items}
        files = {f"{part}_list.txt": _rec_list(plan.parts[part], label_of) for part in REC_PARTS}
        dialect = "path<TAB>label"
        warnings += _small_class_warnings(plan.kept_in_train, groups, "a single image cannot be held out (needs one gallery and one query image)")
        if val > 0 and not plan.parts["query"]:
            warnings.append("no class could be held out; gallery and query lists are empty")
    else:
        plan = split_groups(groups, val, test, seed)
        label_id = {name: i for i, name in enumerate(labels)}
        id_of = {rel: label_id[name] for name, items in groups.items() for rel in items}
        delimiter = list_delimiter(rel for items in groups.values() for rel in items)
        files = {f"{part}_list.txt": _image_list(plan.parts[part], id_of, delimiter) for part in PARTS}
        dialect = "path<TAB>class_id" if delimiter == TAB else "path class_id"
        warnings += _small_class_warnings(plan.kept_in_train, groups, "too few to split")
        if delimiter == TAB:
            warnings.append('some paths hold spaces, so the lists separate path and class id with a TAB: '
                            'in a PaddleClas dataset config set `delimiter: "\\t"`')
    files["labels.txt"] = labels_text(labels).encode("utf-8")
    inputs = {"images_found": len(all_paths), "images_used": len(good), "files_skipped": len(skipped) + len(bad), "classes": len(labels)}
    return _Built(files, plan, _sorted_skips(skipped + bad), warnings, inputs, {"list_dialect": dialect})


def _image_list(rels: list[str], id_of: dict[str, int], delimiter: str) -> bytes:
    return image_list_text(((rel, id_of[rel]) for rel in rels), delimiter).encode("utf-8")


def _rec_list(rels: list[str], label_of: dict[str, str]) -> bytes:
    return rec_list_text((rel, label_of[rel]) for rel in rels).encode("utf-8")


def _small_class_warnings(names: list[str], groups: Mapping[str, Sequence[str]], why: str, limit: int = 5) -> list[str]:
    notes = [f"class {name!r} has {len(groups[name])} image(s), {why}; kept in train" for name in names[:limit]]
    if len(names) > limit:
        notes.append(f"... and {len(names) - limit} more classes kept whole in train for the same reason")
    return notes


def _sorted_skips(skips: list[Skipped]) -> list[Skipped]:
    return sorted(skips, key=lambda s: s.path)


def _build_imagenet(root, out_dir, val, test, seed, progress) -> _Built:
    return _build_class_folders(root, out_dir, val, test, seed, progress, "imagenet")


def _build_rec(root, out_dir, val, test, seed, progress) -> _Built:
    return _build_class_folders(root, out_dir, val, test, seed, progress, "rec")


# --- voc


def _build_voc(root: Path, out_dir: Path, val: float, test: float, seed: int, progress: Progress | None) -> _Built:
    from shitu_cli.data.images import is_image_name

    image_dir, xml_dir = root / "JPEGImages", root / "Annotations"
    for folder in (image_dir, xml_dir):
        if not folder.is_dir():
            raise BadInput("a voc dataset needs this folder", hint=_LAYOUT_HINTS["voc"], path=folder)
    labels, bad_xml, skipped = set(), set(), []
    for xml in _visible_files(xml_dir):
        if xml.suffix.lower() == ".xml":
            names = _voc_object_names(xml)
            if names is None:
                bad_xml.add(xml)
                skipped.append(Skipped(_rel(xml, root), "not valid VOC xml"))
            labels.update(names or ())
    pairs = {}
    for image in _visible_files(image_dir):
        xml = (xml_dir / image.relative_to(image_dir)).with_suffix(".xml")
        reason = _unusable_name(image, root, is_image_name)
        if not reason and any(c.isspace() for c in _rel(image, root)):
            reason = "path holds whitespace, which a voc list line cannot hold"
        if not reason and not xml.is_file():
            reason = f"no annotation {_rel(xml, root)}"
        if not reason and xml in bad_xml:
            reason = "its annotation is not valid VOC xml"
        if reason:
            skipped.append(Skipped(_rel(image, root), reason))
        else:
            pairs[image] = xml
    found = len(pairs) + sum(1 for s in skipped if s.path.startswith("JPEGImages/"))
    _require_images(root, found, found, "voc")
    if not pairs:
        raise BadInput(f"none of the {found} images has a usable annotation", hint=_LAYOUT_HINTS["voc"], path=xml_dir)
    good, bad = _readable(root, list(pairs), progress)
    _require_images(root, found, len(good), "voc")
    xml_of = {_rel(image, root): _rel(xml, root) for image, xml in pairs.items() if image in good}
    plan = split_groups({"": list(xml_of)}, val, test, seed)
    files = {f"{part}_list.txt": pair_list_text((rel, xml_of[rel]) for rel in plan.parts[part]).encode("utf-8") for part in PARTS}
    files["labels.txt"] = labels_text(sorted(labels)).encode("utf-8")
    warnings = _whole_set_warning(plan, len(xml_of))
    plan.per_group = {}
    inputs = {"images_found": found, "images_used": len(good), "files_skipped": len(skipped) + len(bad), "classes": len(labels)}
    return _Built(files, plan, _sorted_skips(skipped + bad), warnings, inputs)


def _voc_object_names(xml: Path) -> list[str] | None:
    """Object class names in a VOC xml, or None when it is not parseable VOC."""
    import xml.etree.ElementTree as ElementTree

    try:
        tree = ElementTree.parse(xml)
    except (ElementTree.ParseError, OSError):
        return None
    return [name.text.strip() for name in tree.getroot().iterfind("object/name") if name.text and name.text.strip()]


def _whole_set_warning(plan: Plan, total: int) -> list[str]:
    if plan.kept_in_train:
        return [f"only {total} usable image(s), too few to split; all kept in train"]
    return []


# --- coco


def _coco_candidates(root: Path) -> list[Path]:
    # train/val/test.json are an earlier split's outputs (--out annotations/), not the source.
    folder = root / "annotations"
    found = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [p for p in found if p.name not in {f"{part}.json" for part in PARTS}]


def _coco_file(root: Path) -> Path:
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    found = _coco_candidates(root)
    if not found:
        raise BadInput("no annotations.json or annotations/*.json", hint=_LAYOUT_HINTS["coco"], path=root)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise BadInput(f"found {len(found)} annotation files ({names}); cannot tell which to split", hint="keep one json in annotations/", path=root / "annotations")
    return found[0]


def _load_coco(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON (line {exc.lineno}: {exc.msg})", path=path) from None
    except UnicodeDecodeError:
        raise BadInput("not UTF-8 text", path=path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise BadInput("not a COCO file: no `images` list", path=path)
    ids = set()
    for image in doc["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise BadInput(f"an image entry lacks `id` or `file_name`: {str(image)[:80]}", path=path)
        if image["id"] in ids:
            raise BadInput(f"image id {image['id']!r} appears twice", path=path)
        ids.add(image["id"])
    if not isinstance(doc.get("annotations", []), list):
        raise BadInput("`annotations` is not a list", path=path)
    return doc


def _build_coco(root: Path, out_dir: Path, val: float, test: float, seed: int, progress: Progress | None) -> _Built:
    ann_path = _coco_file(root)
    doc = _load_coco(ann_path)
    image_roots = [d for d in (root / "images", ann_path.parent, root) if d.is_dir()]
    located, skipped = {}, []
    for image in doc["images"]:
        name = image["file_name"].replace("\\", "/")
        path = next((r / name for r in image_roots if (r / name).is_file()), None)
        if path is None:  # named where it was first looked for, relative to the dataset like every skip
            skipped.append(Skipped(_rel(image_roots[0] / name, root), "listed in the annotations but no such file"))
        else:
            located[path] = image
    _require_images(root, len(doc["images"]), len(doc["images"]), "coco")
    if not located:
        raise BadInput(f"none of the {len(doc['images'])} images it lists were found", hint=_LAYOUT_HINTS["coco"], path=ann_path)
    good, bad = _readable(root, list(located), progress)
    _require_images(root, len(doc["images"]), len(good), "coco")
    kept = {str(located[p]["id"]): located[p] for p in located if p in good}
    plan = split_groups({"": list(kept)}, val, test, seed)
    anns = [(str(a.get("image_id")) if isinstance(a, dict) else None, a) for a in doc.get("annotations", [])]
    annotated = {image_id for image_id, _ in anns}
    files, extra = {}, {"annotations": {}, "unannotated_images": {}}
    for part in PARTS:
        members = set(plan.parts[part])
        images = [_posix_file_name(img) for img in doc["images"] if str(img["id"]) in members]
        part_anns = [a for image_id, a in anns if image_id in members]  # crowd ones too: PaddleX 2 dropped them
        files[f"{part}.json"] = _coco_bytes(doc, images, part_anns)
        extra["annotations"][part] = len(part_anns)
        extra["unannotated_images"][part] = sum(1 for img in images if str(img["id"]) not in annotated)
    listed = {str(img["id"]) for img in doc["images"]}
    orphans = sum(1 for image_id, _ in anns if image_id not in listed)
    dropped = sum(1 for image_id, _ in anns if image_id in listed and image_id not in kept)
    warnings = _whole_set_warning(plan, len(kept))
    if orphans:
        warnings.append(f"{orphans} annotation(s) point at no listed image; left out")
    if dropped:
        warnings.append(f"{dropped} annotation(s) belong to skipped images; left out")
    if sum(extra["unannotated_images"].values()):
        warnings.append(f"{sum(extra['unannotated_images'].values())} image(s) have no annotations; kept (as background)")
    extra["annotation_file"] = _rel(ann_path, root)
    plan.per_group = {}
    inputs = {"images_listed": len(doc["images"]), "images_used": len(kept), "files_skipped": len(skipped) + len(bad),
              "annotations": len(doc.get("annotations", [])), "categories": len(doc.get("categories", []))}
    return _Built(files, plan, _sorted_skips(skipped + bad), warnings, inputs, extra)


def _posix_file_name(image: dict) -> dict:
    return {**image, "file_name": image["file_name"].replace("\\", "/")}


def _coco_bytes(doc: dict, images: list, anns: list) -> bytes:
    # Every other top-level key (info, licenses, categories, ...) is kept as it was.
    out = {key: value for key, value in doc.items()}
    out["images"], out["annotations"] = images, anns
    return (json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


_BUILDERS = {"imagenet": _build_imagenet, "rec": _build_rec, "voc": _build_voc, "coco": _build_coco}


# ----------------------------------------------------------------------------- writing


def _write_all(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file or none: all are staged as temp files first (where a full disk or a
    read-only folder shows), then renamed into place, which needs no space."""
    import os

    from shitu_cli.errors import writing_to

    staged: list[tuple[Path, Path]] = []
    try:
        with writing_to(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                staged.append((_stage(out_dir / name, data), out_dir / name))
            for temp, final in staged:
                os.replace(temp, final)
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)  # gone already once renamed
    return [final for _, final in staged]


def _stage(path: Path, data: bytes) -> Path:
    """`data` in a synced temp file beside `path`, with the permissions a new file would get."""
    import os
    import tempfile

    from shitu_cli.artifacts import current_umask

    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


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
