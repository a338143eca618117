"""Held-out query photos for `build-index --tune-queries`: the images a recall target is measured on instead of
leave-one-out gallery vectors (index.tuning says why that matters), embedded exactly as the gallery is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shitu_cli.errors import BadInput
from shitu_cli.index.items import Skipped

MIN_QUERIES = 20  # fewer cannot tell recall 0.99 from 0.95


def query_paths(source: Path) -> tuple[list[Path], list[Skipped]]:
    """Every image under a folder (labels not needed), or the images a gallery-style list file names."""
    from shitu_cli.data.images import iter_image_files
    from shitu_cli.index.items import read_gallery

    source = Path(source)
    if not source.exists():
        raise BadInput("--tune-queries not found", hint="pass a folder of query photos, e.g. split-dataset's val "
                       "images, or a list file", path=source)
    if source.is_file():
        pairs, skipped = read_gallery(source)
        return [path for path, _ in pairs], skipped
    paths = [path.resolve() for path in iter_image_files(source)]
    if not paths:
        raise BadInput("--tune-queries folder has no images", hint="put query photos (new photos of gallery "
                       "products, not the gallery's own) in it", path=source)
    return paths, []


def embed_queries(source: Path, embedder, main_object) -> tuple[np.ndarray, list[Skipped]]:
    """The query vectors (embedded as the gallery's images are: same model, same main-object crop) and the
    files skipped; refuses a set too small to measure a recall target on."""
    paths, skipped = query_paths(source)
    _, vectors, failures, _ = embedder.embed_files(paths, main_object=main_object)
    skipped = skipped + [Skipped(f.path, f"--tune-queries: {f.reason}") for f in failures]
    if len(vectors) < MIN_QUERIES:
        raise BadInput(f"--tune-queries has {len(vectors)} readable images; a recall target needs at least "
                       f"{MIN_QUERIES}", hint="add query photos, or leave --tune-queries out to tune on "
                       "leave-one-out gallery vectors", path=source)
    return np.ascontiguousarray(vectors, dtype=np.float32), skipped
