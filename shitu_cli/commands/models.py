"""`shitu models list|pull|add`: official PP-ShiTu and PP-LCNet models in a local, checksummed cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render

MIB = float(1 << 20)

app = typer.Typer(help="List, download and register models (official PP-ShiTuV2 and PP-LCNet, or your own).",
                  no_args_is_help=True)


@app.command("list")
def list_command(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Show the known models, their size and whether they are in the cache."""
    from shitu_cli.models.registry import cache_root, list_models

    rows = list_models()
    if json_output:
        render.print_json({"cache": cache_root(), "models": rows})
        return
    table_rows = [
        (r.name, r.task or "", r.kind, f"~{r.approx_mb:g}" if r.approx_mb else "?", "yes" if r.cached else "no")
        for r in rows
    ]
    render.show(render.table(f"Models (cache: {cache_root()})", ["name", "task", "kind", "size MB", "cached"], table_rows))
    render.show("Use a name wherever a model path is accepted; `shitu models pull NAME` downloads it.")


@app.command("families")
def families_command(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Show the classifier families `train-cls --model` builds, their input sizes, recipes and pretrained weights."""
    from shitu_cli.models.cls_families import family_rows

    rows = family_rows()
    if json_output:
        render.print_json({"families": rows})
        return
    table_rows = [(r.family, ", ".join(r.models), r.input_size, ", ".join(r.recipes), ", ".join(r.pretrained)) for r in rows]
    render.show(render.table("train-cls model families", ["family", "--model", "--input-size", "--recipe", "--pretrained"], table_rows))
    render.show("Train one: `shitu train-cls DATASET -o RUN --model NAME` (or --recipe); weights: `shitu models pull NAME`.")


@app.command("pull")
def pull_command(
    name: str = typer.Argument(..., help="A model name from `shitu models list`."),
    force: bool = typer.Option(False, "--force", help="Download again even if the model is cached."),
    trust_new: bool = typer.Option(False, "--trust-new", help="Accept a file whose sha256 differs from the one first recorded."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a summary line."),
) -> None:
    """Download a model into the cache (resuming a partial download), check its sha256 and unpack it safely."""
    from shitu_cli.models.download import pull
    from shitu_cli.models.registry import official_model

    official_model(name)  # an unknown name fails here, before a progress bar opens
    with render.progress(f"pull {name} (MiB)", total=None, unit="MiB", transient=True) as bar:

        def received(n_bytes: int, total: int | None) -> None:
            if total:
                bar.set_total(total / MIB)
            bar(n_bytes / MIB)

        installed = pull(name, force=force, trust_new=trust_new, progress=received)
    _report(installed, json_output)


@app.command("add")
def add_command(
    path: Path = typer.Argument(..., help="A downloaded .tar, a .pdparams file, or a model folder."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="The name to register it under (default: guessed from the official file name)."),
    trust_new: bool = typer.Option(False, "--trust-new", help="Accept a file whose sha256 differs from the one first recorded."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a summary line."),
) -> None:
    """Register a manually downloaded model into the cache (same checks and unpacking as `pull`)."""
    from shitu_cli.models.download import add

    _report(add(path, name, trust_new=trust_new), json_output)


def _report(installed, json_output: bool) -> None:
    if json_output:
        render.print_json(installed)
        return
    render.show(f"{installed.name}: {installed.status} -> {installed.path}")
    render.show(f"  sha256 {installed.sha256}")
