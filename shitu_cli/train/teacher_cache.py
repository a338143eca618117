"""Teacher outputs computed once per image view and kept on disk, keyed by image content.

A view is the whole image (view 0) or a seeded random crop of it (views 1..V-1), so the student can
see exactly the pixels the teacher saw, at its own size, without running the teacher during
training. Entries live under `<cache root>/<key>/<image sha256>.npy` ([V, dim] float32), where the
key hashes the teacher file, its output, its preprocessing and the view recipe: another teacher or
another view recipe never reads them. Each entry is written to a temp file and renamed into place;
an entry that does not load (a crash mid-write on a file system without atomic rename) is recomputed.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shitu_cli.artifacts import sha256_bytes, sha256_file
from shitu_cli.train.teachers import LoadedTeacher

CACHE_DIRNAME = "teacher-cache"
TEACHER_BATCH = 32


@dataclass(frozen=True)
class ViewSpec:
    """How view k of an image is cut: view 0 is the whole image; others rotate, crop and flip."""

    views: int = 2
    crop_scale_min: float = 0.5
    rotate_degrees: float = 10.0
    flip: bool = True
    seed: int = 0


def default_cache_root() -> Path:
    """$SHITU_HOME/teacher-cache (else $XDG_CACHE_HOME/shitu/teacher-cache): shared by every run."""
    from shitu_cli.bench.record import shitu_home

    return shitu_home() / CACHE_DIRNAME


def image_key(path: Path) -> str:
    return sha256_file(path)


def make_view(rgb: np.ndarray, key: str, view: int, spec: ViewSpec, size: tuple[int, int]) -> np.ndarray:
    """View `view` of an image at `size` (h, w). The crop depends only on (key, view, spec), never on
    `size`, so the teacher's view and the student's view are the same pixels at two resolutions."""
    import cv2

    from shitu_cli.data.transforms import random_flip, random_resized_crop, random_rotate

    if view == 0:  # bilinear, as inference preprocessing resizes ("linear"); area sampling blocks upscaled photos
        return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng([spec.seed, view, int(key[:15], 16)])
    rgb = random_rotate(rgb, spec.rotate_degrees, rng)
    rgb = random_resized_crop(rgb, size, rng, scale=(spec.crop_scale_min, 1.0))
    if spec.flip:
        rgb = random_flip(rgb, rng)
    return np.ascontiguousarray(rgb)


@dataclass
class CachedTargets:
    targets: np.ndarray  # [images, views, dim] float32, the teacher's raw outputs
    keys: list[str]  # image sha256 per row
    cache_dir: Path
    hits: int  # images whose outputs were read from the cache
    misses: int  # images the teacher ran on now
    teacher_images: int  # view images the teacher ran on (misses x views)


class TeacherCache:
    def __init__(self, root: Path, teacher: LoadedTeacher, spec: ViewSpec):
        self.teacher, self.spec = teacher, spec
        info = teacher.info
        described = {"teacher_sha256": info.sha256, "output": info.output, "input_size": list(info.input_size),
                     "mean": list(info.mean), "std": list(info.std), "channel_order": info.channel_order,
                     "views": asdict(spec), "view_code": 2}
        self.key = sha256_bytes(json.dumps(described, sort_keys=True).encode("utf-8"))[:20]
        self.dir = Path(root) / self.key
        self.described = {**described, "teacher": info.path}

    def targets(self, paths: Sequence[Path], num_workers: int = 2,
                on_progress: Callable[[int, int], None] | None = None) -> CachedTargets:
        """The teacher's outputs for every view of every image, from the cache or computed now."""
        from shitu_cli.artifacts import write_yaml

        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "about.yaml").is_file():
            write_yaml(self.dir / "about.yaml", self.described)
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            keys = list(pool.map(image_key, paths))
        rows: dict[str, np.ndarray] = {}
        missing: list[int] = []
        for i, key in enumerate(keys):
            if key in rows:
                continue
            entry = self._read(key)
            if entry is None:
                missing.append(i)
                rows[key] = None  # type: ignore[assignment]  # filled below
            else:
                rows[key] = entry
        ran_before = self.teacher.calls
        self._compute([(keys[i], paths[i]) for i in missing], rows, num_workers, on_progress)
        return CachedTargets(np.stack([rows[k] for k in keys]), keys, self.dir, hits=len(set(keys)) - len(missing),
                             misses=len(missing), teacher_images=self.teacher.calls - ran_before)

    def _read(self, key: str) -> np.ndarray | None:
        path = self.dir / f"{key}.npy"
        if not path.is_file():
            return None
        try:
            entry = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if entry.ndim != 2 or entry.shape != (self.spec.views, self.teacher.info.dim) or not np.isfinite(entry).all():
            return None
        return entry.astype(np.float32, copy=False)

    def _write(self, key: str, entry: np.ndarray) -> None:
        # No fsync: a cache entry lost to a crash is only recomputed; the rename keeps it whole or absent.
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, entry.astype(np.float32), allow_pickle=False)
            os.replace(tmp, self.dir / f"{key}.npy")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _compute(self, todo: list[tuple[str, Path]], rows: dict, num_workers: int,
                 on_progress: Callable[[int, int], None] | None) -> None:
        from shitu_cli.data.images import read_image

        size, views = self.teacher.info.input_size, self.spec.views
        per_call = max(1, TEACHER_BATCH // views)

        def cut(item: tuple[str, Path]) -> list[np.ndarray]:
            rgb = read_image(item[1])
            return [make_view(rgb, item[0], v, self.spec, size) for v in range(views)]

        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            for start in range(0, len(todo), per_call):
                chunk = todo[start : start + per_call]
                cut_views = [v for group in pool.map(cut, chunk) for v in group]
                out = self.teacher.run(cut_views).reshape(len(chunk), views, -1)
                for (key, _), entry in zip(chunk, out):
                    self._write(key, entry)
                    rows[key] = entry
                if on_progress is not None:
                    on_progress(min(start + per_call, len(todo)), len(todo))
