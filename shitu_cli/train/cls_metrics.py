"""Classification evaluators (top-k accuracy, confusion matrix) with the loop's reset/process/evaluate
protocol, and the per-class confusion-matrix PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Past this many classes the tick labels overlap into a grey smear; the matrix is still drawn.
MAX_TICK_LABELS = 40


def _as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _labels_of(batch: Any) -> np.ndarray:
    """Integer labels from a batch: the labels array itself or the second item of (images, labels)."""
    labels = batch[1] if isinstance(batch, (tuple, list)) else batch
    return _as_numpy(labels).reshape(-1).astype(np.int64)


class TopKAccuracy:
    """Fraction of samples whose true class is among the k highest scores, for each k.

    With fewer classes than k, k is clipped to the class count (top-5 of 3 classes is 1.0).
    """

    def __init__(self, ks: Sequence[int] = (1, 5)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self._hits = {k: 0 for k in self.ks}
        self._count = 0

    def process(self, outputs: Any, batch: Any) -> None:
        scores = _as_numpy(outputs)
        labels = _labels_of(batch)
        # argsort descending once; stable so ties keep the lower class id first.
        ranked = np.argsort(-scores, axis=1, kind="stable")
        for k in self.ks:
            top = ranked[:, : min(k, scores.shape[1])]
            self._hits[k] += int((top == labels[:, None]).any(axis=1).sum())
        self._count += len(labels)

    def evaluate(self) -> dict[str, float]:
        if self._count == 0:
            return {f"top{k}": float("nan") for k in self.ks}
        return {f"top{k}": self._hits[k] / self._count for k in self.ks}


class ConfusionMatrix:
    """Counts of (true class, predicted class); evaluate() reports the mean per-class recall."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def process(self, outputs: Any, batch: Any) -> None:
        predicted = _as_numpy(outputs).argmax(axis=1)
        np.add.at(self.matrix, (_labels_of(batch), predicted), 1)

    def evaluate(self) -> dict[str, float]:
        support = self.matrix.sum(axis=1)
        seen = support > 0
        if not seen.any():
            return {"mean_class_recall": float("nan")}
        recall = np.diag(self.matrix)[seen] / support[seen]
        return {"mean_class_recall": float(recall.mean())}

    def per_class_recall(self) -> list[float | None]:
        support = self.matrix.sum(axis=1)
        return [float(self.matrix[i, i] / n) if n else None for i, n in enumerate(support)]


def save_confusion_png(path: Path, matrix: np.ndarray, labels: Sequence[str], title: str = "confusion matrix (val)") -> Path:
    """Row-normalised heat map (each true class sums to 1) with counts written in small matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    support = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, support, out=np.zeros(matrix.shape, float), where=support > 0)
    side = min(16.0, max(4.0, 0.35 * n + 2.5))
    fig, axis = plt.subplots(figsize=(side, side))
    image = axis.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    if n <= MAX_TICK_LABELS:
        from matplotlib.font_manager import FontProperties

        from shitu_cli.infer.draw import font_path_for

        # A font that has the labels' glyphs (CJK names would otherwise be boxes); infer.draw.font_notes says when none does.
        font = FontProperties(fname=font_path_for("".join(labels)), size=7)
        axis.set_xticks(range(n), labels=list(labels), rotation=90, fontproperties=font)
        axis.set_yticks(range(n), labels=list(labels), fontproperties=font)
    if n <= 20:
        for row in range(n):
            for col in range(n):
                if matrix[row, col]:
                    colour = "white" if normalised[row, col] > 0.5 else "black"
                    axis.text(col, row, str(matrix[row, col]), ha="center", va="center", fontsize=7, color=colour)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
