"""`shitu demo`: the main job on the built-in default, offline, in under a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render


def command(
    rebuild: bool = typer.Option(False, "--rebuild", help="Re-train the built-in det and rec models from recipes/*/demo.yml first (minutes)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for inference."),
    work: Optional[Path] = typer.Option(None, "--work", help="Where the demo index and drawn images go (default: the shitu cache)."),
    no_vis: bool = typer.Option(False, "--no-vis", help="Do not write drawn result images."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Recognise the objects in the shipped demo photos against the shipped gallery."""
    from shitu_cli import demo

    if rebuild:
        models = demo.rebuild_models(on_stage=lambda stage: render.info(f"[bold]rebuild:[/bold] {stage}"))
        render.info(f"rebuilt the demo models in {models.det.parent}")
    queries = len(list((demo.QUERIES / "images").glob("*.jpg")))
    with render.progress("recognising demo scenes", total=queries, transient=True) as advance:
        report = demo.run_demo(work, threads=threads, save_vis=not no_vis, progress=advance)
    if json_output:
        render.print_json(_document(report))
        return
    _show(report)


def _document(report) -> dict:
    return {
        "models": report.models, "index_dir": report.index_dir,
        "index": {"action": report.index.action, "count": report.index.count, "added": report.index.added,
                  "unchanged": report.index.unchanged},
        "recall": round(report.recall, 4), "objects": len(report.checks),
        "found": sum(c.correct for c in report.checks), "extra_results": report.extra_results,
        "precision": round(report.precision, 4), "boxes": report.boxes, "right_boxes": report.right_boxes,
        "checks": [{**vars(c), "correct": c.correct} for c in report.checks],
        "results": report.results, "vis_dir": report.vis_dir, "seconds": round(report.seconds, 2), "notes": report.notes,
    }


def _show(report) -> None:
    models = report.models
    render.show(f"models: [bold]{models.source}[/bold]  det={models.det}  rec={models.rec}")
    rows = []
    for result in report.results:
        name = Path(result.path).name
        if result.error:
            rows.append((name, "-", "-", "-", f"error: {result.error}"))
        for r in result.recognitions:
            rows.append((name, r.label, f"{r.score:.2f}", ",".join(f"{v:.0f}" for v in r.box), r.source))
    render.show(render.table("Demo results", ["image", "label", "score", "box x1,y1,x2,y2", "from"], rows))
    found = sum(c.correct for c in report.checks)
    render.show(f"recall on the demo queries: [bold]{report.recall:.0%}[/bold] ({found} of {len(report.checks)} objects "
                "found with the right label at IoU >= 0.5)")
    render.show(f"precision: [bold]{report.precision:.0%}[/bold] ({report.right_boxes} of {report.boxes} boxes name an object "
                f"they cover; {report.extra_results} extra boxes cover none)")
    if report.vis_dir:
        render.show(f"drawn images: {report.vis_dir}")
    for note in report.notes:
        render.warn(note)
