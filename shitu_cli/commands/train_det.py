"""`shitu train-det`: train a detector (PicoDet mainbody, PP-YOLOE, YOLOv3) and export it with NMS."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render
from shitu_cli.commands import scale_out


def command(
    ctx: typer.Context,
    dataset: Optional[Path] = typer.Argument(None, help="COCO dir (train.json + val.json, e.g. from `shitu split-dataset`) or VOC dir. Not needed with --resume."),
    out: Path = typer.Option(..., "--out", "-o", help="Run dir: checkpoints, metrics.csv, curves.png, recipe.yaml, export/. A folder holding an earlier run is refused (use --resume, or a new folder)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe name under recipes/det (PicoDet: pp-shituv2-mainbody, small, tiny; multi-class: ppyoloe-s, ppyoloe-m, ppyoloe-cpu, yolov3-mobilenetv1) or a .yml path. \\[default: pp-shituv2-mainbody]"),
    merge_classes: Optional[bool] = typer.Option(None, "--merge-classes/--keep-classes", help="Map every category to one class, 'foreground' (PP-ShiTu's mainbody setup), or keep them. \\[default: keep]"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (recipe default otherwise)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Base learning rate (cosine decay after a linear warmup)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps, taken as given. Otherwise the recipe's, cut to 10% of the run's steps when longer (a short run would end inside it)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square network input side in pixels, a multiple of 32."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Local .pdparams (or a weights name) to start from; mismatched layers are skipped."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last epoch, with its own recipe, classes and settings; only --epochs (more or fewer) may change."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate COCO mAP on val every N epochs (and checkpoint)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine, or ppdet's step schedules 1x / 2x (2x trains twice --epochs)."),
    mixup_epochs: Optional[int] = typer.Option(None, "--mixup-epochs", help="ppdet's Mixup for the first N epochs, the last ones without it (0: off), taken as given. Otherwise the recipe's, scaled to a run shorter than its schedule."),
    static_assigner_epochs: Optional[int] = typer.Option(None, "--static-assigner-epochs", help="PP-YOLOE: the static (ATSS) assigner for the first N epochs, then the task-aligned one, taken as given. Otherwise the recipe's, scaled to a run shorter than its schedule."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Keep ppdet's exponential moving average of the weights."),
    label_smooth: Optional[bool] = typer.Option(None, "--label-smooth/--no-label-smooth", help="YOLOv3 loss label smoothing (yolov3 recipes)."),
    iou_aware: Optional[bool] = typer.Option(None, "--iou-aware/--no-iou-aware", help="YOLOv3 IoU-aware branch and loss (yolov3 recipes)."),
    nms: Optional[str] = typer.Option(None, "--nms", help="multiclass, or matrix (ppdet's Matrix NMS)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary instead of a table."),
    nproc: Optional[int] = scale_out.nproc_option(),
    devices: Optional[str] = scale_out.devices_option(),
    nnodes: Optional[int] = scale_out.nnodes_option(),
    master: Optional[str] = scale_out.master_option(),
) -> None:
    """Train a detector (PicoDet mainbody, or multi-class PP-YOLOE / YOLOv3; COCO mAP on val, best kept) and export it with NMS.

    Ctrl-C (or SIGTERM) stops after the current step, keeps the last epoch's checkpoint and exports the best epoch so far.
    """
    scale_out.relaunch_if_asked(ctx, "train-det", out, resume, nproc, devices, nnodes, master)  # exits when it relaunched
    from shitu_cli.train.det import train_det
    from shitu_cli.train.stop import exit_code_for

    flags = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "input_size": input_size,
             "warmup_steps": warmup_steps, "pretrained": str(pretrained) if pretrained else None, "seed": seed, "eval_every": eval_every,
             "schedule": schedule, "mixup_epochs": mixup_epochs,
             "static_assigner_epochs": static_assigner_epochs, "ema": ema, "label_smooth": label_smooth,
             "iou_aware": iou_aware, "nms": nms}
    with render.progress("train-det", None, unit="step") as bar:
        result = train_det(dataset, out, recipe=recipe, settings=flags, merge_classes=merge_classes, resume=resume,
                           on_step=bar, on_total=bar.set_total, on_note=render.warn)
    if result is None:  # a data-parallel worker other than rank 0: rank 0 reports
        return
    summary = {
        "run_dir": result.run_dir, "export_dir": result.export_dir, "recipe": result.recipe,
        "best_map": result.best_map, "best_map50": result.best_map50, "best_epoch": result.best_epoch,
        "epochs": result.epochs, "labels": result.labels, "train_images": result.train_images,
        "val_images": result.val_images, "seconds": result.seconds, "epochs_done": result.epochs_done,
        "stopped_by": result.stopped_by, "warmup_steps": (result.warmup or {}).get("steps"),
    }
    per_class = result.per_class or {}
    if json_output:
        render.print_json({**summary, "per_class": per_class, "skipped": result.skipped, "warmup": result.warmup,
                           "epoch_switches": result.epoch_switches})
    else:
        render.file_problems("skipped images (left out of training)", [(s.path, s.reason) for s in result.skipped])
        rows = [(k.replace("_", " "), ", ".join(v) if isinstance(v, list) else v) for k, v in summary.items()]
        render.show(render.table("train-det", ["field", "value"], rows))
        if len(per_class) > 1:
            render.show(render.table(f"AP per class (epoch {result.best_epoch}, val)", ["class", "AP", "AP50", "val boxes"],
                                     [(name, _ap(v["AP"]), _ap(v["AP50"]), v["boxes"]) for name, v in per_class.items()]))
    if result.stopped_by:
        render.warn(f"stopped by {result.stopped_by} after {result.epochs_done} of {result.epochs} epochs; exported the "
                    f"best epoch so far ({result.best_epoch}); continue with `shitu train-det -o {result.run_dir} --resume`")
        raise typer.Exit(exit_code_for(result.stopped_by))


def _ap(value: float) -> str:
    return "-" if value < 0 else f"{value:.3f}"  # -1: no val box of this class
