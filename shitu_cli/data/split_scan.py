"""What every split-dataset format shares: the report of skipped files, the in-memory outputs, and checking images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shitu_cli.data.split_rules import Plan
from shitu_cli.errors import BadInput

# A list line cannot hold these in a path; PaddleX 2 wrote `\` paths on Windows.
NEVER_IN_LIST_PATHS = ("\n", "\r", "\t", "\\")

Progress = Callable[[int, int], None]  # (images checked so far, images to check)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Built:
    """Everything a format produces, in memory, before anything touches the disk."""

    files: dict[str, bytes]
    plan: Plan
    skipped: list[Skipped]
    warnings: list[str]
    inputs: dict[str, object]
    extra: dict[str, object] = field(default_factory=dict)


def visible_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)]


def rel_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a COCO file_name may be absolute or climb out of the dataset
        return path.as_posix()


def unusable_name(path: Path, root: Path, is_image_name: Callable[[Path], bool]) -> str | None:
    if not is_image_name(path):
        return f"not an image file ({path.suffix or 'no extension'})"
    if any(c in rel_path(path, root) for c in NEVER_IN_LIST_PATHS):
        return "path holds a tab, newline or backslash, which a list line cannot hold"
    return None


def readable_images(root: Path, paths: list[Path], progress: Progress | None) -> tuple[set[Path], list[Skipped]]:
    """Decode every candidate and sort out the bad."""
    from concurrent.futures import ThreadPoolExecutor

    from shitu_cli.data.images import decode_problem

    good, bad = set(), []
    with ThreadPoolExecutor(max_workers=4) as pool:  # Pillow decodes outside the GIL
        for done, (path, reason) in enumerate(zip(paths, pool.map(decode_problem, paths)), start=1):
            if reason is None:
                good.add(path)
            else:
                bad.append(Skipped(rel_path(path, root), reason))
            if progress:
                progress(done, len(paths))
    return good, bad


def require_images(root: Path, found: int, usable: int, fmt: str) -> None:
    if found == 0:
        raise BadInput(f"no images found for a {fmt} dataset", hint=LAYOUT_HINTS[fmt], path=root)
    if usable == 0:
        raise BadInput(f"none of the {found} images can be read", hint="see which files are broken with any image viewer", path=root)


LAYOUT_HINTS = {
    "imagenet": "put images in one folder per class: DATASET/<class>/<image>.jpg",
    "rec": "put images in one folder per class: DATASET/<class>/<image>.jpg",
    "paddlex": "put images in one folder per class: DATASET/<class>/<image>.jpg",
    "paddlex-rec": "put images in one folder per class: DATASET/<class>/<image>.jpg",
    "coco": "list images in annotations.json and keep them in images/ or beside it",
    "voc": "put images in JPEGImages/ and one xml per image in Annotations/",
}


def sorted_skips(skips: list[Skipped]) -> list[Skipped]:
    return sorted(skips, key=lambda s: s.path)


def whole_set_warning(plan: Plan, total: int) -> list[str]:
    if plan.kept_in_train:
        return [f"only {total} usable image(s), too few to split; all kept in train"]
    return []
