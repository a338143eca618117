"""`shitu split-dataset`: seeded, reproducible train/val/test (or gallery/query) lists for a dataset folder."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render
from shitu_cli.data.split import DEFAULT_SEED

MAX_CLASS_ROWS = 20  # beyond this many classes a per-class table is noise


def command(
    dataset_dir: Path = typer.Argument(Path("."), show_default=False,
                                       help="The dataset folder: class folders, COCO json, or VOC JPEGImages/+Annotations/ "
                                            "(default: the current folder)."),
    val: float = typer.Option(0.2, "--val", help="Validation fraction (rec: fraction of classes held out for gallery/query)."),
    test: float = typer.Option(0.1, "--test", help="Test fraction (rec: query fraction of each held-out class, at least one image)."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Shuffle seed; recorded in recipe.yaml."),
    format: str = typer.Option("auto", "--format", "-f", help="auto, imagenet, coco, voc, rec, paddlex (PaddleX 3 ClsDataset) or paddlex-rec (PaddleX 3 ShiTuRecDataset, "
                          "also PaddleClas's `path id` rec lists); auto never picks rec or paddlex*."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where the lists go (default: the dataset folder, as PaddleX does)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of tables."),
) -> None:
    """Split a dataset into PaddleX-style list files plus a recipe.yaml that `shitu reproduce` replays."""
    from shitu_cli.data.split import split_dataset

    with ExitStack() as stack:
        bars = []

        def checked(done: int, total: int) -> None:
            # Opened on the first image, so a usage error is never preceded by a bar's residue;
            # none at all when stderr is a log file, where a transient bar leaves a blank line.
            if not render.err_console.is_terminal:
                return
            if not bars:
                bars.append(stack.enter_context(render.progress("checking images", total=total, transient=True)))
            bars[0](1)

        result = split_dataset(dataset_dir, out=out, val=val, test=test, seed=seed, format=format, progress=checked)
    if result.detected:
        render.info(f"detected format: {result.format} ({result.detected})")
    for note in result.warnings:
        render.warn(note)
    if json_output:
        render.print_json(result)
        return
    _show_summary(result)


def _show_summary(result) -> None:
    title = f"{result.format} split, seed {result.seed}"
    if result.format == "coco":
        rows = [(part, n, result.extra["annotations"][part], result.extra["unannotated_images"][part]) for part, n in result.counts.items()]
        render.show(render.table(title, ["split", "images", "annotations", "images without annotations"], rows))
    else:
        render.show(render.table(title, ["split", "images"], list(result.counts.items())))
    if 1 < len(result.per_class) <= MAX_CLASS_ROWS:
        parts = list(result.counts)
        rows = [(name, *(counts[p] for p in parts)) for name, counts in result.per_class.items()]
        per_class = render.table("per class", ["class", *parts], rows)
        for column in per_class.columns[1:]:
            column.justify = "right"
        render.show(per_class)
    render.file_problems(f"skipped {len(result.skipped)} file(s)", [(s.path, s.reason) for s in result.skipped])
    names = ", ".join(p.name for p in result.files)
    render.show(f"wrote {names} and {result.recipe.name}")
    render.show(f"  to {result.out_dir}, with paths relative to {result.dataset_dir}")
    dialect = result.extra.get("list_dialect")
    if dialect:
        render.show(f"  list lines: `{dialect}`" + ((" (class names in label.txt)" if result.format.startswith("paddlex") else " (class names in labels.txt)")
                    if "class_id" in dialect else ""))
