"""Retrieval metrics against hand-computed recall@k and average precision."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.train.metrics import RetrievalBatch, RetrievalEvaluator, retrieval_metrics


def _gallery():
    # Four gallery items on the unit circle at 0, 90, 180 and 270 degrees, labelled a, b, a, c.
    angles = np.deg2rad([0, 90, 180, 270])
    return np.stack([np.cos(angles), np.sin(angles)], 1), np.array(["a", "b", "a", "c"])


def test_perfect_retrieval():
    gallery, labels = _gallery()
    metrics = retrieval_metrics(gallery * 3.0, labels, gallery, labels, ks=(1, 2))  # scale does not matter
    assert metrics["recall1"] == 1.0
    assert metrics["unanswerable"] == 0


def test_recall_and_map_by_hand():
    gallery, labels = _gallery()
    # Query labelled "a" at 80 degrees: ranking is b(90), a(0), a(180), c(270) -> relevant at ranks 2 and 3.
    query = np.array([[np.cos(np.deg2rad(80)), np.sin(np.deg2rad(80))]])
    metrics = retrieval_metrics(query, ["a"], gallery, labels, ks=(1, 2, 5))
    assert metrics["recall1"] == 0.0
    assert metrics["recall2"] == 1.0
    assert metrics["recall5"] == 1.0
    assert metrics["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_queries_without_a_gallery_match_are_counted_not_scored():
    gallery, labels = _gallery()
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    metrics = retrieval_metrics(query, ["a", "zzz"], gallery, labels)
    assert metrics["unanswerable"] == 1
    assert metrics["recall1"] == 1.0


def test_evaluator_protocol_matches_the_function_and_resets():
    gallery, labels = _gallery()
    rng = np.random.default_rng(0)
    query = gallery + rng.normal(0, 0.6, gallery.shape)
    evaluator = RetrievalEvaluator(ks=(1, 5))
    evaluator.process(gallery[:2], RetrievalBatch(labels[:2], "gallery"))
    evaluator.process(gallery[2:], RetrievalBatch(labels[2:], "gallery"))
    evaluator.process(query, RetrievalBatch(labels, "query"))
    assert evaluator.evaluate() == retrieval_metrics(query, labels, gallery, labels, ks=(1, 5))
    evaluator.reset()
    with pytest.raises(ValueError):
        evaluator.evaluate()


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(1)
    gallery, query = rng.normal(size=(50, 8)), rng.normal(size=(30, 8))
    g_labels, q_labels = rng.integers(0, 5, 50), rng.integers(0, 5, 30)
    assert retrieval_metrics(query, q_labels, gallery, g_labels, chunk=7) == retrieval_metrics(query, q_labels, gallery, g_labels)
