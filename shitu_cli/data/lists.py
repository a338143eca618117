"""Reading and writing the dataset list files: imagenet `path id`, voc `image xml`, rec `path<TAB>label`, labels.txt.

Writers take `/` paths and return text with `\\n` endings, so a caller can build every
file before writing any; readers raise BadInput naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from shitu_cli.errors import BadInput


def image_list_text(entries: Iterable[tuple[str, int]]) -> str:
    """`relpath label_id` lines (imagenet / PaddleClas classification lists)."""
    return "".join(f"{rel} {label_id}\n" for rel, label_id in entries)


def pair_list_text(entries: Iterable[tuple[str, str]]) -> str:
    """`image annotation` lines (voc detection lists)."""
    return "".join(f"{image} {xml}\n" for image, xml in entries)


def rec_list_text(entries: Iterable[tuple[str, str]]) -> str:
    """`relpath<TAB>label` lines; a TAB separates them so labels may contain spaces."""
    return "".join(f"{rel}\t{label}\n" for rel, label in entries)


def labels_text(names: Iterable[str]) -> str:
    return "".join(f"{name}\n" for name in names)


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
