"""Measurements behind the before/after table: file size, latency p50, agreement with the original and
the task metric (cls top-1, rec recall@1), all from the exported models through build_predictor.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shitu_cli.compress.images import ImageSet, iter_batches
from shitu_cli.models.manifest import MODEL_MANIFEST, ModelManifest


@dataclass
class Outputs:
    values: np.ndarray  # cls: scores [N, C]; rec: embeddings [N, D]
    labels: list[str | None]


def model_size_bytes(model_dir: Path, manifest: ModelManifest) -> int:
    files = {manifest.model_file, manifest.params_file}  # one file for an ONNX model
    return sum((Path(model_dir) / name).stat().st_size for name in files)


def run_outputs(predictor, images: ImageSet, manifest: ModelManifest, batch_size: int) -> Outputs:
    values, labels = [], []
    for batch, samples in iter_batches(images, manifest, batch_size):
        values.append(predictor.run(batch)[0].reshape(len(samples), -1))
        labels.extend(s.label for s in samples)
    return Outputs(np.concatenate(values) if values else np.zeros((0, 0), np.float32), labels)


def latency_p50_ms(predictor, sample: np.ndarray, runs: int, warmup: int = 3) -> float:
    """Median wall time of one batch-1 call; the median shrugs off the noise of shared cores."""
    for _ in range(warmup):
        predictor.run(sample)
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        predictor.run(sample)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- agreement


def agreement(task: str, before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """How often the compressed model says what the original said.

    cls: share of images with the same top-1 class. rec: share of images whose nearest
    neighbour among the other images is the same one, plus the mean cosine similarity of
    each image's two embeddings.
    """
    if task == "cls":
        return {"agreement": float(np.mean(before.argmax(1) == after.argmax(1)))}
    cosine = float(np.mean(np.sum(_unit(before) * _unit(after), axis=1)))
    return {"agreement": float(np.mean(_nearest_other(before) == _nearest_other(after))), "cosine": cosine}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest_other(embeddings: np.ndarray) -> np.ndarray:
    unit = _unit(embeddings.astype(np.float32))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(1)


# ----------------------------------------------------------------------------- task metric


def task_metric(task: str, outputs: Outputs, class_names: list[str]) -> tuple[str, float] | None:
    """(name, value) of the real metric on labelled images, or None when no image has a usable label."""
    if task == "cls":
        return _top1(outputs, class_names)
    if task == "rec":
        return _recall_at_1(outputs)
    return None


def _class_index(label: str | None, class_names: list[str]) -> int | None:
    if label is None:
        return None
    if label in class_names:
        return class_names.index(label)
    return int(label) if label.lstrip("-").isdigit() else None


def _top1(outputs: Outputs, class_names: list[str]) -> tuple[str, float] | None:
    truth = [_class_index(label, class_names) for label in outputs.labels]
    keep = [i for i, t in enumerate(truth) if t is not None]
    if not keep:
        return None
    predicted = outputs.values[keep].argmax(1)
    return "top1", float(np.mean(predicted == np.array([truth[i] for i in keep])))


def _recall_at_1(outputs: Outputs) -> tuple[str, float] | None:
    """Leave-one-out recall@1: each image queries all the others; images alone in their class are left out."""
    labels = np.array([str(label) for label in outputs.labels])
    if any(label is None for label in outputs.labels) or len(labels) < 2:
        return None
    answerable = np.array([np.sum(labels == label) > 1 for label in labels])
    if not answerable.any():
        return None
    nearest = _nearest_other(outputs.values)
    return "recall@1", float(np.mean(labels[nearest][answerable] == labels[answerable]))


def is_model_dir(path: Path) -> bool:
    return (Path(path) / MODEL_MANIFEST).is_file()
