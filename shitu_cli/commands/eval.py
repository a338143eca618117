"""`shitu eval`: recall@k and mAP of a rec model on labelled queries (vs a gallery, an index, or leave-one-out)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render

WORST_CLASSES_SHOWN = 5


def command(
    query: Path = typer.Argument(..., help="Labelled queries: a folder with one subfolder per label, or a "
                                 "`path<TAB>label` list (split-dataset's query_list.txt)."),
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="Labelled gallery (folder or list) to search. "
                                           "Without --gallery and --index: leave-one-out within QUERY."),
    index: Optional[Path] = typer.Option(None, "--index", help="Search a `shitu build-index` folder instead "
                                         "(its rec model unless --rec names a compatible one)."),
    rec: Optional[str] = typer.Option(None, "--rec", help="Rec model dir or name (default: the index's model, else "
                                      "the configured or built-in one)."),
    det: Optional[str] = typer.Option(None, "--det", help="Mainbody detector: embed each image's main-object crop."),
    det_thresh: float = typer.Option(0.3, "--det-thresh", help="With --det: the score the main box needs; below it the whole image is used."),
    rec_thresh: Optional[float] = typer.Option(None, "--rec-thresh", help="Also report what `predict` would say at this "
                                               "threshold (right / unknown / wrong). Recall and mAP never use it."),
    recall_at: list[int] = typer.Option([1, 5], "--recall-at", help="Ranks k for recall@k (repeat the option)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write eval.json (every query's nearest item) and recipe.yaml here."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per recognition batch."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for inference."),
    mkldnn: bool = typer.Option(True, "--mkldnn/--no-mkldnn", help="Use oneDNN (3-5x faster on most CPUs)."),
    backend: str = typer.Option("auto", "--backend", help="paddle, onnxruntime, openvino, or auto."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Measure retrieval like PaddleClas's eval: recall@k and mAP, nearest neighbour only (no 'unknown')."""
    from shitu_cli.infer.retrieval_eval import evaluate_retrieval

    with contextlib.ExitStack() as stack:
        report = evaluate_retrieval(query, out=out, gallery=gallery, index=index, rec=rec, det=det, det_thresh=det_thresh,
                                    rec_thresh=rec_thresh, ks=sorted(set(recall_at)), batch_size=batch_size, threads=threads,
                                    mkldnn=mkldnn, backend=backend, progress=_LazyProgress(stack))
    for note in report.notes:
        render.info(note)
    if json_output:
        render.print_json(report)
    else:
        _show(report)
    if any(s.side == "query" for s in report.skipped):
        render.warn(f"{sum(s.side == 'query' for s in report.skipped)} query image(s) could not be read and are not scored")


class _LazyProgress:
    """A bar opened once the core knows how many images it will embed, so an input error prints alone."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.bar = stack, None

    def set_total(self, total: int) -> None:
        self.bar = self.stack.enter_context(render.progress("embedding", total=total))

    def __call__(self, advance: int = 1, **fields) -> None:
        if self.bar is not None:
            self.bar(advance, **fields)


def _show(report) -> None:
    names = [name for name in report.metrics]
    rows = [(_label(name), f"{report.metrics[name]:.4f}") for name in names]
    rows += [("queries scored", report.queries), ("gallery items", report.gallery), ("classes", report.classes)]
    if report.unanswerable:
        rows.append(("queries with no gallery item of their label", report.unanswerable))
    render.show(render.table(f"retrieval ({report.mode})", ["metric", "value"], rows))
    render.show(f"model: {report.model_dir}")
    worst = [c for c in report.per_class if c.recall1 < 1.0][:WORST_CLASSES_SHOWN]
    if worst:
        render.show(render.table("classes with the lowest recall@1", ["label", "queries", "recall@1"],
                                 [(c.label, c.queries, f"{c.recall1:.3f}") for c in worst]))
    if report.thresholded is not None:
        total = max(1, sum(report.thresholded.values()))
        render.show(f"what predict says at --rec-thresh {report.rec_thresh:g} (recall and mAP ignore it):")
        render.show(render.table(None, ["outcome", "count", "share"],
                                 [(k, v, f"{v / total:.1%}") for k, v in sorted(report.thresholded.items())]))
    render.file_problems(f"files skipped ({len(report.skipped)})", [(s.path, f"{s.side}: {s.reason}") for s in report.skipped])
    if report.out_dir is not None:
        render.show(f"wrote {report.out_dir / 'eval.json'} and {report.recipe}")


def _label(name: str) -> str:
    return f"recall@{name[len('recall'):]}" if name.startswith("recall") else name
