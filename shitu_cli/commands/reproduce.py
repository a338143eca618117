"""`shitu reproduce`: replay a recipe and check its outputs byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render


def command(
    recipe: Path = typer.Argument(..., help="A recipe.yaml written by a shitu command (or its folder)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the replayed outputs (default: a temp dir)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Re-run a recipe and report whether every output is byte-identical."""
    from shitu_cli.recipes import reproduce

    report = reproduce(recipe, out)
    if json_output:
        render.print_json({"recipe": report.recipe, "out_dir": report.out_dir, "identical": report.identical, "files": report.files})
    else:
        render.show(render.table(f"Reproduced into {report.out_dir}", ["file", "status"], [(f.path, f.status) for f in report.files]))
        verdict = "[green]all outputs are byte-identical[/green]" if report.identical else "[red]some outputs differ[/red]"
        render.show(verdict)
    if not report.identical:
        raise typer.Exit(1)
