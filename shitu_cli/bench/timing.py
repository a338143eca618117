"""Named stage timers and the percentiles that summarise them."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np


@dataclass
class StageStats:
    """Milliseconds per image for one stage over all timed batches."""

    stage: str
    p50: float
    p90: float
    p99: float
    mean: float
    samples: int
    # Half the range of the passes' medians: how far this number moved with machine load while the
    # settings took turns. 0.0 with a single pass (nothing to compare).
    spread: float = 0.0
    passes: int = 1
    pass_medians: list[float] = field(default_factory=list)  # in the order the passes ran


def percentiles(values_ms: Sequence[float]) -> tuple[float, float, float]:
    if not len(values_ms):
        return (float("nan"),) * 3
    p50, p90, p99 = np.percentile(np.asarray(values_ms, dtype=np.float64), [50, 90, 99])
    return float(p50), float(p90), float(p99)


class StageTimer:
    """Collects per-image milliseconds per stage; a batch's time is shared by its images."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.pass_medians: dict[str, list[float]] = defaultdict(list)
        self._open: dict[str, float] = {}
        self._pass_start: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str, images: int = 1) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._open[name] = self._open.get(name, 0.0) + (time.perf_counter() - start) * 1000.0 / max(1, images)

    def close_batch(self) -> None:
        """End one timed batch: each stage opened in it becomes one sample."""
        for name, ms in self._open.items():
            self.samples[name].append(ms)
        self._open = {}

    def discard_batch(self) -> None:
        self._open = {}

    def close_pass(self) -> None:
        """End one pass over all images: each stage's median over the pass is kept, for the spread."""
        for name, values in self.samples.items():
            start = self._pass_start.get(name, 0)
            if len(values) > start:
                self.pass_medians[name].append(float(np.median(values[start:])))
            self._pass_start[name] = len(values)

    def stats(self, order: Sequence[str]) -> list[StageStats]:
        names = [n for n in order if n in self.samples] + [n for n in self.samples if n not in order]
        result = []
        for name in names:
            values = self.samples[name]
            p50, p90, p99 = percentiles(values)
            medians = self.pass_medians.get(name) or []
            spread = (max(medians) - min(medians)) / 2 if len(medians) > 1 else 0.0
            result.append(StageStats(name, p50, p90, p99, float(np.mean(values)), len(values), spread, max(1, len(medians)),
                                     [round(m, 4) for m in medians]))
        return result
