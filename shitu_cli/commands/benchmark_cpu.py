"""`shitu benchmark-cpu`: what this machine really does, stage by stage, and which settings are fastest."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from shitu_cli import render
from shitu_cli.errors import BadInput

STATUS_WIDTH = 40  # longer reasons are printed in full under the table
AGREEMENT_NAMES = {"det box match": "det F1", "rec cosine": "rec cos", "cls top-1": "cls top1"}


def command(
    det: Optional[str] = typer.Option(None, "--det", help="Exported mainbody detector dir, or a model name."),
    rec: Optional[str] = typer.Option(None, "--rec", help="Exported recognition (embedding) model dir, or a model name."),
    cls: Optional[str] = typer.Option(None, "--cls", help="Exported classifier dir, or a model name."),
    index: Optional[Path] = typer.Option(None, "--index", help="Gallery index dir, to time the search stage (rec model: the index's own unless --rec)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder (or file) of real images to time (default: the demo queries)."),
    threads: str = typer.Option("1", "--threads", help="Thread counts; a comma list sweeps, e.g. 1,2,4,10."),
    mkldnn: bool = typer.Option(True, "--mkldnn/--no-mkldnn", help="Paddle oneDNN kernels on or off, as in predict and build-index."),
    mkldnn_both: bool = typer.Option(False, "--mkldnn-both", help="Time Paddle with and without oneDNN, to compare the two."),
    backend: str = typer.Option("paddle", "--backend", help="paddle, onnxruntime, openvino, a comma list, or all."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16, int8, a comma list, or all."),
    int8: List[Path] = typer.Option([], "--int8", help="An int8 model from `shitu compress` (repeatable), used for int8 rows."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed batches before timing each setting."),
    runs: int = typer.Option(5, "--runs", help="Timed passes over all images per setting; the settings take turns "
                             "(A B C A B C ...), and the spread is half the range of a setting's pass medians."),
    batch: int = typer.Option(1, "--batch", help="Images per inference call."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Time decode, preprocess, inference, search and end to end on this CPU for each backend/threads/precision."""
    from shitu_cli.bench.inputs import default_images, default_setup
    from shitu_cli.bench.runner import BenchOptions, benchmark, progress_steps
    from shitu_cli.models.registry import resolve_model_dir
    from shitu_cli.infer.predictor import BACKENDS, PRECISIONS

    models = {task: resolve_model_dir(name) if name is not None else None for task, name in (("det", det), ("rec", rec), ("cls", cls))}
    if not any(models.values()) and index is None:
        models, index = default_setup()
    options = BenchOptions(
        backends=_choices(backend, BACKENDS, "--backend"), threads=_thread_list(threads),
        mkldnn=(True, False) if mkldnn_both else (mkldnn,), precisions=_choices(precision, PRECISIONS, "--precision"),
        batch=batch, warmup=warmup, runs=runs,
    )
    image_source = images if images is not None else default_images()
    with render.progress("benchmarking", total=progress_steps(options), unit="step", transient=True) as bar:
        report = benchmark(models, image_source, options, int8_models=int8, index=index, progress=bar)
    for note in report.notes:
        render.warn(note)
    if json_output:
        render.print_json(report)
        return
    show_report(report)


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if values == ["all"]:
        return list(allowed)
    for value in values:
        if value not in allowed:
            raise BadInput(f"{flag} {value!r} is not one of {', '.join(allowed)}, all")
    if not values:
        raise BadInput(f"{flag} needs a value", hint=f"one of {', '.join(allowed)}, all")
    return list(dict.fromkeys(values))


def _thread_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--threads {text!r} is not a list of numbers", hint="e.g. --threads 1,2,4") from None
    if not values or min(values) < 1:
        raise BadInput(f"--threads {text!r} needs positive numbers", hint="e.g. --threads 1,2,4")
    return list(dict.fromkeys(values))


def show_report(report) -> None:
    system = report.system
    versions = system.versions
    render.show(f"CPU: {system.cpu}, {system.physical_cores} cores ({system.usable_cpus} usable), SIMD: {system.simd_text()}")
    render.show(
        "libraries: " + ", ".join(f"{name} {versions.get(name, '?')}" for name in
                                  ("paddlepaddle", "onnxruntime", "openvino", "paddle2onnx", "faiss-cpu", "numpy"))
    )
    models = ", ".join(f"{m.task} {m.arch} {m.input_size[0]}x{m.input_size[1]} ({m.path})" for m in report.models)
    render.show(f"models: {models}")
    skipped = f", {len(report.skipped_images)} unreadable skipped" if report.skipped_images else ""
    render.show(f"images: {report.images} from {report.image_dir}{skipped}; warmup {report.warmup} batches, {report.runs} timed "
                "passes per setting, taking turns; ms p50 ± half the range of the passes' medians")
    if report.pipeline and any(m.task == "det" for m in report.models):
        p = report.pipeline
        render.show(f"predict's thresholds: det {p['det_thresh']}, at most {p['max_boxes']} boxes, whole image {p['whole_image']}")
    if report.boxes_per_image:
        render.show("boxes per image: " + ", ".join(f"{n} box(es): {count} image(s)" for n, count in sorted(report.boxes_per_image.items())))
    render.show(_results_table(report))
    for r in report.results:
        if len(r.status) > STATUS_WIDTH:
            render.show(f"  {r.setting}: {r.status}")
    render.show(_stages_table(report))
    if report.reference:
        render.show(f"agreement: outputs compared with {report.reference} (det: box F1 at IoU 0.5, rec: mean cosine, cls: top-1 match)")
    if report.log_path:
        render.show(f"logged to {report.log_path}")
    if report.record_path:
        render.show(f"fastest backend per model recorded in {report.record_path} (used by --backend auto)")


def _results_table(report):
    rows = []
    for r in report.results:
        ratio = "" if r.speedup is None else f"{r.speedup:.2f}x" + (" fastest" if r.fastest else "")
        agreement = " ".join(f"{AGREEMENT_NAMES.get(name, name)} {value:.4f}" for name, value in r.agreement.items())
        status = r.status if len(r.status) <= STATUS_WIDTH else r.status[: STATUS_WIDTH - 3] + "..."
        rows.append((r.setting, status, _num(r.size_mb, 2), _with_spread(r.ms_p50, r.ms_spread), _num(r.ms_p99), _num(r.fps, 1),
                     ratio, agreement))
    columns = ["setting", "status", "size MB", "ms/img p50", "p99", "FPS", "vs first", "agreement"]
    table = render.table("benchmark-cpu", columns, rows)
    for column in table.columns[2:7]:
        column.justify = "right"
    return table


def _stages_table(report):
    rows = []
    for r in report.results:
        total = next((s.p50 for s in r.stages if s.stage == "end to end"), None)
        for s in r.stages:
            share = "" if not total or s.stage == "end to end" else f"{100 * s.p50 / total:.0f}%"
            rows.append((r.setting, s.stage, _with_spread(s.p50, s.spread), _num(s.p90), _num(s.p99), share))
    table = render.table("per stage, ms per image", ["setting", "stage", "p50", "p90", "p99", "share"], rows)
    for column in table.columns[2:]:
        column.justify = "right"
    return table


def _with_spread(value, spread, digits: int = 3) -> str:
    if value is None:
        return ""
    return _num(value, digits) + (f" ±{spread:.{digits}f}" if spread else "")


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"
