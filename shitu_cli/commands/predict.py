"""`shitu predict`: recognise images against a gallery index (labels, scores, nearest gallery items)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from shitu_cli import render
from shitu_cli.errors import BadInput
from shitu_cli.infer.options import DEFAULTS


def command(
    images: Optional[List[str]] = typer.Argument(None, help="Images, folders (searched recursively), globs like "
                                                 "shots/*.jpg (quoted or expanded by the shell), http(s) URLs or videos "
                                                 "(.mp4, .avi, ...). Not needed with --eval."),
    index: Optional[Path] = typer.Option(None, "--index", help="An index folder from `shitu build-index` (default: "
                                         "$SHITU_INDEX or `shitu config set index`, else ./index when it holds one, "
                                         "else the built-in demo gallery)."),
    rec: Optional[str] = typer.Option(None, "--rec", help="Rec model dir or name (default: the one recorded in the index)."),
    model: Optional[str] = typer.Option(None, "--model", help="A classifier (`shitu train-cls` export or a model name): "
                                        "print its top-k classes instead of searching an index."),
    topk: int = typer.Option(DEFAULTS.topk, "--topk", help="How many distinct labels (or classes) to report per box."),
    rec_thresh: float = typer.Option(DEFAULTS.rec_thresh, "--rec-thresh", help="Below this cosine similarity the label is 'unknown'."),
    nms_thresh: float = typer.Option(DEFAULTS.nms_thresh, "--nms-thresh", help="IoU above which boxes with the SAME label are merged."),
    cover_thresh: float = typer.Option(DEFAULTS.cover_thresh, "--cover-thresh",
                                       help="With --det: when two boxes overlap by more than this share of the smaller "
                                       "one's area, the lower-scored goes, whatever the labels (1 turns this off)."),
    det: Optional[str] = typer.Option(None, "--det", help="Detector dir or name (`shitu train-det` export): recognise each box. "
                                      "A multi-class detector's class and score go with each box (JSON det_label/det_score, drawn in brackets)."),
    det_only: bool = typer.Option(False, "--det-only", help="With --det: report the detector's own boxes, classes and scores; "
                                  "no index, no recognition."),
    det_thresh: float = typer.Option(DEFAULTS.det_thresh, "--det-thresh", help="With --det: the detector score a box needs."),
    max_boxes: int = typer.Option(DEFAULTS.max_boxes, "--max-boxes", help="With --det: at most this many boxes per image, best first."),
    whole_image: str = typer.Option(DEFAULTS.whole_image, "--whole-image",
                                    help="With --det: also recognise the whole image: always, fallback (when no box), off."),
    save_vis: Optional[Path] = typer.Option(None, "--save-vis", help="Write each image with its boxes and labels drawn into this folder."),
    vid_stride: int = typer.Option(1, "--vid-stride", help="For videos: recognise every Nth frame (the JSON gives frame numbers; "
                                   "--save-vis writes a drawn .mp4)."),
    eval_list: Optional[Path] = typer.Option(None, "--eval", help="A labelled `path<TAB>label` query list: report how often "
                                             "the best box is right, unknown, or wrongly labelled (IMAGES is then ignored)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Crops per recognition batch."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for inference."),
    mkldnn: bool = typer.Option(True, "--mkldnn/--no-mkldnn", help="Use oneDNN (3-5x faster on most CPUs)."),
    backend: str = typer.Option("auto", "--backend", help="paddle, onnxruntime, openvino, or auto: the fastest "
                                "backend measured on this CPU for this model (the first use times the backends that give "
                                "Paddle's outputs, a few seconds; `shitu benchmark-cpu` measures too), else paddle."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Keep peak memory low on a small device: onnxruntime "
                                    "(chosen by --backend auto) with no memory arena, a pre-optimised model form whose "
                                    "weights are memory-mapped, and no weight-copying layout pass; slower on fp32 models "
                                    "(benchmarks/det_memory.md)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Recognise what is in each image: top-k labels with scores and the nearest gallery image."""
    from shitu_cli.infer.pipeline import PipelineOptions
    from shitu_cli.infer.predictor import PredictorOptions

    if not images and eval_list is None:
        raise BadInput("nothing to predict", hint="pass an image, a folder or a glob, or --eval LIST")
    if vid_stride < 1:
        raise BadInput(f"--vid-stride must be at least 1, got {vid_stride}")
    if save_vis is not None:
        from shitu_cli.infer.draw import check_output_folder

        check_output_folder(save_vis, "--save-vis")
    predictor_options = PredictorOptions(backend=backend, threads=threads, mkldnn=mkldnn, low_memory=low_memory)
    if model is not None:
        _predict_classes(images, model, predictor_options, topk, save_vis, batch_size, json_output)
        return
    truths = None
    if eval_list is not None:
        from shitu_cli.infer.evaluate import read_eval_list

        paths, truths = map(list, zip(*read_eval_list(eval_list)))
    else:
        from shitu_cli.data.sources import expand_sources

        paths = expand_sources(images)  # files, URLs (fetched in turn) and videos
    options = PipelineOptions(topk=topk, rec_thresh=rec_thresh, nms_thresh=nms_thresh, cover_thresh=cover_thresh,
                              det_thresh=det_thresh, max_boxes=max_boxes, whole_image=whole_image)
    if det_only:
        _check_det_only(det, index, rec, truths)
        _predict_detections(paths, det, options, predictor_options, vid_stride, save_vis, json_output)
        return
    runner, det_dir = _open_runner(index, rec, det, options, predictor_options, batch_size)
    for note in runner.notes:
        render.info(note)
    results = _run(runner, paths) if truths is not None else _run_sources(runner, paths, vid_stride, save_vis)
    if save_vis is not None and truths is not None:
        _draw(results, save_vis)
    if truths is not None:
        _report_eval(runner, results, truths, json_output)
        return
    _report(runner, results, {"rec": runner.embedder.model_dir, "det": det_dir}, json_output)


def _run(runner, paths):
    if len(paths) == 1:
        return runner.predict_files(paths)
    with render.progress("predicting", total=len(paths)) as bar:
        return runner.predict_files(paths, progress=bar)


def _run_sources(runner, sources, vid_stride: int, save_vis):
    from shitu_cli.data.sources import predict_sources

    if len(sources) == 1 and sources[0].kind != "video":
        results = predict_sources(runner, sources, vid_stride, save_vis)
    else:
        with render.progress("predicting", total=len(sources)) as bar:
            results = predict_sources(runner, sources, vid_stride, save_vis, progress=bar)
    if save_vis is not None:
        _drawn_notes(save_vis)
    return results


def _report(runner, results, model_dirs, json_output: bool) -> None:
    failed = [r for r in results if r.error]
    if json_output:
        render.print_json({"index": runner.index_dir.resolve(), "models": model_dirs, "images": results,
                           "count": len(results), "failed": len(failed)})
    else:
        _show(results, failed, runner.index.manifest.gallery)
    if failed and len(failed) == len(results):
        first = failed[0]
        raise BadInput(first.error if len(failed) == 1 else f"none of the {len(failed)} images could be read (first: {first.error})",
                       path=first.path)
    if failed:
        render.warn(f"{len(failed)} of {len(results)} images could not be read")


def _report_eval(runner, results, truths, json_output: bool) -> None:
    from shitu_cli.errors import WorkFailed
    from shitu_cli.infer.evaluate import OUTCOMES, evaluate_results

    known = {item.label for item in runner.index.items.values()}
    evaluation = evaluate_results(results, truths, known)
    unreadable = evaluation.unreadable
    if json_output:
        render.print_json({"index": runner.index_dir.resolve(), "queries": len(evaluation.outcomes),
                           "accuracy": round(evaluation.accuracy, 4), "counts": evaluation.counts,
                           "nearest_label_right": round(evaluation.nearest_accuracy, 4),
                           "label_in_topk": round(evaluation.topk_accuracy, 4),
                           "unreadable": [{"path": o.path, "reason": o.error} for o in unreadable],
                           "outcomes": evaluation.outcomes})
    else:
        total = max(1, len(evaluation.outcomes))
        rows = [(name, evaluation.counts[name], f"{evaluation.counts[name] / total:.1%}") for name in OUTCOMES if evaluation.counts[name]]
        render.show(render.table(f"{len(evaluation.outcomes)} labelled queries", ["outcome", "count", "share"], rows))
        render.show(f"best box right: [bold]{evaluation.accuracy:.1%}[/bold] (a query whose label is not in the gallery "
                    "counts as right when it comes back 'unknown')")
        if evaluation.answerable:
            render.show(f"nearest gallery label right, --rec-thresh ignored: {evaluation.nearest_accuracy:.1%}; "
                        f"right label among the top {runner.options.topk}: {evaluation.topk_accuracy:.1%} "
                        f"(of {len(evaluation.answerable)} readable queries whose label is in the gallery; "
                        "recall@k and mAP: `shitu eval QUERY_LIST --index INDEX`)")
        render.file_problems(f"could not read {len(unreadable)} query file(s)", [(o.path, o.error) for o in unreadable])
    if unreadable and len(unreadable) == len(evaluation.outcomes):
        first = unreadable[0]
        raise WorkFailed(f"none of the {len(unreadable)} queries could be read (first: {first.path}: {first.error})")
    if unreadable:
        render.warn(f"{len(unreadable)} of {len(evaluation.outcomes)} queries could not be read; they count as wrong")


def _open_runner(index: Optional[Path], rec: Optional[str], det: Optional[str], options, predictor_options, batch_size: int):
    """The Pipeline for the chosen index, with the demo's detector when the built-in demo gallery is the default."""
    from shitu_cli.infer.pipeline import Pipeline
    from shitu_cli.models.registry import resolve_model_dir

    index_dir, default_det = _index_or_default(index, predictor_options.threads)
    det_dir = resolve_model_dir(det) if det is not None else default_det
    detector = None
    if det_dir is not None:
        from shitu_cli.infer.detector import Detector

        detector = Detector(det_dir, predictor_options)
    rec_dir = resolve_model_dir(rec) if rec is not None else None
    pipeline = Pipeline(index_dir, rec=rec_dir, detector=detector, options=options, predictor_options=predictor_options,
                        batch_size=batch_size)
    return pipeline, det_dir


def _index_or_default(index: Optional[Path], threads: int) -> tuple[Path, Optional[Path]]:
    if index is not None:
        return index, None
    from shitu_cli.settings import default_index

    configured = default_index()
    if configured is not None:
        return configured, None
    from shitu_cli.index.build import DEFAULT_INDEX_DIR
    from shitu_cli.index.store import index_exists

    if index_exists(DEFAULT_INDEX_DIR):  # where a bare `shitu build-index GALLERY` put it
        render.info(f"no --index given and none configured: using {DEFAULT_INDEX_DIR.resolve()}")
        return DEFAULT_INDEX_DIR, None
    from shitu_cli import demo

    index_dir, models, _ = demo.ensure_demo_index(threads=threads)
    render.info(f"no --index given and none configured: using the built-in demo gallery ({models.source} models)")
    return index_dir, models.det


def _draw(results, folder: Path) -> None:
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.draw import draw_recognitions, unique_names, write_image

    names = unique_names([Path(r.path) for r in results])
    for result, name in zip(results, names):
        if result.error is None:
            write_image(folder / name, draw_recognitions(read_image(result.path), result.recognitions))
    _drawn_notes(folder)


def _drawn_notes(folder: Path) -> None:
    from shitu_cli.infer.draw import font_notes

    for note in font_notes():
        render.warn(note)
    render.info(f"drawn images: {folder}")


def _predict_classes(images: list[str], model: str, predictor_options, topk: int, save_vis, batch_size: int, json_output: bool) -> None:
    from shitu_cli.infer.classifier import predict_cls
    from shitu_cli.infer.pipeline import expand_all
    from shitu_cli.models.registry import resolve_model_dir

    paths = expand_all(images)
    model_dir = resolve_model_dir(model)
    results = list(predict_cls(paths, model_dir, predictor_options, topk, save_vis, batch_size))
    if save_vis is not None:
        from shitu_cli.infer.draw import font_notes

        for note in font_notes():
            render.warn(note)
    failed = [r for r in results if not r.ok]
    if json_output:
        render.print_json({"model": model_dir.resolve(), "images": results, "count": len(results), "failed": len(failed)})
    else:
        rows = [(r.path, c.label, f"{c.score:.3f}", rank) for r in results if r.ok for rank, c in enumerate(r.top, 1)]
        render.show(render.table(None, ["image", "class", "score", "rank"], rows))
        for r in failed:
            render.warn(f"{r.path}: {r.error}")
    if failed and len(failed) == len(results):
        raise BadInput(failed[0].error, path=failed[0].path)


def _check_det_only(det, index, rec, truths) -> None:
    if det is None:
        raise BadInput("--det-only needs a detector", hint="pass --det DIR (a `shitu train-det` export)")
    if index is not None or rec is not None or truths is not None:
        raise BadInput("--det-only reports the detector alone", hint="drop --index, --rec and --eval, or drop --det-only")


def _predict_detections(paths, det: str, options, predictor_options, vid_stride: int, save_vis, json_output: bool) -> None:
    """The detector alone: each box with the detector's class and score."""
    from shitu_cli.infer.detect_only import DetectionOnly
    from shitu_cli.infer.detector import Detector
    from shitu_cli.models.registry import resolve_model_dir

    det_dir = resolve_model_dir(det)
    runner = DetectionOnly(Detector(det_dir, predictor_options), options)
    results = _run_sources(runner, paths, vid_stride, save_vis)
    failed = [r for r in results if r.error]
    if json_output:
        render.print_json({"models": {"det": det_dir}, "images": results, "count": len(results), "failed": len(failed)})
    else:
        image_root = _common_parent([r.path for r in results])
        rows = [(_relative(r.path, image_root) + (f" frame {r.frame}" if getattr(r, "frame", None) is not None else ""),
                 ",".join(f"{v:.0f}" for v in d.box), d.label, f"{d.score:.3f}") for r in results for d in r.recognitions]
        render.show(render.table(None, ["image", "box", "class", "score"], rows))
        render.file_problems(f"could not read {len(failed)} file(s)", [(r.path, r.error) for r in failed])
    if failed and len(failed) == len(results):
        raise BadInput(failed[0].error, path=failed[0].path)


def _show(results, failed, gallery_root: str | None) -> None:
    image_root = _common_parent([r.path for r in results])
    rows = []
    for result in results:
        for rec in result.recognitions:
            others = ", ".join(f"{m.label} {m.score:.3f}" for m in rec.matches[1:])
            nearest = _relative(rec.matches[0].gallery_path, gallery_root) if rec.matches else ""
            box = ",".join(f"{v:.0f}" for v in rec.box)
            frame = getattr(result, "frame", None)  # a video's results name their frame
            where = _relative(result.path, image_root) + (f" frame {frame}" if frame is not None else "")
            rows.append((where, box, rec.label, f"{rec.score:.3f}", nearest, others))
    render.show(render.table(None, ["image", "box", "label", "score", "nearest gallery item", "next labels"], rows))
    render.file_problems(f"could not read {len(failed)} file(s)", [(r.path, r.error) for r in failed])


def _common_parent(paths: list[str]) -> str | None:
    import os

    paths = [p for p in paths if "://" not in p]  # URLs have no parent folder to share
    if len(paths) < 2:
        return None
    try:
        return os.path.commonpath([str(Path(p).parent) for p in paths])
    except ValueError:  # relative and absolute paths mixed
        return None


def _relative(path: str, root: str | None) -> str:
    """Shorten a path for the table (JSON keeps it whole); paths outside root stay as they are."""
    if not root:
        return path
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path
