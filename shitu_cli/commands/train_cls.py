"""`shitu train-cls`: train a PP-LCNet classifier, keep the best epoch, export it with softmax."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render
from shitu_cli.commands import scale_out


def command(
    ctx: typer.Context,
    dataset: Optional[Path] = typer.Argument(None, help="Folder with train_list.txt, val_list.txt and labels.txt, or a folder of class folders (split here). Not needed with --resume."),
    out: Path = typer.Option(..., "--out", "-o", help="Run dir: checkpoints, metrics, confusion matrix, export/ and recipe.yaml. A folder holding an earlier run is refused (use --resume, or a new folder)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="PPLCNet_x0_25 ... x2_5, ResNet18_vd ... ResNet200_vd, MobileNetV3_*, HRNet_*, ... (`shitu models families` lists them). \\[default: PPLCNet_x1_0]"),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size in pixels. \\[default: 224]"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs. \\[default: 20]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step. \\[default: 32]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (SGD momentum). \\[default: 0.05]"),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warm-up length in epochs. \\[default: 1]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="L2 weight decay. \\[default: 4e-5]"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="cosine (with warm-up) or piecewise. \\[default: cosine]"),
    lr_decay_epochs: Optional[str] = typer.Option(None, "--lr-decay-epochs", help="Piecewise boundaries, e.g. 4,6,8 (lr x0.1 at each)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Label smoothing epsilon. \\[default: 0.1]"),
    min_crop: Optional[float] = typer.Option(None, "--min-crop", help="Smallest area share kept by the random resized crop. \\[default: 0.08]"),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Random horizontal flips (off for text, digits, arrows). \\[default: on]"),
    mixup: Optional[float] = typer.Option(None, "--mixup", help="Mixup alpha; 0 turns it off. \\[default: 0]"),
    cutmix: Optional[float] = typer.Option(None, "--cutmix", help="CutMix alpha; 0 turns it off. \\[default: 0]"),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Evaluate and keep an exponential moving average of the weights. \\[default: on]"),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="EMA decay. \\[default: from the run length]"),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="Local .pdparams or a weights name from `shitu models list` (e.g. ResNet50_vd_ssld-pretrained) to start from; a head of another class count starts fresh."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Distil from this .onnx model, exported model dir, train-cls run dir or .pdparams."),
    teacher_output: Optional[str] = typer.Option(None, "--teacher-output", help="ONNX teacher: the output holding class scores. \\[default: one named like logits/prob/score, else the first 2-D]"),
    teacher_size: Optional[int] = typer.Option(None, "--teacher-size", help="ONNX teacher: square input size, when the file does not fix it."),
    teacher_mean: Optional[str] = typer.Option(None, "--teacher-mean", help="ONNX teacher: R,G,B mean of its normalisation (e.g. 0.5,0.5,0.5). \\[default: from the file, else ImageNet's]"),
    teacher_std: Optional[str] = typer.Option(None, "--teacher-std", help="ONNX teacher: R,G,B std of its normalisation. \\[default: from the file, else ImageNet's]"),
    unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help="Extra unlabelled images (a folder) for the distillation term only."),
    distill_temperature: Optional[float] = typer.Option(None, "--distill-temperature", help="Softmax temperature of the KL term. \\[default: 4]"),
    distill_weight: Optional[float] = typer.Option(None, "--distill-weight", help="Weight of the KL term against CE, 0..1. \\[default: 0.5]"),
    val: Optional[float] = typer.Option(None, "--val", help="Validation share when DATASET is class folders to split. \\[default: 0.2]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init, split, shuffling and augmentation. \\[default: 42]"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Image decoding threads. \\[default: 2]"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Base settings: a shipped name (pplcnet, tiny, digits, resnet-cpu, resnet50_vd-imagenet), a .yml path, or a run's recipe.yaml; flags override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last epoch, with its own settings; only --epochs (more or fewer) and --num-workers may change."),
    json_output: bool = typer.Option(False, "--json", help="Print the run summary as one JSON document."),
    nproc: Optional[int] = scale_out.nproc_option(),
    devices: Optional[str] = scale_out.devices_option(),
    nnodes: Optional[int] = scale_out.nnodes_option(),
    master: Optional[str] = scale_out.master_option(),
) -> None:
    """Train an image classifier (PP-LCNet, ResNet-vd, MobileNetV3, ...), keep the best epoch by val top-1, and export it for `shitu predict`.

    Ctrl-C (or SIGTERM) stops after the current step, keeps the last epoch's checkpoint and exports the best epoch so far.
    """
    scale_out.relaunch_if_asked(ctx, "train-cls", out, resume, nproc, devices, nnodes, master)  # exits when it relaunched
    from shitu_cli.train.cls import requested_settings, resolve_settings, train_cls
    from shitu_cli.train.stop import exit_code_for

    flags = {
        "model": model, "input_size": input_size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "warmup_epochs": warmup_epochs, "weight_decay": weight_decay, "lr_schedule": lr_schedule,
        "lr_decay_epochs": lr_decay_epochs, "label_smoothing": label_smoothing, "min_crop": min_crop, "flip": flip, "mixup": mixup, "cutmix": cutmix,
        "ema": ema, "ema_decay": ema_decay, "pretrained": pretrained, "teacher": teacher, "unlabeled": unlabeled,
        "teacher_output": teacher_output, "teacher_size": teacher_size, "teacher_mean": teacher_mean, "teacher_std": teacher_std,
        "distill_temperature": distill_temperature, "distill_weight": distill_weight, "val": val, "seed": seed,
        "num_workers": num_workers,
    }
    # A resumed run takes its settings from its own recipe.yaml: pass on only what was asked for.
    settings = requested_settings(recipe, flags) if resume else resolve_settings(recipe, flags)
    with render.progress(f"training {settings.get('model', 'the run')}", total=None, unit="step") as bar:
        summary = train_cls(dataset, out, resume=resume, progress=bar, **settings)
    if summary is None:  # a data-parallel worker other than rank 0: rank 0 reports
        return
    for note in summary.notes + (summary.split or {}).get("warnings", []):
        render.info(note)
    if json_output:
        render.print_json(summary)
    else:
        render.file_problems("skipped images (left out of training)", [(s.path, s.reason) for s in summary.skipped])
        _show(summary)
    if summary.stopped_by:
        render.warn(f"stopped by {summary.stopped_by} after {summary.epochs_done} of {summary.epochs} epochs; "
                    f"exported the best epoch so far ({summary.best_epoch}); continue with "
                    f"`shitu train-cls -o {summary.run_dir} --resume`")
        raise typer.Exit(exit_code_for(summary.stopped_by))


def _show(summary) -> None:
    rows = [
        ("model", f"{summary.model} @ {summary.input_size}px, {summary.classes} classes"),
        ("images", f"{summary.train_images} train, {summary.val_images} val" + (f", {summary.unlabeled_images} unlabelled" if summary.unlabeled_images else "")
         + (f", {len(summary.skipped)} skipped" if summary.skipped else "")),
        ("best epoch", f"{summary.best_epoch} of {summary.epochs}"),
        ("top-1", f"{summary.best_top1:.2%}"),
        ("top-5", f"{summary.best_top5:.2%}"),
        ("mean class recall", f"{summary.mean_class_recall:.2%}"),
        ("teacher", summary.teacher or "none"),
        ("export", f"{summary.export_dir} (matches the trained model to {summary.export_max_abs_diff:.1e})"),
        ("time", f"{summary.seconds:.1f} s"),
    ]
    render.show(render.table(f"train-cls -> {summary.run_dir}", ["", "value"], rows))
    if summary.worst_classes and summary.classes > 2:
        worst = [(c["label"], f"{c['recall']:.2%}", c["images"]) for c in summary.worst_classes]
        render.show(render.table("hardest classes (val recall)", ["class", "recall", "images"], worst))
    render.show(f"wrote metrics.csv, curves.png, confusion.png, checkpoints/, export/ and recipe.yaml in {summary.run_dir}")
