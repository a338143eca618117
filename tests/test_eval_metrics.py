"""The scoring rules of `shitu eval` and `predict --eval`, on vectors and results whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.infer.evaluate import evaluate_results
from shitu_cli.infer.pipeline import ImageResult, Match, Recognition
from shitu_cli.infer.retrieval_eval import (
    QueryRetrieval,
    nearest_items,
    own_file_positions,
    per_class_recall,
    score_retrieval,
)

# Four unit vectors on a quarter circle: a a b b. Cosines: v0.v1 0.8, v0.v2 0.6, v0.v3 0,
# v1.v2 0.96, v1.v3 0.6, v2.v3 0.8.
VECTORS = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], np.float32)
LABELS = ["a", "a", "b", "b"]
PATHS = ["a/0.jpg", "a/1.jpg", "b/2.jpg", "b/3.jpg"]


def test_leave_one_out_never_retrieves_the_query_itself():
    # Without itself, q0 finds v1 (a, right), q1 finds v2 (b, wrong; its a is 2nd), q2 finds v1 (wrong;
    # its b is 2nd), q3 finds v2 (right). recall@1 = 2/4, recall@2 = 4/4, mAP = (1 + 1/2 + 1/2 + 1) / 4.
    excluded = own_file_positions(PATHS, PATHS)
    metrics = score_retrieval(VECTORS, LABELS, VECTORS, LABELS, excluded, ks=(1, 2))
    assert metrics == pytest.approx({"recall1": 0.5, "recall2": 1.0, "mAP": 0.75, "unanswerable": 0.0})
    # Left in, every query finds itself first: the score a naive eval would report.
    assert score_retrieval(VECTORS, LABELS, VECTORS, LABELS, ks=(1,))["recall1"] == 1.0


def test_nearest_items_skip_the_own_file():
    rows, scores = nearest_items(VECTORS, VECTORS, own_file_positions(PATHS, PATHS))
    assert rows.tolist() == [1, 2, 1, 2]
    assert scores.tolist() == pytest.approx([0.8, 0.96, 0.96, 0.8])


def test_queries_with_and_without_an_own_copy_combine_as_one_mean():
    # q0 is gallery row 0 (left out): v1 first, AP 1. x ~ (0.995, 0.0995), label b, in no gallery row:
    # order v0 a, v1 a, v2 b, v3 b -> AP (1/3 + 2/4) / 2 = 5/12, recall@1 0.
    query = np.array([[1.0, 0.0], [1.0, 0.1]], np.float32)
    excluded = own_file_positions(["a/0.jpg", "elsewhere/x.jpg"], PATHS)
    assert [rows.tolist() for rows in excluded] == [[0], []]
    metrics = score_retrieval(query, ["a", "b"], VECTORS, LABELS, excluded, ks=(1,))
    assert metrics["recall1"] == pytest.approx(0.5)
    assert metrics["mAP"] == pytest.approx((1 + 5 / 12) / 2)


def test_a_query_whose_only_relative_is_itself_is_not_scored():
    # b and c have one image each: left out of its own gallery, such a query cannot be right or wrong.
    # q0 (a) ranks v1 (a) first: recall 1, AP 1. q1 (a) ranks v2 (b) 0.96, then v0 (a) 0.8: recall 0, AP 1/2.
    labels = ["a", "a", "b", "c"]
    metrics = score_retrieval(VECTORS, labels, VECTORS, labels, own_file_positions(PATHS, PATHS), ks=(1,))
    assert metrics == pytest.approx({"recall1": 0.5, "mAP": 0.75, "unanswerable": 2.0})


def test_per_class_recall_is_worst_first():
    def q(label, nearest, answerable=True):
        return QueryRetrieval("p", label, nearest, "g", 0.5, answerable)

    classes = per_class_recall([q("a", "a"), q("a", "b"), q("b", "b"), q("c", "a"), q("c", "x", answerable=False)])
    assert [(c.label, c.queries, c.recall1) for c in classes] == [("c", 1, 0.0), ("a", 2, 0.5), ("b", 1, 1.0)]


def _result(path, matches, rec_thresh=0.5, error=None):
    if error:
        return ImageResult(path, error=error)
    best = matches[0]
    label = best[0] if best[1] >= rec_thresh else "unknown"
    return ImageResult(path, [Recognition([0, 0, 8, 8], label, best[1], [Match(l, s, "g") for l, s in matches])])


def test_predict_eval_counts_the_nearest_label_whatever_the_threshold():
    results = [
        _result("1", [("cola", 0.9), ("fanta", 0.2)]),  # right
        _result("2", [("cola", 0.3), ("fanta", 0.2)]),  # unknown at 0.5, but nearest is right
        _result("3", [("fanta", 0.4), ("cola", 0.3)]),  # unknown; nearest wrong, right label 2nd
        _result("4", [("fanta", 0.8), ("pepsi", 0.1)]),  # wrong label; right one not in the top 2
        _result("5", [], error="cannot decode"),
    ]
    evaluation = evaluate_results(results, ["cola", "cola", "cola", "cola", "cola"], {"cola", "fanta", "pepsi"})
    assert evaluation.counts["correct"] == 1 and evaluation.counts["unknown"] == 2
    assert evaluation.counts["wrong label"] == 1 and evaluation.counts["unreadable"] == 1
    assert evaluation.accuracy == pytest.approx(1 / 5)
    assert evaluation.nearest_accuracy == pytest.approx(2 / 4)  # of the 4 readable, answerable queries
    assert evaluation.topk_accuracy == pytest.approx(3 / 4)
    (bad,) = evaluation.unreadable
    assert bad.path == "5" and bad.error == "cannot decode"
