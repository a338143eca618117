"""Comparing benchmark settings: speed-up against the first row, the fastest mark, and how closely each
setting's outputs agree with the fp32 reference (rec cosine, cls top-1, det box F1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from shitu_cli.bench.stages import OK

if TYPE_CHECKING:
    from shitu_cli.bench.runner import SettingResult


def agreement(task: str, reference: Any, other: Any) -> tuple[str, float] | None:
    """How close a setting's outputs are to the fp32 reference, or None where they cannot be paired.

    rec: mean cosine of the embeddings; cls: top-1 match; det: box F1 at IoU 0.5.
    """
    if task == "det":
        return "det box match", box_match(reference, other)
    if reference.shape != other.shape:
        return None  # e.g. the detector found other boxes, so the crops differ
    if task == "rec":
        a = reference.reshape(len(reference), -1).astype(np.float64)
        b = other.reshape(len(other), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        # Untrained nets can emit embeddings near 1e-8: no absolute floor, only an exact-zero guard.
        cosine = np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)
        return "rec cosine", float(cosine.mean()) if len(cosine) else 1.0
    return "cls top-1", float((reference.argmax(-1) == other.argmax(-1)).mean()) if len(reference) else 1.0


def box_match(reference: Sequence[np.ndarray], other: Sequence[np.ndarray], iou_thresh: float = 0.5) -> float:
    """F1 of boxes matched one-to-one (greedy, IoU >= thresh) per image; 1.0 when neither found any."""
    from shitu_cli.infer.pipeline import greedy_matches

    matched = total = 0
    for ref_boxes, boxes in zip(reference, other):
        total += len(ref_boxes) + len(boxes)
        matched += 2 * len(greedy_matches(ref_boxes, boxes, iou_thresh))
    return matched / total if total else 1.0


def compare(results: list[SettingResult], outputs: list[dict[str, Any]]) -> str | None:
    """Fill speedup (vs the first row), the fastest mark, and agreement with the first ok fp32 row."""
    ok = [r for r in results if r.status == OK]
    if not ok:
        return None
    first = results[0] if results[0].status == OK else ok[0]
    for r in ok:
        r.speedup = first.ms_p50 / r.ms_p50 if r.ms_p50 else None
    min(ok, key=lambda r: r.ms_p50).fastest = True
    reference_index = next((i for i, r in enumerate(results) if r.status == OK and r.precision == "fp32"), None)
    if reference_index is None:
        return None
    for result, produced in zip(results, outputs):
        for task, value in produced.items():
            measured = agreement(task, outputs[reference_index][task], value) if task in outputs[reference_index] else None
            if measured:
                result.agreement[measured[0]] = measured[1]
    return results[reference_index].setting
