"""`shitu export`: a model folder as ONNX, OpenVINO IR or legacy Paddle, checked against the source."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from shitu_cli import render


def command(
    model: str = typer.Argument(..., help="An exported model dir (RUN_DIR/export, a compress output) or a model name."),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx, openvino (IR: model.xml + model.bin) or paddle "
                            "(the legacy .pdmodel, for a model that has one)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The new model folder (default: MODEL-FORMAT beside MODEL)."),
    int8: bool = typer.Option(False, "--int8", help="Export a quantised (int8) model as int8; a quantised model needs it."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Sample images or folders to compare the export "
                                                "with the source on (default: the demo's query photos)."),
    low_memory: bool = typer.Option(False, "--low-memory", help="ONNX only: write the form `predict --low-memory` runs "
                                    "(weights in weights.bin, memory-mapped) and record it in shitu.yaml, for a device "
                                    "short of memory."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a summary."),
) -> None:
    """Write MODEL in another format as a normal model folder, and report how far its outputs are from the source's."""
    from shitu_cli.models.convert import export_model
    from shitu_cli.models.registry import resolve_model_dir

    model_dir = resolve_model_dir(model)
    out = out if out is not None else model_dir.with_name(f"{model_dir.name}-{fmt}{'-int8' if int8 else ''}")
    with render.progress(f"exporting to {fmt}", total=None):
        report = export_model(model_dir, out, fmt, int8=int8, images=images, low_memory=low_memory)
    if json_output:
        render.print_json(report)
        return
    render.show(render.table(f"{report.format} export of {report.source}", ["file", "size"],
                             [(name, f"{(report.out / name).stat().st_size:,} B") for name in report.files]))
    render.show(f"written: [bold]{report.out}[/bold] (shitu.yaml, recipe.yaml)")
    render.show(f"max difference from the source on {report.samples} sample image(s), run with {report.backend}: "
                f"{report.max_abs_diff:.3g} (largest output {report.scale:.3g})")
    for note in report.notes:
        render.info(note)
