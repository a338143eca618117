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

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq", "opq-ivfpq")
IVF_TYPES = ("ivf", "ivfpq", "opq-ivfpq")
METRIC = "inner_product"

# Below this many vectors exact search costs under ~2 ms a query (STACK.md: 0.7 ms at 10k x 512)
# and needs no training, so approximate indexes buy nothing worth their recall loss.
FLAT_BELOW = 30_000
# faiss's k-means wants at least ~39 training points per centroid.
MIN_POINTS_PER_CENTROID = 39
HNSW_M = 32
# faiss's default 40 builds a graph whose greedy walk gets stuck in the wrong cluster of a clustered 1M gallery:
# recall@1 levelled off at 0.92 (efSearch 1024). At 128 the tuning picks efSearch 96: recall@1 0.995, p99 1.2 ms,
# for a build 1.7x longer (benchmarks/index_bench.md).
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 64
# Past this many bytes of float32 vectors, auto compresses them with IVF-PQ (64 B a 512-d vector, not 2 KiB):
# 2M x 512-d. Below it IVF-Flat's exact distances cost little memory and keep recall@1 near 1.
PQ_FROM_BYTES = 4 * 2**30
# A flat coarse quantiser compares each query with every list centroid: at 1M vectors (4000 lists) that is
# half of a search's work. From this many lists, an HNSW graph over the centroids finds the nearest ones.
HNSW_QUANTIZER_FROM = 1024
REFINE_K_FACTOR = 8
SMALL_REFINE_K_FACTOR = 64
# OPQ alternates rotation and PQ training 50 times by default (minutes on 2 cores even for small galleries);
# the rotation's gain levels off after ~10.
OPQ_ITERATIONS = 10
OPQ_MIN_VECTORS = 256 * MIN_POINTS_PER_CENTROID
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


def external(index) -> bool:
    """Whether `index` is a vector store outside this process's faiss (index.milvus.MilvusVectors): the
    functions below hand such a store their work through its own add/remove/search/stored methods."""
    return bool(getattr(index, "external_store", False))


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


def choose_index(requested: str, count: int, removals_expected: bool = True, dim: int = 512) -> IndexChoice:
    """Pick the index type for `count` vectors: flat when small, IVF when large, IVF-PQ when the vectors
    outgrow memory, HNSW only on request."""
    if requested not in INDEX_TYPES:
        raise BadInput(f"unknown index type {requested!r}", hint=f"choose one of: {', '.join(INDEX_TYPES)}")
    if requested == "flat":
        return IndexChoice("flat", {}, "requested with --index-type flat")
    if requested == "hnsw":
        return IndexChoice("hnsw", _hnsw_params(), "requested with --index-type hnsw")
    if requested in IVF_TYPES:
        return _ivf_choice(count, f"requested with --index-type {requested}", "user", requested, dim)
    if count < FLAT_BELOW:
        return IndexChoice("flat", {}, f"{count} vectors < {FLAT_BELOW}: exact search is fast enough and needs no training", "auto")
    if not removals_expected:
        reason = f"{count} vectors >= {FLAT_BELOW} and --no-removals: HNSW searches fastest and needs no training"
        return IndexChoice("hnsw", _hnsw_params(), reason, "auto")
    if count * dim * 4 >= PQ_FROM_BYTES:
        why = (f"{count} x {dim}-d float32 vectors would take {count * dim * 4 / 2**30:.1f} GiB >= "
               f"{PQ_FROM_BYTES / 2**30:.0f} GiB: IVF-PQ stores each in a few dozen bytes")
        return _ivf_choice(count, why, "auto", "ivfpq", dim)
    return _ivf_choice(count, f"{count} vectors >= {FLAT_BELOW}: IVF keeps search fast and removes items in place", "auto")


def _hnsw_params() -> dict[str, Any]:
    return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}


def _ivf_choice(count: int, why: str, chosen_by: str, kind: str = "ivf", dim: int = 512) -> IndexChoice:
    from shitu_cli.index.sizing import pq_shape

    nlist = ivf_nlist(count)
    reason = f"{why}; nlist {nlist} ~ 4*sqrt(n) with >= {MIN_POINTS_PER_CENTROID} training points per list"
    if kind == "opq-ivfpq" and count < OPQ_MIN_VECTORS:
        # OPQ trains its rotation with 256-centroid codebooks, which k-means cannot fit on fewer points
        kind, reason = "ivfpq", f"{reason}; {count} vectors < {OPQ_MIN_VECTORS}, too few to train OPQ's rotation: IVF-PQ without it"
    params: dict[str, Any] = {"nlist": nlist, "nprobe": ivf_nprobe(nlist)}
    if nlist >= HNSW_QUANTIZER_FROM:
        params["quantizer"] = "hnsw"
    if kind != "ivf":
        params["m"], params["bits"] = pq_shape(dim, count)
        # PQ distances alone rank the exact nearest vector first for only ~1/3 of leave-one-out queries
        # (measured: 0.35 at 128-d, PQ16); re-ranking k_factor*k candidates on 8-bit scalar codes brings
        # recall@1 to the target, at 1 byte a dimension instead of 4.
        # Under 10k vectors the codes get < 8 bits and rank poorly: re-rank many more candidates (cheap at that size).
        params["refine"] = "SQ8"
        params["k_factor"] = REFINE_K_FACTOR if params["bits"] == 8 else SMALL_REFINE_K_FACTOR
    return IndexChoice(kind, params, reason, chosen_by)


def factory_string(choice: IndexChoice, dim: int) -> str:
    """faiss's index_factory name of an IVF-family choice, e.g. OPQ64,IVF4000_HNSW32,PQ64x8."""
    params = choice.params
    coarse = f"IVF{int(params['nlist'])}" + ("_HNSW32" if params.get("quantizer") == "hnsw" else "")
    if choice.type == "ivf":
        return f"{coarse},Flat"
    # "np": no polysemous training, which index_factory switches on by default and which took 110 s of a
    # 113 s IVF-PQ training on 3000 vectors here, for a code ordering shitu's searches never use
    codes = f"PQ{int(params['m'])}x{int(params.get('bits', 8))}np"
    if params.get("refine"):
        codes += f",Refine({params['refine']})"
    return (f"OPQ{int(params['m'])},{coarse},{codes}" if choice.type == "opq-ivfpq" else f"{coarse},{codes}")


def ivf_of(index):
    """The IndexIVF inside an IDMap2 (through an OPQ pre-transform if there is one), or None."""
    faiss = faiss_module()
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    try:
        return faiss.extract_index_ivf(inner)
    except RuntimeError:
        return None


def new_index(choice: IndexChoice, dim: int, training: np.ndarray | None = None):
    """An empty IndexIDMap2 of the chosen type; IVF is trained on `training` here."""
    faiss = faiss_module()
    if choice.type == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif choice.type == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(choice.params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(choice.params["ef_construction"])
    elif choice.type in IVF_TYPES:
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
    from shitu_cli.index.sizing import training_sample

    inner = faiss.index_factory(dim, factory_string(choice, dim), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(inner)
    ivf.cp.seed = 1234  # reproducible k-means
    ivf.cp.min_points_per_centroid = 1  # nlist is already sized for the data; tiny galleries need no warning
    pq_floor = 2 ** int(choice.params.get("bits", 0)) * 39 if choice.type != "ivf" else 0
    if choice.type == "opq-ivfpq":
        opq = faiss.downcast_VectorTransform(faiss.downcast_index(inner if not hasattr(inner, "base_index") else
                                                                  faiss.downcast_index(inner.base_index)).chain.at(0))
        opq.niter = OPQ_ITERATIONS
    inner.train(np.ascontiguousarray(training_sample(training, nlist, floor=pq_floor), dtype=np.float32))
    # A direct map lets us read vectors back, which removal and re-sync rebuild from (decoded, for PQ).
    ivf.make_direct_map()
    return inner


def apply_search_params(index, choice: IndexChoice) -> None:
    """Search-time knobs are not all stored by faiss, so set them from the manifest on every load."""
    if external(index):  # a vector store that keeps its own search settings
        index.apply_search_params(choice)
        return
    faiss = faiss_module()
    inner = faiss.downcast_index(index.index)
    if choice.type in IVF_TYPES:
        ivf = ivf_of(index)
        ivf.nprobe = int(choice.params["nprobe"])
        if choice.params.get("refine"):
            faiss.downcast_index(inner).k_factor = float(choice.params.get("k_factor", REFINE_K_FACTOR))
        if choice.params.get("quantizer") == "hnsw":
            # the graph must return nprobe good centroids; ef below ~2x that loses some of them
            faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(64, 2 * ivf.nprobe)
    elif choice.type == "hnsw":
        inner.hnsw.efSearch = int(choice.params["ef_search"])


def add(index, ids: np.ndarray, vectors: np.ndarray) -> None:
    if external(index):
        index.add(np.asarray(ids, dtype=np.int64), np.ascontiguousarray(vectors, dtype=np.float32))
    elif len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def stored(index) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, vectors) held by an index, in insertion order."""
    if external(index):
        return index.stored()
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
    if external(index):
        index.remove(doomed)
        return index
    if choice.type == "flat":
        index.remove_ids(doomed)
        return index
    ids, vectors = stored(index)
    keep = ~np.isin(ids, doomed)
    if choice.type in IVF_TYPES:
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
    if external(index):
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
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
    if external(index):
        return int(index.ntotal)
    inner = faiss_module().downcast_index(index.index) if hasattr(index, "id_map") else index
    ivf = ivf_of(index)
    if ivf is not None:
        return int(index.ntotal * ivf.nprobe / max(1, ivf.nlist))
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


def tune_search(index, choice: IndexChoice, ids: np.ndarray, vectors: np.ndarray, target: float,
                queries: np.ndarray | None = None):
    """Set IVF nprobe / HNSW efSearch to the cheapest value whose measured recall@1 reaches `target`
    (index.tuning says how; on held-out `queries` when given), record it in choice.params, and return the
    Tuning; None for exact indexes."""
    from shitu_cli.index import tuning

    if choice.type in IVF_TYPES:
        param, limit = "nprobe", int(choice.params["nlist"])
    elif choice.type == "hnsw":
        param, limit = "ef_search", max(tuning.EF_STEPS[-1], int(choice.params.get("ef_search", HNSW_EF_SEARCH)))
    else:
        return None
    if len(ids) < 2:
        return None

    def set_value(value: int) -> None:
        choice.params[param] = int(value)
        apply_search_params(index, choice)

    result = tuning.tune(param, limit, set_value, lambda queries, k: search(index, queries, k)[1],
                         np.asarray(ids, dtype=np.int64), np.asarray(vectors, dtype=np.float32), target,
                         queries=queries)
    choice.params.update(result.as_params())
    return result
