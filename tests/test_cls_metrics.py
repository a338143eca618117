"""Top-k accuracy and confusion matrix evaluators on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.train.cls_metrics import ConfusionMatrix, TopKAccuracy, save_confusion_png

SCORES = np.array([
    [0.7, 0.2, 0.1, 0.0, 0.0, 0.0],  # true 0: top-1 hit
    [0.5, 0.3, 0.2, 0.0, 0.0, 0.0],  # true 1: 2nd
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # true 0: 6th, outside top-5
    [0.0, 0.0, 0.1, 0.9, 0.0, 0.0],  # true 3: hit
])
LABELS = np.array([0, 1, 0, 3])


def test_topk_counts_hits_across_batches_and_resets():
    metric = TopKAccuracy((1, 2, 5))
    metric.process(SCORES[:2], (None, LABELS[:2]))
    metric.process(SCORES[2:], LABELS[2:])
    assert metric.evaluate() == {"top1": 0.5, "top2": 0.75, "top5": 0.75}
    metric.reset()
    assert np.isnan(metric.evaluate()["top1"])


def test_topk_clips_k_to_the_class_count():
    metric = TopKAccuracy((1, 5))
    metric.process(np.array([[0.2, 0.8], [0.9, 0.1]]), np.array([0, 0]))
    assert metric.evaluate() == {"top1": 0.5, "top5": 1.0}


def test_confusion_matrix_counts_true_against_predicted():
    confusion = ConfusionMatrix(6)
    confusion.process(SCORES, (None, LABELS))
    assert confusion.matrix[0, 0] == 1 and confusion.matrix[0, 5] == 1
    assert confusion.matrix[1, 0] == 1 and confusion.matrix[3, 3] == 1
    assert confusion.matrix.sum() == 4
    # recall: class 0 1/2, class 1 0/1, class 3 1/1; classes without images are left out
    assert confusion.evaluate()["mean_class_recall"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert confusion.per_class_recall()[2] is None


def test_confusion_png_is_written_with_unicode_labels(tmp_path):
    matrix = np.array([[5, 1], [0, 3]])
    path = save_confusion_png(tmp_path / "confusion.png", matrix, ["café", "Ωμέγα"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
