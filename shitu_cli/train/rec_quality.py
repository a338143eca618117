"""What a train-rec run can honestly claim: whether the exported model beats the untrained net, and
whether the best epoch was told apart from the others by more than the evaluation's noise.

Both rest on the standard error of a metric averaged over n queries. Per-query recall@k is 0 or 1 and
per-query AP lies in [0, 1]; a mean m of values in [0, 1] has variance at most m(1 - m) per value
(Bhatia-Davis), so sqrt(m(1 - m) / n) bounds the standard error from above: exact for recall, a
safe bound for mAP.
"""

from __future__ import annotations

import math
from typing import Sequence

NOISE_SIGMAS = 2.0  # a difference under two standard errors is not told apart from chance
FEW_QUERIES = 50  # below this, any epoch choice is a guess and the run says so


def standard_error(value: float, queries: int) -> float:
    """Upper bound on the standard error of a [0, 1] metric averaged over `queries` queries."""
    if queries <= 0:
        return float("inf")
    value = min(max(value, 0.0), 1.0)
    return math.sqrt(value * (1.0 - value) / queries)


def quality_notes(initial: dict[str, float], final: dict[str, float], history: Sequence[dict[str, float]],
                  best_metric: str, best_epoch: int | None, queries: int) -> list[str]:
    """Warnings for the run summary: no better than untrained, a best epoch within noise, too few queries."""
    if not final or best_metric not in final:
        return []
    notes = []
    value = final[best_metric]
    margin = NOISE_SIGMAS * standard_error(value, queries)
    if initial and best_metric in initial and value - initial[best_metric] <= margin:
        notes.append(
            f"the exported model is no better than the untrained net on the {queries} held-out queries "
            f"({best_metric} {value:.4f} vs {initial[best_metric]:.4f} untrained, noise +-{margin:.4f}): it has "
            "learned nothing usable; start from weights (--pretrained) or a teacher (--teacher), train longer, "
            "or try recipes/rec/cpu.yml")
    evaluated = [row[best_metric] for row in history if best_metric in row]
    if queries < FEW_QUERIES:
        notes.append(f"only {queries} held-out queries: {best_metric} moves by about +-{margin / NOISE_SIGMAS:.3f} "
                     "by chance alone, so the best epoch is a noisy pick; hold out more images for a reliable one")
    elif len(evaluated) > 1 and max(evaluated) - min(evaluated) <= margin:
        notes.append(f"{best_metric} stayed within noise over all {len(evaluated)} evaluated epochs "
                     f"({min(evaluated):.4f}..{max(evaluated):.4f}, +-{margin:.4f} on {queries} queries): "
                     f"best epoch {best_epoch} is an arbitrary pick")
    return notes
