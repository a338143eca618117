"""Turning a gallery update into an index: which type the update wants, and whether the committed index takes it
in place (add, remove) or is rebuilt from its stored vectors plus the new ones (then tuned for a recall target)."""

from __future__ import annotations

import numpy as np

import shitu_cli.index.backend as backend
from shitu_cli.index.backend import IndexChoice
from shitu_cli.index.store import StoredIndex
from shitu_cli.index.stores import StoreSpec

# An IVF quantizer trained on n vectors still partitions well up to a few times n; past
# that the lists grow long and uneven, so the index is retrained from stored vectors.
IVF_RETRAIN_GROWTH = 4


def wanted_choice(current: StoredIndex | None, index_type: str, count: int, removals_expected, notes,
                   store: StoreSpec | None = None, dim: int = 512) -> IndexChoice:
    if current is not None and index_type == "auto" and current.manifest.choice.chosen_by == "user":
        choice = current.manifest.choice  # an explicit --index-type earlier is not undone by the default
        choice.params = {**choice.params}
        return choice
    if removals_expected is None:
        removals_expected = current.manifest.index.get("removals_expected", True) if current else True
    choice = backend.choose_index(index_type, count, removals_expected, dim)
    if store is not None and store.backend == "milvus" and choice.chosen_by == "auto" and choice.type not in ("flat", "ivf", "hnsw"):
        choice = backend.choose_index("ivf", count, removals_expected, dim)  # Milvus spreads memory over its nodes
        choice.chosen_by, choice.reason = "auto", f"{count} vectors on Milvus: IVF (Milvus spreads the vectors over its nodes)"
    choice.params = {**choice.params}
    return choice


def apply_update(current: StoredIndex | None, wanted: IndexChoice, drop, new_ids, vectors, final_count, notes, dim,
           store: StoreSpec | None = None, target_recall: float | None = None, tune_queries: np.ndarray | None = None):
    """Update the current index in place when it still fits, else rebuild from its stored vectors
    (and then choose nprobe / efSearch for `target_recall`). Given held-out `tune_queries`, the setting is measured
    on them, and re-chosen after an in-place update too.

    `current` is None when there is no index, its vectors came from another model, or they live elsewhere.
    """
    store = store or StoreSpec()
    if current is not None and still_fits(current, wanted, final_count):
        choice = current.manifest.choice
        index = backend.remove(current.index, choice, np.array(drop, dtype=np.int64))
        if drop and choice.type == "hnsw":
            notes.append(f"HNSW cannot remove in place: rebuilt it from its {index.ntotal} stored vectors")
        backend.add(index, new_ids, vectors)
        if tune_queries is not None and target_recall is not None:
            _tune(index, choice, *backend.stored(index), target_recall, tune_queries, notes)
        return index, choice
    old_ids, old_vectors = kept_vectors(current, drop, dim)
    all_ids, all_vectors = np.concatenate([old_ids, new_ids]), np.concatenate([old_vectors, vectors])
    if len(old_ids):
        notes.append(f"rebuilt as {wanted.type} from {len(old_ids)} stored vectors and {len(new_ids)} new ones")
    if wanted.type in backend.IVF_TYPES:
        wanted.params["trained_on"] = final_count
    index = store.new_index(wanted, dim, all_vectors, current)
    backend.add(index, all_ids, all_vectors)
    if target_recall is not None:
        _tune(index, wanted, all_ids, all_vectors, target_recall, tune_queries, notes)
    return index, wanted


def _tune(index, choice: IndexChoice, ids, vectors, target_recall: float, queries, notes: list[str]) -> None:
    tuned = backend.tune_search(index, choice, ids, vectors, target_recall, queries=queries)
    if tuned is not None:
        notes.append(f"search setting {tuned.as_text()}")


def still_fits(current: StoredIndex, wanted: IndexChoice, count: int) -> bool:
    have = current.manifest.choice
    if have.type != wanted.type:
        return False
    if backend.external(current.index):
        return True  # Milvus indexes its own segments as they fill
    if have.type in backend.IVF_TYPES:
        return count <= IVF_RETRAIN_GROWTH * int(have.params.get("trained_on", count))
    return True


def kept_vectors(current, drop, dim) -> tuple[np.ndarray, np.ndarray]:
    if current is None:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids, vectors = backend.stored(current.index)
    keep = ~np.isin(ids, np.array(drop, dtype=np.int64))
    return ids[keep], vectors[keep]
