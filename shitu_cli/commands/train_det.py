"""`shitu train-det`: train the PicoDet mainbody detector and export it with NMS."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render


def command(
    dataset: Path = typer.Argument(..., help="COCO dir (train.json + val.json, e.g. from `shitu split-dataset`) or VOC dir."),
    out: Path = typer.Option(..., "--out", "-o", help="Run dir: checkpoints, metrics.csv, curves.png, recipe.yaml, export/."),
    recipe: str = typer.Option("pp-shituv2-mainbody", "--recipe", help="Recipe name under recipes/det (pp-shituv2-mainbody, small, tiny) or a .yml path."),
    merge_classes: bool = typer.Option(False, "--merge-classes", help="Map every category to one class, 'foreground' (PP-ShiTu's mainbody setup)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (recipe default otherwise)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Base learning rate (cosine decay after a linear warmup)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square network input side in pixels, a multiple of 32."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Local .pdparams (or a weights name) to start from; mismatched layers are skipped."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT's run from its last evaluated epoch."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate COCO mAP on val every N epochs (and checkpoint)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary instead of a table."),
) -> None:
    """Train a PicoDet mainbody detector (COCO mAP on val, best kept) and export it with NMS."""
    from shitu_cli.train.det import train_det

    flags = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "input_size": input_size,
             "pretrained": str(pretrained) if pretrained else None, "seed": seed, "eval_every": eval_every}
    with render.progress("train-det", None, unit="step") as bar:
        result = train_det(dataset, out, recipe=recipe, settings=flags, merge_classes=merge_classes, resume=resume,
                           on_step=bar, on_total=bar.set_total)
    summary = {
        "run_dir": result.run_dir, "export_dir": result.export_dir, "recipe": result.recipe,
        "best_map": result.best_map, "best_map50": result.best_map50, "best_epoch": result.best_epoch,
        "epochs": result.epochs, "labels": result.labels, "train_images": result.train_images,
        "val_images": result.val_images, "seconds": result.seconds,
    }
    if json_output:
        render.print_json(summary)
        return
    rows = [(k.replace("_", " "), ", ".join(v) if isinstance(v, list) else v) for k, v in summary.items()]
    render.show(render.table("train-det", ["field", "value"], rows))
