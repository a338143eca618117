"""Sizes of the faiss indexes shitu builds: product-quantiser shape, k-means training sample, and a memory
estimate a user sees before a large build starts.

The estimate counts the bytes faiss holds (codes, ids, centroids, graph links, id maps) plus the float32
vectors a build holds while it adds them; it is a planning figure, not a measurement (benchmarks/index_bench.md
sets it beside measured peaks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# faiss's k-means wants >= 39 points per centroid and samples down to 256 per centroid by itself. 64 per
# list trains lists nearly as well as 256 at a quarter of the time (a 1M-vector IVF4000 trained on all
# vectors took 6.3 min here); galleries are sampled down to this before training.
TRAIN_POINTS_PER_LIST = 64
PQ_BITS = 8  # one byte per sub-quantiser code: faiss's fast path
PQ_DIMS_PER_CODE = 8  # 512-d -> 64 bytes a vector (32x smaller than float32)
IDMAP_BYTES_PER_ID = 8 + 8 + 48  # IndexIDMap2: the id array, plus its reverse hash map (~48 B an entry in C++)
FLOAT_BYTES = 4


@dataclass
class MemoryEstimate:
    """Bytes an index will hold in memory, and the most a build holds at once (the index plus the input)."""

    index_bytes: int
    build_peak_bytes: int
    per_vector_bytes: float

    def as_text(self) -> str:
        return (f"~{human_bytes(self.index_bytes)} in memory ({self.per_vector_bytes:.0f} B a vector), "
                f"~{human_bytes(self.build_peak_bytes)} at the peak of the build")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def pq_shape(dim: int, count: int) -> tuple[int, int]:
    """(sub-quantisers m, bits per code): m divides dim, ~dim/8 of them; fewer bits when there are
    too few vectors to train 2^8 centroids per sub-quantiser (tiny test galleries)."""
    m = max(1, dim // PQ_DIMS_PER_CODE)
    while dim % m:
        m -= 1
    # faiss's k-means wants >= 39 training points per centroid: 2^bits centroids per sub-quantiser
    bits = PQ_BITS if count >= 2**PQ_BITS * 39 else max(1, int(math.log2(max(2, count // 39))))
    return m, bits


def training_sample(vectors: np.ndarray, nlist: int, floor: int = 0, seed: int = 1234) -> np.ndarray:
    """A random sample big enough to train `nlist` lists (and `floor` points for a product quantiser)."""
    wanted = max(nlist * TRAIN_POINTS_PER_LIST, floor)
    if len(vectors) <= wanted:
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), wanted, replace=False)
    return vectors[np.sort(rows)]


def estimate_memory(index_type: str, params: dict, count: int, dim: int) -> MemoryEstimate:
    """What an index of `count` vectors of `dim` floats will take; `params` as IndexChoice.params."""
    vector = dim * FLOAT_BYTES
    per = IDMAP_BYTES_PER_ID
    fixed = 0
    if index_type == "flat":
        per += vector
    elif index_type == "hnsw":
        # level 0 holds 2M links, upper levels ~M/(M-1)... of them: ~2.1M int32 links a vector
        per += vector + int(2.1 * int(params.get("M", 32))) * 4
    elif index_type in ("ivf", "ivfpq", "opq-ivfpq"):
        nlist = int(params.get("nlist", 1))
        per += 8 + 8  # the list's id entry and the direct map entry
        fixed += nlist * vector  # centroids
        if params.get("quantizer") == "hnsw":
            fixed += nlist * 2 * 32 * 4
        if index_type == "ivf":
            per += vector
        else:
            m, bits = int(params["m"]), int(params.get("bits", PQ_BITS))
            per += math.ceil(m * bits / 8)
            if params.get("refine") == "SQ8":
                per += dim  # one byte a dimension for re-ranking
            fixed += (2**bits) * dim * FLOAT_BYTES  # the PQ codebooks
            if index_type == "opq-ivfpq":
                fixed += dim * dim * FLOAT_BYTES  # the OPQ rotation
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    index_bytes = fixed + per * count
    # While building, the gallery's float32 vectors are held next to the index being filled.
    return MemoryEstimate(int(index_bytes), int(index_bytes + count * vector), per + fixed / max(1, count))
