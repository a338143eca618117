"""Choosing an approximate index's search setting (IVF nprobe, HNSW efSearch) from a measured recall target.

The queries are a sample of the gallery's own vectors, each searched with ITSELF EXCLUDED: its answer is the
nearest OTHER vector, as a new photo of a product is nearest to the gallery's photos of it without being one
of them. A perturbed copy of a gallery vector would be nearest to its original, which an IVF finds in the
original's own list almost always: that measures nothing. recall@1 is the share of queries whose first
non-self result scores (exactly, against the stored float32 vectors) as high as the exact nearest other vector;
ties count as hits. The cheapest setting reaching the target is kept.

Leave-one-out assumes a query is as close to its product's gallery photos as they are to each other: stricter
than needed when real queries are near-copies of gallery photos, optimistic when they are farther, and a step
easy for HNSW (a query that is itself a graph node is easy to reach). Given held-out query vectors instead (new
photos of gallery products, embedded as the gallery is: `build-index --tune-queries DIR`), the recall is measured
on what users will search: each query's first result against the exact best over the whole gallery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

DEFAULT_TARGET_RECALL = 0.99
SAMPLE_QUERIES = 500
EXACT_CHUNK = 65_536  # gallery rows per matrix product in the exact search (500 x 64k floats = 128 MB)
TIE_TOLERANCE = 1e-5
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
EF_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass
class Tuning:
    """The chosen setting and the recall curve that chose it (recorded in the manifest's index params)."""

    param: str  # nprobe | ef_search
    value: int
    recall: float
    target: float
    queries: int
    reached: bool
    curve: dict[int, float] = field(default_factory=dict)
    proxy: str = "leave-one-out"  # or "held-out": the queries were not gallery vectors

    def as_params(self) -> dict:
        return {self.param: self.value, "tuned": {"target_recall": self.target, "recall_at_1": round(self.recall, 4),
                                                  "queries": self.queries, "proxy": self.proxy,
                                                  "reached": self.reached,
                                                  "curve": {int(k): round(v, 4) for k, v in self.curve.items()}}}

    def as_text(self) -> str:
        got = f"recall@1 {self.recall:.3f} on {self.queries} {self.proxy} queries"
        if self.reached:
            return f"{self.param} {self.value}: the cheapest reaching recall@1 >= {self.target} ({got})"
        return f"{self.param} {self.value}: target recall@1 {self.target} NOT reached; the best measured ({got})"


def candidate_values(param: str, limit: int) -> list[int]:
    steps = NPROBE_STEPS if param == "nprobe" else EF_STEPS
    values = [v for v in steps if v < limit] + [limit]
    return sorted(set(values))


def exact_neighbours(vectors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sampled row: the best inner product with any OTHER row, and that row's position."""
    queries = vectors[rows]
    best = np.full(len(rows), -np.inf, dtype=np.float32)
    where = np.full(len(rows), -1, dtype=np.int64)
    for start in range(0, len(vectors), EXACT_CHUNK):
        scores = queries @ vectors[start:start + EXACT_CHUNK].T
        own = (rows >= start) & (rows < start + len(scores[0]))
        scores[np.flatnonzero(own), rows[own] - start] = -np.inf  # never the query itself
        top = scores.argmax(axis=1)
        value = scores[np.arange(len(rows)), top]
        better = value > best
        best[better], where[better] = value[better], start + top[better]
    return best, where


def recall_at_1(found_ids: np.ndarray, self_ids: np.ndarray, queries: np.ndarray, best: np.ndarray,
                vector_of: Callable[[np.ndarray], np.ndarray]) -> float:
    """Share of queries whose first result that is not the query itself scores as high as the exact best."""
    hits = 0
    firsts = []
    for row, own in zip(found_ids, self_ids):
        others = row[(row != own) & (row >= 0)]
        firsts.append(others[0] if len(others) else -1)
    firsts = np.array(firsts, dtype=np.int64)
    valid = firsts >= 0
    if valid.any():
        true_scores = np.einsum("ij,ij->i", queries[valid], vector_of(firsts[valid]))
        hits = int((true_scores >= best[valid] - TIE_TOLERANCE).sum())
    return hits / len(self_ids)


def exact_best(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each held-out query: the best inner product with any gallery vector."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    for start in range(0, len(vectors), EXACT_CHUNK):
        best = np.maximum(best, (queries @ vectors[start:start + EXACT_CHUNK].T).max(axis=1))
    return best


def tune(param: str, limit: int, set_value: Callable[[int], None], search: Callable[[np.ndarray, int], np.ndarray],
         ids: np.ndarray, vectors: np.ndarray, target: float = DEFAULT_TARGET_RECALL, sample: int = SAMPLE_QUERIES,
         seed: int = 0, queries: np.ndarray | None = None) -> Tuning:
    """Try `param` values from cheapest up; keep the first whose recall@1 reaches `target`: on `queries` (held-out
    vectors, not in the gallery) when given, else on `sample` leave-one-out gallery vectors.

    `search(queries, k)` returns result ids [n, k] with `set_value`'s setting; `ids[i]` is row i's id.
    """
    position = {int(i): p for p, i in enumerate(ids)}
    vector_of = lambda found: vectors[[position[int(i)] for i in found]]  # noqa: E731
    if queries is not None:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        best = exact_best(vectors, queries)
        no_self = np.full(len(queries), -2, dtype=np.int64)  # ids are >= 0: no result is "the query itself"
        measure = lambda: recall_at_1(search(queries, 1), no_self, queries, best, vector_of)  # noqa: E731
        count, proxy = len(queries), "held-out"
    else:
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(sample, len(vectors)), replace=False))
        best, _ = exact_neighbours(vectors, rows)
        # k=3: with product quantisation the query itself is not always ranked first
        measure = lambda: recall_at_1(search(vectors[rows], 3), ids[rows], vectors[rows], best, vector_of)  # noqa: E731
        count, proxy = len(rows), "leave-one-out"
    curve: dict[int, float] = {}
    chosen = None
    for value in candidate_values(param, limit):
        set_value(value)
        curve[value] = measure()
        if curve[value] >= target:
            chosen = value
            break
    reached = chosen is not None
    if chosen is None:
        chosen = max(curve, key=lambda v: (curve[v], -v))
    set_value(chosen)
    return Tuning(param, chosen, curve[chosen], target, count, reached, curve, proxy)
