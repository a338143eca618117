"""Sorting out the images a training list names that cannot be read, before training starts, so a run
skips them and names them (as build-index does) instead of stopping at the first one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class SkippedImage:
    path: str  # as the list names it (relative to the image root) when it can
    reason: str


def unreadable_images(paths: Sequence[Path], root: Path | None = None) -> dict[Path, SkippedImage]:
    """{path: why} for every path that does not decode (missing, not an image, corrupt, truncated)."""
    from shitu_cli.data.images import decode_problem

    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=4) as pool:
        reasons = list(pool.map(decode_problem, unique))
    return {path: SkippedImage(_shown(path, root), reason) for path, reason in zip(unique, reasons) if reason is not None}


def _shown(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)
