"""The gallery index: faiss backend, on-disk generations, id map, and the build/update entry point.

`from shitu_cli.index import build_index, load_index` is the library side of `shitu build-index`.
"""

from __future__ import annotations

from shitu_cli.index.build import BuildReport, build_index
from shitu_cli.index.store import StoredIndex, load_index

__all__ = ["BuildReport", "StoredIndex", "build_index", "load_index"]
