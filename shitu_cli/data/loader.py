"""Batches for the cls and rec loops: decode (threaded), augment with a per-sample seeded RNG,
then one fused normalise. Deterministic for a given seed, whatever the worker count.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from shitu_cli.data.images import read_image
from shitu_cli.infer.preprocess import normalize_batch, resize_for_model
from shitu_cli.models.manifest import Preprocess

Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    label: int


def load_batches(
    samples: Sequence[LabeledImage],
    batches: Sequence[Sequence[int]],
    preprocess: Preprocess,
    input_size: tuple[int, int],
    augment: Augment | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (float32 NCHW images, int64 labels) for each list of sample indices in `batches`.

    Without `augment` images get the deterministic eval/inference preprocessing.
    """

    def load(position: int, index: int) -> np.ndarray:
        rgb = read_image(samples[index].path)
        if augment is None:
            return resize_for_model(rgb, preprocess, input_size)
        # A per-(seed, position) RNG keeps augmentation identical across worker counts.
        return augment(rgb, np.random.default_rng([seed, position, index]))

    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        position = 0
        for batch in batches:
            # A data-parallel rank's share of a global batch says where it starts in the global stream.
            position = getattr(batch, "start", position)
            jobs = [(position + k, i) for k, i in enumerate(batch)]
            position += len(batch)
            images = list(pool.map(lambda job: load(*job), jobs)) if pool else [load(*job) for job in jobs]
            labels = np.array([samples[i].label for i in batch], dtype=np.int64)
            yield normalize_batch(images, preprocess), labels
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)


def sequential_batches(count: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
