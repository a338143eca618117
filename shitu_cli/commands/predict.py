"""`shitu predict`: recognise images against a gallery index (labels, scores, nearest gallery items)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render

MAX_ERROR_ROWS = 20


def command(
    images: str = typer.Argument(..., help="An image, a folder (searched recursively) or a quoted glob like 'shots/*.jpg'."),
    index: Path = typer.Option(..., "--index", help="An index folder written by `shitu build-index`."),
    rec: Optional[Path] = typer.Option(None, "--rec", help="Rec model dir (default: the one recorded in the index)."),
    topk: int = typer.Option(5, "--topk", help="How many distinct labels to report per box."),
    rec_thresh: float = typer.Option(0.5, "--rec-thresh", help="Below this cosine similarity the label is 'unknown'."),
    nms_thresh: float = typer.Option(0.3, "--nms-thresh", help="IoU above which boxes with the SAME label are merged."),
    det: Optional[Path] = typer.Option(None, "--det", help="Mainbody detector dir (`shitu train-det` export): recognise each box."),
    det_thresh: float = typer.Option(0.2, "--det-thresh", help="With --det: the detector score a box needs."),
    max_boxes: int = typer.Option(5, "--max-boxes", help="With --det: at most this many boxes per image, best first."),
    whole_image: str = typer.Option("fallback", "--whole-image",
                                    help="With --det: also recognise the whole image: always, fallback (when no box), off."),
    batch_size: int = typer.Option(32, "--batch-size", help="Crops per recognition batch."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for Paddle Inference."),
    mkldnn: bool = typer.Option(True, "--mkldnn/--no-mkldnn", help="Use oneDNN (3-5x faster on most CPUs)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Recognise what is in each image: top-k labels with scores and the nearest gallery image."""
    from shitu_cli.errors import BadInput
    from shitu_cli.infer.pipeline import PipelineOptions, expand_inputs

    paths = expand_inputs(images)
    options = PipelineOptions(topk=topk, rec_thresh=rec_thresh, nms_thresh=nms_thresh, det_thresh=det_thresh,
                              max_boxes=max_boxes, whole_image=whole_image)
    runner = _open_runner(index, rec, det, options, threads, mkldnn, batch_size)
    for note in runner.notes:
        render.info(note)
    if len(paths) == 1:
        results = runner.predict_files(paths)
    else:
        with render.progress("predicting", total=len(paths)) as bar:
            results = runner.predict_files(paths, progress=bar)
    failed = [r for r in results if r.error]
    if json_output:
        render.print_json({"index": index.resolve(), "images": results, "count": len(results), "failed": len(failed)})
    else:
        _show(results, failed, runner.index.manifest.gallery)
    if failed and len(failed) == len(results):
        first = failed[0]
        raise BadInput(first.error if len(failed) == 1 else f"none of the {len(failed)} images could be read (first: {first.error})",
                       path=first.path)
    if failed:
        render.warn(f"{len(failed)} of {len(results)} images could not be read")


def _open_runner(index: Path, rec: Optional[Path], det: Optional[Path], options, threads: int, mkldnn: bool, batch_size: int):
    """The object that turns files into ImageResults. A classifier (`--model`, manifest task cls)
    would be dispatched here on its manifest's task; today only index + rec (+ det) exists."""
    from shitu_cli.infer.pipeline import Pipeline
    from shitu_cli.infer.predictor import PredictorOptions

    predictor_options = PredictorOptions(threads=threads, mkldnn=mkldnn)
    detector = None
    if det is not None:
        from shitu_cli.infer.detector import Detector

        detector = Detector(det, predictor_options)
    return Pipeline(index, rec=rec, detector=detector, options=options, predictor_options=predictor_options,
                    batch_size=batch_size)


def _show(results, failed, gallery_root: str | None) -> None:
    image_root = _common_parent([r.path for r in results])
    rows = []
    for result in results:
        for rec in result.recognitions:
            others = ", ".join(f"{m.label} {m.score:.3f}" for m in rec.matches[1:])
            nearest = _relative(rec.matches[0].gallery_path, gallery_root) if rec.matches else ""
            box = ",".join(f"{v:.0f}" for v in rec.box)
            rows.append((_relative(result.path, image_root), box, rec.label, f"{rec.score:.3f}", nearest, others))
    render.show(render.table(None, ["image", "box", "label", "score", "nearest gallery item", "next labels"], rows))
    if failed:
        shown = [(r.path, r.error) for r in failed[:MAX_ERROR_ROWS]]
        render.show(render.table(f"could not read {len(failed)} file(s)", ["file", "reason"], shown))
        if len(failed) > MAX_ERROR_ROWS:
            render.show(f"... and {len(failed) - MAX_ERROR_ROWS} more (all of them are in --json)")


def _common_parent(paths: list[str]) -> str | None:
    import os

    if len(paths) < 2:
        return None
    return os.path.commonpath([str(Path(p).parent) for p in paths])


def _relative(path: str, root: str | None) -> str:
    """Shorten a path for the table (JSON keeps it whole); paths outside root stay as they are."""
    if not root:
        return path
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path
