"""Training losses for recognition: a cosine-space batch-hard triplet with absolute constraints,
and the PP-ShiTuV2 combination of label-smoothed cross-entropy plus that triplet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Masked-out entries of the similarity matrix get this, so min/max never pick them.
_FAR = 1e4


class TripletAngularMarginLoss:
    """Batch-hard triplet loss on cosine similarity.

    For every anchor the hardest positive (least similar, same label, not itself) and the
    hardest negative (most similar, other label) are mined. The relative term asks
    sim(a, p) >= sim(a, n) + margin. With `add_absolute`, two absolute terms also ask
    sim(a, p) >= ap_value and sim(a, n) <= an_value, weighted by `absolute_loss_weight`:
    without them a batch can satisfy the margin while every similarity drifts.
    Anchors with no positive or no negative in the batch contribute nothing.
    """

    def __init__(self, margin: float = 0.5, normalize_feature: bool = True, add_absolute: bool = True,
                 absolute_loss_weight: float = 0.1, ap_value: float = 0.8, an_value: float = 0.4):
        self.margin = margin
        self.normalize_feature = normalize_feature
        self.add_absolute = add_absolute
        self.absolute_loss_weight = absolute_loss_weight
        self.ap_value = ap_value
        self.an_value = an_value

    def __call__(self, features, labels):
        import paddle
        import paddle.nn.functional as F

        if self.normalize_feature:
            features = F.normalize(features, p=2, axis=1)
        similarity = paddle.matmul(features, features, transpose_y=True)
        labels = labels.reshape([-1, 1])
        same = paddle.equal(labels, labels.T)
        not_self = paddle.eye(similarity.shape[0]) == 0
        positive = paddle.logical_and(same, not_self)
        negative = ~same
        far = paddle.full_like(similarity, _FAR)
        hardest_positive = paddle.where(positive, similarity, far).min(axis=1)
        hardest_negative = paddle.where(negative, similarity, -far).max(axis=1)
        loss = F.relu(hardest_negative - hardest_positive + self.margin)
        if self.add_absolute:
            absolute = F.relu(self.ap_value - hardest_positive) + F.relu(hardest_negative - self.an_value)
            loss = loss + self.absolute_loss_weight * absolute
        valid = paddle.logical_and(positive.any(axis=1), negative.any(axis=1)).astype(loss.dtype)
        # Sum over valid anchors / their count; a batch with none gives a zero that still backprops.
        return (loss * valid).sum() / paddle.clip(valid.sum(), min=1.0)


@dataclass
class RecLossConfig:
    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0
    margin: float = 0.5
    absolute_loss_weight: float = 0.1
    ap_value: float = 0.8
    an_value: float = 0.4


class RecLoss:
    """PP-ShiTuV2's training loss: CE on the FC head's logits + triplet on the BNNeck features."""

    def __init__(self, config: RecLossConfig | None = None):
        self.config = config or RecLossConfig()
        c = self.config
        self.triplet = TripletAngularMarginLoss(margin=c.margin, absolute_loss_weight=c.absolute_loss_weight,
                                                ap_value=c.ap_value, an_value=c.an_value)

    def __call__(self, outputs: dict[str, Any], labels) -> tuple[Any, dict[str, float]]:
        import paddle.nn.functional as F

        ce = F.cross_entropy(outputs["logits"], labels, label_smoothing=self.config.label_smoothing)
        triplet = self.triplet(outputs["features"], labels)
        total = self.config.ce_weight * ce + self.config.triplet_weight * triplet
        return total, {"ce": round(float(ce), 4), "triplet": round(float(triplet), 4)}
