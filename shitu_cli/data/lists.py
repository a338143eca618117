"""Reading and writing the dataset list files: imagenet `path id`, voc `image xml`, rec `path<TAB>label`, labels.txt.

Two dialects of labelled lists exist, both PaddleClas's:
- `relpath class_id` separated by one space (ImageNetDataset's default delimiter), class
  names in labels.txt, one a line in id order. A path holding a space cannot be written
  this way, so such a list separates with a TAB instead (PaddleClas: `delimiter: "\\t"`).
- `relpath<TAB>label name` (the gallery lists of PP-ShiTu's build_gallery, `delimiter: "\\t"`).
`read_labelled_list` reads both, resolving paths against the dataset dir that the
split-dataset recipe beside the list names. Writers take `/` paths and return text with
`\\n` endings, so a caller can build every file before writing any; readers raise BadInput
naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from shitu_cli.errors import BadInput

SPACE, TAB = " ", "\t"
LABELS_FILE = "labels.txt"
PADDLEX_LABELS_FILE = "label.txt"  # PaddleX 3: `id name` a line
ID_LIST_FORMATS = ("imagenet", "paddlex", "paddlex-rec")  # split-dataset formats whose lists end in a class id
RECIPE_FILE = "recipe.yaml"


def image_list_text(entries: Iterable[tuple[str, int]], delimiter: str = SPACE) -> str:
    """`relpath label_id` lines (imagenet / PaddleClas classification lists); TAB-separated when `delimiter` says."""
    return "".join(f"{rel}{delimiter}{label_id}\n" for rel, label_id in entries)


def list_delimiter(rels: Iterable[str]) -> str:
    """The separator a `path class_id` list needs: a space unless some path holds one (PaddleClas splits at it)."""
    return TAB if any(" " in rel for rel in rels) else SPACE


def pair_list_text(entries: Iterable[tuple[str, str]]) -> str:
    """`image annotation` lines (voc detection lists)."""
    return "".join(f"{image} {xml}\n" for image, xml in entries)


def rec_list_text(entries: Iterable[tuple[str, str]]) -> str:
    """`relpath<TAB>label` lines; a TAB separates them so labels may contain spaces."""
    return "".join(f"{rel}\t{label}\n" for rel, label in entries)


def labels_text(names: Iterable[str]) -> str:
    return "".join(f"{name}\n" for name in names)


def paddlex_labels_text(names: Iterable[str]) -> str:
    """PaddleX 3's label.txt: `id name` lines, ids from 0 in order."""
    return "".join(f"{i} {name}\n" for i, name in enumerate(names))


def read_paddlex_labels(path: Path | str) -> dict[int, str]:
    """PaddleX 3's label.txt: id -> name (the name is everything after the first space)."""
    names = {}
    for number, line in _lines(path):
        fields = line.strip().split(maxsplit=1)
        if len(fields) != 2 or not _is_int(fields[0]):
            raise BadInput(f"line {number} is not `id name`: {line!r}", path=path)
        names[int(fields[0])] = fields[1]
    return names


def read_image_list(path: Path | str) -> list[tuple[str, int]]:
    """Entries of a `relpath label_id` list; the id is the last field, so a path may hold spaces."""
    entries = []
    for number, line in _lines(path):
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not _is_int(fields[1]):
            raise BadInput(f"line {number} is not `relpath label_id`: {line!r}", path=path)
        entries.append((_posix(fields[0]), int(fields[1])))
    return entries


def read_pair_list(path: Path | str) -> list[tuple[str, str]]:
    """Entries of an `image annotation` list (voc)."""
    entries = []
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise BadInput(f"line {number} is not `image annotation`: {line!r}", path=path)
        entries.append((_posix(fields[0]), _posix(fields[1])))
    return entries


def read_rec_list(path: Path | str) -> list[tuple[str, str]]:
    """Entries of a `relpath<TAB>label` list.

    A line without a TAB is read as PaddleClas's space-separated `relpath label`, split
    at the last space, so lists made by PaddleClas tools load too.
    """
    entries = []
    for number, line in _lines(path):
        fields = line.split("\t", 1) if "\t" in line else line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise BadInput(f"line {number} is not `relpath<TAB>label`: {line!r}", path=path)
        entries.append((_posix(fields[0]), fields[1]))
    return entries


def read_labels(path: Path | str) -> list[str]:
    """Class names, one a line, in id order; blank lines are refused since they would shift ids."""
    names = []
    for number, line in _lines(path, keep_blank=True):
        if not line.strip():
            raise BadInput(f"line {number} is blank; every line must name a class", path=path)
        names.append(line)
    return names


@dataclass(frozen=True)
class ListedImage:
    """One line of a labelled list, its path resolved against the list's image root."""

    path: Path
    label: str  # the class name: a class id is named through labels.txt beside the list when there is one
    label_id: int | None  # the id as written in a `path class_id` list; None where the list names its labels


def read_labelled_list(list_file: Path | str) -> list[ListedImage]:
    """Every entry of a labelled list, in either dialect (see the module docstring).

    A line with a TAB splits at its first TAB, any other at its last space. The label field
    is a class id when split-dataset's recipe beside the list says the lists are imagenet;
    with no such recipe, when a space-separated line ends in an integer, or a TAB-separated
    one in an integer that labels.txt does not name as a class. Ids are named through
    labels.txt beside the list. Paths are taken from `list_image_root`. Files that do not
    exist are returned too: the caller decides to skip or refuse them.
    """
    list_file = Path(list_file)
    recipe = _split_recipe(list_file.parent)
    labels_file = list_file.parent / LABELS_FILE
    class_names = set(read_labels(labels_file)) if recipe is None and labels_file.is_file() else set()
    paddlex_labels = list_file.parent / PADDLEX_LABELS_FILE
    if recipe is None and not class_names and paddlex_labels.is_file():
        class_names = set(read_paddlex_labels(paddlex_labels).values())
    rows = []
    for number, line in _lines(list_file):
        tabbed = TAB in line
        fields = line.split(TAB, 1) if tabbed else line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise BadInput(f"line {number} is not `relpath<TAB>label` or `relpath class_id`: {line!r}", path=list_file)
        rel, label = _posix(fields[0].strip()), fields[1].strip()
        if recipe is not None:
            is_id = recipe.get("format") in ID_LIST_FORMATS
        else:  # a TAB list of ids travelled without its recipe when labels.txt names no class like its label
            is_id = _is_int(label) and (not tabbed or (bool(class_names) and label not in class_names))
        if is_id and not _is_int(label):
            raise BadInput(f"line {number} should end in a class id: {line!r}", path=list_file)
        rows.append((number, rel, label, int(label) if is_id else None))
    names = _class_names(list_file, rows)
    root = list_image_root(list_file, [rel for _, rel, _, _ in rows])
    return [ListedImage(root / rel, names[label_id] if label_id is not None and names else label, label_id)
            for _, rel, label, label_id in rows]


def list_image_root(list_file: Path | str, rels: list[str] | None = None) -> Path:
    """The folder a list's relative paths start from.

    split-dataset writes paths relative to the dataset dir wherever `--out` puts the lists,
    and records that dir in the recipe.yaml beside them. That dir is used when it holds the
    first listed file; else the list's own folder (lists kept inside a dataset that moved).
    """
    list_file = Path(list_file).absolute()
    recipe = _split_recipe(list_file.parent)
    recorded = Path(recipe["dataset_dir"]) if recipe and isinstance(recipe.get("dataset_dir"), str) else None
    candidates = [c for c in (recorded, list_file.parent) if c is not None and c.is_dir()]
    first = next(iter(rels or []), None)
    for candidate in candidates:
        if first is None or (candidate / first).exists():
            return candidate
    return candidates[0] if candidates else list_file.parent


def _split_recipe(folder: Path) -> dict[str, Any] | None:
    """The options of the split-dataset recipe.yaml in `folder`, or None when there is none."""
    path = folder / RECIPE_FILE
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(data, dict) or data.get("command") != "split-dataset" or not isinstance(data.get("options"), dict):
        return None
    return data["options"]


def _class_names(list_file: Path, rows: list[tuple[int, str, str, int | None]]) -> list[str] | dict[int, str]:
    """labels.txt (or PaddleX's label.txt) beside the list, checked against the ids the list uses; [] when there is none."""
    ids = [(number, label_id) for number, _, _, label_id in rows if label_id is not None]
    labels_file = list_file.parent / LABELS_FILE
    paddlex_file = list_file.parent / PADDLEX_LABELS_FILE
    if ids and not labels_file.is_file() and paddlex_file.is_file():
        names = read_paddlex_labels(paddlex_file)
        for number, label_id in ids:
            if label_id not in names:
                raise BadInput(f"line {number} uses class id {label_id}, which {paddlex_file.name} does not name", path=list_file)
        return names
    if not ids or not labels_file.is_file():
        return []
    names = read_labels(labels_file)
    for number, label_id in ids:
        if not 0 <= label_id < len(names):
            raise BadInput(f"line {number} uses class id {label_id} but {labels_file.name} names {len(names)} classes",
                           hint="labels.txt must name one class per id, in id order", path=list_file)
    return names


def _lines(path: Path | str, keep_blank: bool = False) -> Iterable[tuple[int, str]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: lists saved by Windows editors start with a BOM
    except FileNotFoundError:
        raise BadInput("list file not found", path=path) from None
    except UnicodeDecodeError:
        raise BadInput("list file is not UTF-8 text", path=path) from None
    lines = text.split("\n")  # not splitlines(): it also breaks at \x1c, \u2028 and friends
    while keep_blank and lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is an editor habit, not a missing class
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if keep_blank or line.strip():
            yield number, line


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _posix(path: str) -> str:
    # PaddleX 2 wrote backslash paths on Windows; lists here always use `/`.
    return path.replace("\\", "/")
