"""faiss search threads: small searches run on one OMP thread, large ones on the budget set_threads gives."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.index import backend


def _index(kind: str, n: int, dim: int = 8):
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    choice = backend.choose_index(kind, n)
    index = backend.new_index(choice, dim, training=vectors if kind == "ivf" else None)
    backend.add(index, np.arange(n, dtype=np.int64), vectors)
    return index, vectors


@pytest.fixture
def budget_restored():
    faiss = backend.faiss_module()
    before, saved = faiss.omp_get_max_threads(), backend._thread_budget
    yield
    backend._thread_budget = saved
    faiss.omp_set_num_threads(before)


def test_a_small_gallery_is_searched_on_one_thread_a_large_batch_on_the_budget():
    index, _ = _index("flat", 18)
    assert backend.search_threads(index, 1, budget=2) == 1
    many = backend.PARALLEL_SEARCH_FROM // 18 + 1  # as many comparisons as pay for a thread team
    assert backend.search_threads(index, many, budget=2) == 2
    assert backend.search_threads(index, many, budget=1) == 1


def test_an_ivf_index_counts_only_the_lists_it_probes():
    index, _ = _index("ivf", 2000)
    inner = backend.faiss_module().downcast_index(index.index)
    assert backend.scanned_vectors(index) == int(2000 * inner.nprobe / inner.nlist) < 2000
    hnsw, _ = _index("hnsw", 50)
    assert backend.scanned_vectors(hnsw) == 50  # a graph smaller than one search's reach


def test_search_keeps_the_budget_for_adding_and_gives_the_same_answers(budget_restored):
    faiss = backend.faiss_module()
    index, vectors = _index("flat", 300)
    backend.set_threads(2)
    scores, ids = backend.search(index, vectors[:5], 3)
    assert faiss.omp_get_max_threads() == 2  # restored after a one-thread search
    assert np.array_equal(ids[:, 0], np.arange(5))
    backend.set_threads(1)
    same_scores, same_ids = backend.search(index, vectors[:5], 3)
    assert np.array_equal(ids, same_ids) and np.allclose(scores, same_scores)
