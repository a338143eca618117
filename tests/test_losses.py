"""The recognition losses on hand-made embeddings: separated classes cost nothing, confused ones do."""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from shitu_cli.train.losses import RecLoss, TripletAngularMarginLoss  # noqa: E402


def _tensor(values, dtype="float32", grad=False):
    tensor = paddle.to_tensor(np.asarray(values, dtype=dtype))
    tensor.stop_gradient = not grad
    return tensor


def _axes(labels, dim=4, jitter=0.0, seed=0):
    """One embedding per label, pointing (up to jitter) along the axis of its class: orthogonal classes."""
    rng = np.random.default_rng(seed)
    features = np.eye(dim)[labels] + jitter * rng.normal(size=(len(labels), dim))
    return features.astype("float32")


def test_well_separated_classes_cost_nothing():
    labels = [0, 0, 1, 1, 2, 2]
    loss = TripletAngularMarginLoss()(_tensor(_axes(labels)), _tensor(labels, "int64"))
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_confused_classes_cost_the_margin_and_more():
    labels = [0, 0, 1, 1]
    same_direction = np.ones((4, 3), "float32")  # every pair has cosine 1
    loss = float(TripletAngularMarginLoss(margin=0.5, absolute_loss_weight=0.1, an_value=0.4)(
        _tensor(same_direction), _tensor(labels, "int64")))
    # relative term: 1 - 1 + 0.5; absolute term: 0.1 * (0 + (1 - 0.4))
    assert loss == pytest.approx(0.5 + 0.1 * 0.6, abs=1e-5)


def test_absolute_terms_bite_when_the_margin_is_met_but_similarities_are_off():
    # positives at cosine 0.6 (< ap 0.8), negatives at 0 : margin 0.5 is met, ap constraint is not.
    a = np.array([1.0, 0.0, 0.0])
    p = np.array([0.6, 0.8, 0.0])
    n = np.array([0.0, 0.0, 1.0])
    features = _tensor(np.stack([a, p, n, n * -1 + 0]).astype("float32"))
    labels = _tensor([0, 0, 1, 2], "int64")
    without = float(TripletAngularMarginLoss(add_absolute=False)(features, labels))
    with_absolute = float(TripletAngularMarginLoss(add_absolute=True, absolute_loss_weight=1.0)(features, labels))
    assert without == pytest.approx(0.0, abs=1e-6)
    assert with_absolute > 0.1


def test_hardest_pairs_are_mined_and_anchors_without_positives_are_skipped():
    labels = [0, 0, 0, 1]  # class 1 has no positive: it is skipped as an anchor, still used as a negative
    features = _axes([0, 0, 0, 1], dim=3)
    features[2] = np.array([0.0, 1.0, 0.0])  # a class-0 image that looks exactly like class 1
    loss = float(TripletAngularMarginLoss(add_absolute=False)(_tensor(features), _tensor(labels, "int64")))
    # anchors 0 and 1: hardest positive is image 2 (cos 0), hardest negative cos 0 -> 0.5 each;
    # anchor 2: hardest positive cos 0, hardest negative (image 3) cos 1 -> 1.5.
    assert loss == pytest.approx((0.5 + 0.5 + 1.5) / 3, abs=1e-5)


def test_gradient_flows_to_the_features():
    labels = _tensor([0, 0, 1, 1], "int64")
    features = _tensor(_axes([0, 0, 1, 1], jitter=0.5, seed=3), grad=True)
    loss = TripletAngularMarginLoss()(features * 1.0, labels)
    assert float(loss) > 0
    loss.backward()
    assert features.grad is not None
    assert float(paddle.abs(features.grad).sum()) > 0


def test_rec_loss_combines_ce_and_triplet():
    labels = _tensor([0, 0, 1, 1], "int64")
    features = _tensor(_axes([0, 0, 1, 1], dim=4), grad=True)
    logits = _tensor(np.zeros((4, 2)), grad=True)
    total, logs = RecLoss()({"features": features, "logits": logits}, labels)
    assert logs["triplet"] == pytest.approx(0.0, abs=1e-6)
    assert logs["ce"] == pytest.approx(np.log(2), abs=1e-4)  # uniform logits: smoothing changes nothing
    assert float(total) == pytest.approx(logs["ce"] + logs["triplet"], abs=1e-4)
    total.backward()
    assert logits.grad is not None
