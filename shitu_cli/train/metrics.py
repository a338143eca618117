"""Retrieval metrics (recall@k, mAP) on query vs gallery embeddings, in plain numpy.

`retrieval_metrics` is the pure function; `RetrievalEvaluator` wraps it in the loop's
reset / process / evaluate protocol so training, compress and predict share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

QUERY, GALLERY = "query", "gallery"


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), eps)


def retrieval_metrics(query: np.ndarray, query_labels: Sequence, gallery: np.ndarray, gallery_labels: Sequence,
                      ks: Sequence[int] = (1, 5), chunk: int = 1024) -> dict[str, float]:
    """Cosine-similarity retrieval of every query against the gallery.

    recall@k: share of queries with a same-label gallery item among their top k.
    mAP: mean over queries of average precision over the whole ranked gallery.
    Queries whose label has no gallery item cannot be answered; they are left out of
    every metric and counted in `unanswerable`. Ties rank by gallery order (stable sort).
    """
    query, gallery = l2_normalize(query), l2_normalize(gallery)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    hits = {k: [] for k in ks}
    average_precisions: list[float] = []
    unanswerable = 0
    for start in range(0, len(query), chunk):
        similarity = query[start : start + chunk] @ gallery.T
        order = np.argsort(-similarity, axis=1, kind="stable")
        relevant = gallery_labels[order] == query_labels[start : start + chunk, None]
        for row in relevant:
            if not row.any():
                unanswerable += 1
                continue
            for k in ks:
                hits[k].append(bool(row[:k].any()))
            average_precisions.append(_average_precision(row))
    metrics = {f"recall{k}": float(np.mean(hits[k])) if hits[k] else 0.0 for k in ks}
    metrics["mAP"] = float(np.mean(average_precisions)) if average_precisions else 0.0
    metrics["unanswerable"] = float(unanswerable)
    return metrics


def _average_precision(relevant: np.ndarray) -> float:
    ranks = np.flatnonzero(relevant) + 1  # 1-based ranks of the relevant items
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


@dataclass
class RetrievalBatch:
    """What `process` needs besides the embeddings: their labels and which side they are."""

    labels: np.ndarray
    side: str  # "query" | "gallery"


class RetrievalEvaluator:
    """Collect query and gallery embeddings batch by batch, then compute recall@k and mAP."""

    def __init__(self, ks: Sequence[int] = (1, 5)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self._features: dict[str, list[np.ndarray]] = {QUERY: [], GALLERY: []}
        self._labels: dict[str, list[np.ndarray]] = {QUERY: [], GALLERY: []}

    def process(self, outputs: np.ndarray, batch: RetrievalBatch) -> None:
        if batch.side not in self._features:
            raise ValueError(f"side must be {QUERY!r} or {GALLERY!r}, got {batch.side!r}")
        self._features[batch.side].append(np.asarray(outputs, dtype=np.float32))
        self._labels[batch.side].append(np.asarray(batch.labels))

    def evaluate(self) -> dict[str, float]:
        if not self._features[QUERY] or not self._features[GALLERY]:
            raise ValueError("retrieval evaluation needs both query and gallery embeddings")
        return retrieval_metrics(
            np.concatenate(self._features[QUERY]), np.concatenate(self._labels[QUERY]),
            np.concatenate(self._features[GALLERY]), np.concatenate(self._labels[GALLERY]), self.ks,
        )
