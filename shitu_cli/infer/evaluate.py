"""`predict --eval LIST`: how often the best box of a labelled query carries the right label, and
how the misses split between "unknown" (a safe miss) and a wrong label (a confusion). Its nearest
label, --rec-thresh ignored, is counted too; `shitu eval` (retrieval_eval.py) gives recall@k and mAP."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from shitu_cli.errors import BadInput

OUTCOMES = ("correct", "wrong label", "unknown", "rejected", "false accept", "unreadable")


@dataclass
class QueryOutcome:
    path: str
    truth: str
    predicted: str | None  # label of the best-scoring recognition; None when there was none
    score: float | None
    outcome: str  # one of OUTCOMES
    nearest: str | None = None  # the nearest gallery label, whatever its score (rec_thresh ignored)
    in_topk: bool = False  # the true label is among the top-k labels of the best box
    error: str | None = None  # why the query could not be read


@dataclass
class PipelineEval:
    outcomes: list[QueryOutcome]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Share of queries answered right: the gallery label, or "unknown" for a label not in the gallery."""
        right = self.counts.get("correct", 0) + self.counts.get("rejected", 0)
        return right / max(1, len(self.outcomes))

    @property
    def answerable(self) -> list[QueryOutcome]:
        """Readable queries whose label the gallery holds: the ones nearest-neighbour metrics score."""
        return [o for o in self.outcomes if o.outcome in ("correct", "wrong label", "unknown")]

    @property
    def nearest_accuracy(self) -> float:
        """Share of answerable queries whose nearest gallery label is right, --rec-thresh ignored (recall@1 by label)."""
        scored = self.answerable
        return sum(o.nearest == o.truth for o in scored) / max(1, len(scored))

    @property
    def topk_accuracy(self) -> float:
        """Share of answerable queries whose label is among the best box's top-k labels."""
        scored = self.answerable
        return sum(o.in_topk for o in scored) / max(1, len(scored))

    @property
    def unreadable(self) -> list[QueryOutcome]:
        return [o for o in self.outcomes if o.outcome == "unreadable"]


def read_eval_list(list_file: Path) -> list[tuple[Path, str]]:
    """(path, label) of every entry of a labelled list, in either dialect (`path<TAB>label`, or
    PaddleClas's `path class_id` with labels.txt); paths start where data.lists says (the list's
    folder, or the dataset dir of split-dataset's recipe beside it). Missing files are kept."""
    from shitu_cli.data.lists import read_labelled_list

    list_file = Path(list_file)
    if not list_file.is_file():
        raise BadInput("eval list not found", path=list_file, hint="pass a `path<TAB>label` list such as query_list.txt")
    rows = [(Path(entry.path), entry.label) for entry in read_labelled_list(list_file)]
    if not rows:
        raise BadInput("eval list has no entries", path=list_file)
    return rows


def classify_outcome(truth: str, predicted: str | None, known_labels: set[str], error: str | None = None) -> str:
    if error is not None:
        return "unreadable"
    in_gallery = truth in known_labels
    said_unknown = predicted is None or predicted == "unknown"
    if in_gallery:
        return "unknown" if said_unknown else ("correct" if predicted == truth else "wrong label")
    return "rejected" if said_unknown else "false accept"


def evaluate_results(results: Sequence[Any], truths: Sequence[str], known_labels: set[str]) -> PipelineEval:
    """Score ImageResults (in the order of `truths`) by their best-scoring recognition."""
    outcomes = []
    for result, truth in zip(results, truths):
        best = max(result.recognitions, key=lambda r: r.score, default=None)
        predicted = best.label if best is not None else None
        labels = [m.label for m in best.matches] if best is not None else []
        outcomes.append(QueryOutcome(result.path, truth, predicted, best.score if best else None,
                                     classify_outcome(truth, predicted, known_labels, result.error),
                                     nearest=labels[0] if labels else None, in_topk=truth in labels, error=result.error))
    counts = Counter(o.outcome for o in outcomes)
    return PipelineEval(outcomes, {name: counts.get(name, 0) for name in OUTCOMES})
