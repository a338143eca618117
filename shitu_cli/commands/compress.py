"""`shitu compress`: INT8 / pruned / distilled models, measured before and after, written only if quality held."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render


def refusal_hint(result) -> str:
    """What to try next after a refusal, true to what this run already tried."""
    if result.algo_choice:
        choice = result.algo_choice
        tried = (f"--algo auto already tried {', '.join(t['algo'] for t in choice['trials'])} and kept the best, "
                 f"{choice['picked']}")
    elif "ptq-" in result.method:
        tried = "try the default --algo auto (calibrates with several PTQ algorithms and keeps the best)"
    elif result.method.startswith("prune"):
        tried = "try a smaller --prune ratio or more --epochs"
    else:
        tried = "try --quant ptq (its default --algo auto picks the best of several PTQ algorithms)"
    others = "--onnx-int8 or more --calib images" if result.task == "det" else "--quant qat, --onnx-int8 or more --calib images"
    return f"{tried}; try {others}; --force writes it anyway"


def command(
    model: str = typer.Argument(..., help="A train run dir (RUN_DIR), an exported model dir (RUN_DIR/export) or a model name."),
    calib: Path = typer.Option(..., "--calib", help="Calibration / fine-tuning images: a list file (split-dataset formats), a COCO json or a folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the compressed model dir goes (written only if quality held)."),
    eval_list: Optional[Path] = typer.Option(None, "--eval", help="Labelled images for the real metric: a list file for top-1 / recall@1, a COCO json for det mAP; agreement is measured on them too."),
    quant: Optional[str] = typer.Option(None, "--quant", help="ptq (default); qat: fine-tune with fake INT8 (from a run dir, the original as teacher), then PTQ-calibrate; none (with --prune)."),
    algo: str = typer.Option("auto", "--algo", help="PTQ activation-range algorithm. auto (default): calibrate with hist, abs_max, avg and mse, score each against the original on a quarter of --calib held out from calibration, keep the best. Or one of: hist, KL, avg, abs_max, mse, emd."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Remove this share of conv filters (L1), then fine-tune with distillation."),
    onnx_int8: bool = typer.Option(False, "--onnx-int8", help="INT8 through paddle2onnx + onnxruntime quantize_static instead."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for the latency measurement."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Refuse a model that loses more than this many points of quality."),
    force: bool = typer.Option(False, "--force", help="Write the model even if quality dropped past --max-drop."),
    calib_size: int = typer.Option(64, "--calib-size", help="Use at most this many calibration images (spread over the list)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Batch size for calibration, fine-tuning and measuring."),
    runs: int = typer.Option(30, "--runs", help="Timed batch-1 calls per model for the latency p50."),
    epochs: int = typer.Option(10, "--epochs", help="Fine-tuning epochs after --prune (and for --quant qat)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Fine-tuning learning rate (default 0.02 after --prune, 0.002 for --quant qat)."),
    seed: int = typer.Option(42, "--seed", help="Seed for fine-tuning; recorded in recipe.yaml."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Detectors, with --prune: a bigger det model (train-det run dir or export, any family, same classes) to fine-tune the pruned one from, instead of the unpruned model itself. The student learns the teacher's neck features (ppdet MimicFeatureLoss) and trains on boxes: the --calib ground truth when it is a COCO json, else the teacher's detections (score >= 0.4) as pseudo-boxes. Recorded (path, sha256) in shitu.yaml."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Compress a trained det, rec or cls model (INT8; pruning and distillation for rec/cls) and prove it with before/after measurements."""
    from shitu_cli.compress.pipeline import compress
    from shitu_cli.errors import WorkFailed
    from shitu_cli.models.registry import resolve_model_dir

    model = Path(model) if Path(model).exists() else resolve_model_dir(model)
    result = compress(
        model, calib, out, eval_list=eval_list, quant=quant, algo=algo, prune=prune, onnx_int8=onnx_int8,
        threads=threads, max_drop=max_drop, force=force, calib_size=calib_size, batch_size=batch_size, runs=runs,
        epochs=epochs, lr=lr, seed=seed, teacher=teacher, on_stage=lambda name: render.info(f"compress: {name}"),
    )
    if json_output:
        if result.skipped:
            first = result.skipped[0]
            render.warn(f"skipped {len(result.skipped)} unreadable image(s), e.g. {first.path}: {first.reason} (all in the JSON)")
        render.print_json(result_document(result))
    else:
        show_report(result)
    if not result.written:
        raise WorkFailed(f"not written: {result.refused}", hint=refusal_hint(result), path=result.out)


def result_document(result) -> dict:
    """The JSON form: the result's fields plus the derived speedup and sizes in MB."""
    from dataclasses import asdict

    document = asdict(result)
    document["speedup"] = round(result.speedup, 4)
    for key in ("before", "after"):
        document[key]["size_mb"] = round(getattr(result, key).size_mb, 4)
    return document


def show_report(result) -> None:
    before, after = result.before, result.after
    rows = [
        ("model", "original", result.method),
        ("precision", before.precision, after.precision),
        ("backend", before.backend, after.backend),
        ("size MB", f"{before.size_mb:.3f}", f"{after.size_mb:.3f} ({after.size_bytes / max(before.size_bytes, 1):.2f}x)"),
        (f"latency p50 ms ({result.threads} thread{'s' if result.threads != 1 else ''})",
         f"{before.latency_ms_p50:.3f}", f"{after.latency_ms_p50:.3f} (speedup {result.speedup:.2f}x)"),
    ]
    for name, value in after.agreement.items():
        rows.append((name, f"{before.agreement.get(name, 1.0):.4f}", f"{value:.4f}"))
    for name, value in before.metric.items():
        rows.append((f"{name} (labelled images)", f"{value:.4f}", f"{after.metric.get(name, float('nan')):.4f}"))
    title = f"{result.task} model, {result.eval_images} image(s) measured, {result.calib_images} calibration image(s)"
    render.show(render.table(title, ["", "before", "after"], rows))
    if result.algo_choice:
        show_algo_choice(result.algo_choice)
    render.show(f"quality drop: {result.quality_drop:.2f} points ({result.quality_basis}); limit {result.max_drop:g}")
    for note in result.notes:
        render.show(f"note: {note}")
    render.file_problems(f"skipped {len(result.skipped)} image(s)", [(s.path, s.reason) for s in result.skipped])
    if result.written:
        render.show(f"wrote {result.out} (shitu.yaml, recipe.yaml)")


def show_algo_choice(choice: dict) -> None:
    """The PTQ algorithms --algo auto tried, each scored against the original, the picked one marked."""
    where = "held-out calibration" if choice["held_out"] else "calibration"
    title = (f"--algo auto: calibrated on {choice['calib_images']} image(s), scored on {choice['scored_on']} "
             f"{where} image(s)")
    rows = []
    for trial in choice["trials"]:
        if trial["error"]:
            rows.append((trial["algo"], "failed", trial["error"][:60], ""))
        else:
            rows.append((trial["algo"], f"{trial['agreement']:.4f}", f"{trial['closeness']:.4f}", "picked" if trial["chosen"] else ""))
    render.show(render.table(title, ["algo", "agreement", "closeness", ""], rows))
    render.show(f"closeness: {choice['closeness']}; picked: the best by {' then '.join(choice['ranked_by'])}")
