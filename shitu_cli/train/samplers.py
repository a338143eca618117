"""Batch samplers: P classes x K images per batch (what batch-hard triplet mining needs), seeded."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from shitu_cli.train.distributed import World, check_divisible, current_world, shard_batches


class PKBatchSampler:
    """Batches of `classes_per_batch` distinct classes with `images_per_class` images each.

    Deterministic for a (seed, epoch). Classes are visited in a shuffled cycle so every
    class appears about equally often; a class's images are drawn without replacement
    while it has enough, and with replacement (augmentation makes the copies differ)
    when it has fewer than K. An epoch is len(labels) // batch_size batches (at least one).

    Under data-parallel training `batch_size` is the global batch: every rank draws the same global
    batches (same seed) and `epoch` gives this rank its own P/N whole classes of each, so no class or
    image is duplicated or left out across ranks, whatever N is.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, images_per_class: int, seed: int = 0,
                 world: World | None = None):
        if images_per_class < 1:
            raise ValueError("images_per_class must be at least 1")
        by_class: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            by_class[int(label)].append(index)
        self.by_class = {label: np.array(indices) for label, indices in sorted(by_class.items())}
        if len(self.by_class) < 2:
            raise ValueError("PK sampling needs at least two classes")
        self.classes_per_batch = max(1, min(classes_per_batch, len(self.by_class)))
        self.images_per_class = images_per_class
        self.seed = seed
        self.num_samples = len(labels)
        self.world = world or current_world()
        # Batch-hard triplet mining needs negatives inside each rank's share: two classes at least.
        check_divisible(self.classes_per_batch, self.world, f"a PK batch of {self.classes_per_batch} classes",
                        hint=f"use a --batch-size that is a multiple of {2 * self.world.size} x {images_per_class} "
                             f"(2 classes of {images_per_class} images per process)", minimum=2)

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def __len__(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's batches (lists of sample indices) of one epoch: its share of each global batch."""
        return shard_batches(self.global_epoch(epoch), self.world, unit=self.images_per_class)

    def global_epoch(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch, the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        classes = list(self.by_class)
        cycle: list[int] = []
        batches = []
        for _ in range(len(self)):
            chosen: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if not cycle:
                    cycle = [classes[i] for i in rng.permutation(len(classes))]
                label = cycle.pop()
                if label not in chosen:
                    chosen.append(label)
                # A class skipped as a repeat is simply dropped from this pass of the cycle.
            batches.append([int(i) for label in chosen for i in self._draw(label, rng)])
        return batches

    def _draw(self, label: int, rng: np.random.Generator) -> np.ndarray:
        pool = self.by_class[label]
        replace = len(pool) < self.images_per_class
        return rng.choice(pool, size=self.images_per_class, replace=replace)
