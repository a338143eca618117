"""The faiss side of the gallery index: choosing, building, searching and shrinking an IndexIDMap2.

Every index is inner product on L2-normalised float32 vectors, wrapped in IndexIDMap2 so
ids are stable int64s that survive removals and rebuilds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
METRIC = "inner_product"

# Below this many vectors exact search costs under ~2 ms a query (STACK.md: 0.7 ms at 10k x 512)
# and needs no training, so approximate indexes buy nothing worth their recall loss.
FLAT_BELOW = 30_000
# faiss's k-means wants at least ~39 training points per centroid.
MIN_POINTS_PER_CENTROID = 39
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40  # faiss default. index_bench at 100k: 80 built ~3x slower, recall@1 0.987 -> 1.000
HNSW_EF_SEARCH = 64
# One query on an 18-vector flat index took 0.11 ms on one OMP thread and 6.8 ms on two (STACK.md): waking a
# thread team costs more than a small scan. 2M vector comparisons (512-d) are ~2 ms of work for one thread;
# below that a search runs on one thread.
PARALLEL_SEARCH_FROM = 2_000_000
_thread_budget: int | None = None  # set_threads's; None: faiss's own default (all cores)


@dataclass
class IndexChoice:
    """What kind of faiss index to build, with which parameters, and why."""

    type: str  # flat | hnsw | ivf
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    chosen_by: str = "user"  # "auto" when picked from gallery size


def faiss_module():
    """Import faiss quietly: its loader logs harmless 'could not load swigfaiss_avx2' lines."""
    logging.getLogger("faiss.loader").setLevel(logging.ERROR)
    import faiss

    return faiss


def ivf_nlist(count: int) -> int:
    """~4*sqrt(n) lists (autofaiss's rule of thumb), capped so k-means has enough points per list."""
    return max(1, min(int(round(4 * math.sqrt(count))), count // MIN_POINTS_PER_CENTROID))


def ivf_nprobe(nlist: int) -> int:
    # Probing ~1/16 of the lists keeps recall@1 near exact on clustered galleries at a fraction of the cost.
    return max(1, min(nlist, int(math.ceil(nlist / 16))))


def choose_index(requested: str, count: int, removals_expected: bool = True) -> IndexChoice:
    """Pick the index type for `count` vectors: flat when small, IVF when large, HNSW only on request."""
    if requested not in INDEX_TYPES:
        raise BadInput(f"unknown index type {requested!r}", hint=f"choose one of: {', '.join(INDEX_TYPES)}")
    if requested == "flat":
        return IndexChoice("flat", {}, "requested with --index-type flat")
    if requested == "hnsw":
        return IndexChoice("hnsw", _hnsw_params(), "requested with --index-type hnsw")
    if requested == "ivf":
        return _ivf_choice(count, "requested with --index-type ivf", "user")
    if count < FLAT_BELOW:
        return IndexChoice("flat", {}, f"{count} vectors < {FLAT_BELOW}: exact search is fast enough and needs no training", "auto")
    if not removals_expected:
        reason = f"{count} vectors >= {FLAT_BELOW} and --no-removals: HNSW searches fastest and needs no training"
        return IndexChoice("hnsw", _hnsw_params(), reason, "auto")
    return _ivf_choice(count, f"{count} vectors >= {FLAT_BELOW}: IVF keeps search fast and removes items in place", "auto")


def _hnsw_params() -> dict[str, Any]:
    return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}


def _ivf_choice(count: int, why: str, chosen_by: str) -> IndexChoice:
    nlist = ivf_nlist(count)
    reason = f"{why}; nlist {nlist} ~ 4*sqrt(n) with >= {MIN_POINTS_PER_CENTROID} training points per list"
    return IndexChoice("ivf", {"nlist": nlist, "nprobe": ivf_nprobe(nlist)}, reason, chosen_by)


def new_index(choice: IndexChoice, dim: int, training: np.ndarray | None = None):
    """An empty IndexIDMap2 of the chosen type; IVF is trained on `training` here."""
    faiss = faiss_module()
    if choice.type == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif choice.type == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(choice.params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(choice.params["ef_construction"])
    elif choice.type == "ivf":
        inner = _trained_ivf(faiss, choice, dim, training)
    else:
        raise ValueError(f"unknown index type {choice.type!r}")
    index = faiss.IndexIDMap2(inner)
    apply_search_params(index, choice)
    return index


def _trained_ivf(faiss, choice: IndexChoice, dim: int, training: np.ndarray | None):
    nlist = int(choice.params["nlist"])
    if training is None or len(training) < nlist:
        found = 0 if training is None else len(training)
        raise BadInput(f"an IVF index with {nlist} lists needs at least {nlist} vectors to train on, got {found}",
                       hint="use --index-type flat for a gallery this small")
    inner = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    inner.cp.seed = 1234  # reproducible k-means
    inner.cp.min_points_per_centroid = 1  # nlist is already sized for the data; tiny galleries need no warning
    inner.train(np.ascontiguousarray(training, dtype=np.float32))
    # A direct map lets us read vectors back, which removal and re-sync rebuild from.
    inner.make_direct_map()
    return inner


def apply_search_params(index, choice: IndexChoice) -> None:
    """Search-time knobs are not all stored by faiss, so set them from the manifest on every load."""
    faiss = faiss_module()
    inner = faiss.downcast_index(index.index)
    if choice.type == "ivf":
        inner.nprobe = int(choice.params["nprobe"])
    elif choice.type == "hnsw":
        inner.hnsw.efSearch = int(choice.params["ef_search"])


def add(index, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def stored(index) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, vectors) held by an index, in insertion order."""
    faiss = faiss_module()
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    if index.ntotal == 0:
        return ids, np.zeros((0, index.d), np.float32)
    vectors = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)
    return ids, np.asarray(vectors, dtype=np.float32)


def remove(index, choice: IndexChoice, ids_to_remove: np.ndarray):
    """Return an index without `ids_to_remove`.

    Flat removes in place. HNSW cannot remove at all, and IndexIDMap2 over IVF corrupts
    its id map on removal (IVF does not renumber internal ids the way IDMap assumes), so
    both are rebuilt from the vectors they hold; IVF keeps its trained quantizer.
    """
    faiss = faiss_module()
    doomed = np.asarray(ids_to_remove, dtype=np.int64)
    if not len(doomed):
        return index
    if choice.type == "flat":
        index.remove_ids(doomed)
        return index
    ids, vectors = stored(index)
    keep = ~np.isin(ids, doomed)
    if choice.type == "ivf":
        inner = faiss.clone_index(faiss.downcast_index(index.index))
        inner.reset()
        rebuilt = faiss.IndexIDMap2(inner)
        apply_search_params(rebuilt, choice)
    else:
        rebuilt = new_index(choice, index.d)
    add(rebuilt, ids[keep], vectors[keep])
    return rebuilt


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) each [n, k]; missing neighbours have id -1. Small searches run on one thread."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    faiss = faiss_module()
    budget = _thread_budget or faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(search_threads(index, len(queries), budget))
    try:
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    finally:
        faiss.omp_set_num_threads(budget)  # adding and training keep the whole budget
    return scores, ids


def search_threads(index, queries: int, budget: int) -> int:
    """OMP threads for one search: the budget only when enough vectors are scanned to pay for waking them."""
    return budget if scanned_vectors(index) * max(1, queries) >= PARALLEL_SEARCH_FROM else 1


def scanned_vectors(index) -> int:
    """About how many stored vectors one query compares with: all of a flat index, nprobe lists of an IVF,
    a few hundred graph nodes of an HNSW."""
    inner = faiss_module().downcast_index(index.index) if hasattr(index, "id_map") else index
    if hasattr(inner, "nprobe") and hasattr(inner, "nlist"):
        return int(index.ntotal * inner.nprobe / max(1, inner.nlist))
    if hasattr(inner, "hnsw"):
        return min(int(index.ntotal), int(inner.hnsw.efSearch) * HNSW_M)
    return int(index.ntotal)


def to_bytes(index) -> bytes:
    return faiss_module().serialize_index(index).tobytes()


def from_bytes(data: bytes):
    faiss = faiss_module()
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def set_threads(threads: int) -> None:
    """The thread budget for building, adding and large searches (small searches take one thread)."""
    global _thread_budget
    _thread_budget = max(1, int(threads))
    faiss_module().omp_set_num_threads(_thread_budget)
