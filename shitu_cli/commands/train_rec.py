"""`shitu train-rec`: train a PP-ShiTuV2 feature extractor and export it for build-index / predict."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from shitu_cli import render
from shitu_cli.commands import scale_out


def command(
    ctx: typer.Context,
    dataset: Optional[Path] = typer.Argument(None, help="split-dataset rec lists (train/gallery/query_list.txt), or a folder of class folders to split here. Not needed with --resume."),
    out: Path = typer.Option(..., "--out", "-o", help="The run folder: checkpoints, metrics, export/ and recipe.yaml go here. A folder holding an earlier run is refused (use --resume, or a new folder)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Base settings: pp-shituv2 (default), tiny, or a .yml path."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="PPLCNetV2_base_ShiTu or PPLCNet_x0_25 ... PPLCNet_x2_5."),
    embedding_size: Optional[int] = typer.Option(None, "--embedding-size", help="Embedding dimension (the backbone's last conv and the BNNeck)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Square input size in pixels."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch: P classes x K images (K = images_per_class, 4)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (after warm-up, before cosine decay)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init, sampling, augmentation and the split."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Image decoding threads (results do not depend on it)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate recall@1/5 and mAP every N epochs."),
    holdout: Optional[float] = typer.Option(None, "--holdout", help="Class folders only: fraction of classes held out for gallery/query (0.2)."),
    query_fraction: Optional[float] = typer.Option(None, "--query-fraction", help="Class folders only: share of each held-out class used as queries (0.3)."),
    pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="Start from: a model name (PP-ShiTuV2-rec, PPLCNet_x1_0 ... after `shitu models pull`), a local .pdparams (ImageNet/SSLD backbone or a RecModel checkpoint), or an ONNX image model (.onnx, converted by x2paddle; it replaces the backbone)."),
    pretrained_output: Optional[str] = typer.Option(None, "--pretrained-output", help="With --pretrained model.onnx: the output to fine-tune from (default: the only feature output, e.g. embedding)."),
    pretrained_mean: Optional[str] = typer.Option(None, "--pretrained-mean", help="With --pretrained model.onnx: the normalisation mean R,G,B it expects (default ImageNet's; e.g. 0.5,0.5,0.5)."),
    pretrained_std: Optional[str] = typer.Option(None, "--pretrained-std", help="With --pretrained model.onnx: the normalisation std R,G,B it expects (default ImageNet's)."),
    backbone_lr_scale: Optional[float] = typer.Option(None, "--backbone-lr-scale", help="The backbone's learning rate as a fraction of --lr (e.g. 0.1 to fine-tune a pretrained backbone gently; 0 freezes it). Default 1."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Distil from this teacher: an .onnx model (onnxruntime), a Paddle export dir (shitu.yaml) or a shitu run dir. Its outputs are cached per image under $SHITU_HOME/teacher-cache."),
    unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help="A folder of images without labels; they feed only the distillation loss (needs --teacher)."),
    teacher_output: Optional[str] = typer.Option(None, "--teacher-output", help="ONNX teacher: the output to learn (e.g. embedding or logits); default the first 2-D output whose name does not say class scores (logits, prob, score...)."),
    teacher_size: Optional[int] = typer.Option(None, "--teacher-size", help="Teacher input size in pixels, when the file does not fix it."),
    teacher_mean: Optional[str] = typer.Option(None, "--teacher-mean", help="Teacher normalisation mean R,G,B (e.g. 0.5,0.5,0.5); default from the file, else ImageNet's."),
    teacher_std: Optional[str] = typer.Option(None, "--teacher-std", help="Teacher normalisation std R,G,B; default from the file, else ImageNet's."),
    teacher_views: Optional[int] = typer.Option(None, "--teacher-views", help="Views per image the teacher runs on (1 = whole image; more = seeded crops too). Default 2."),
    label_weight: Optional[float] = typer.Option(None, "--label-weight", help="With --teacher: weight of CE + triplet on labelled images (0 = distil without labels). Default 1."),
    cosine_weight: Optional[float] = typer.Option(None, "--cosine-weight", help="With --teacher: weight of the cosine loss to the (centred) teacher embedding, through a projection head. Default 1."),
    relation_weight: Optional[float] = typer.Option(None, "--relation-weight", help="With --teacher: weight of batch similarity matching (the teacher's neighbours). Default 1."),
    unlabeled_per_batch: Optional[int] = typer.Option(None, "--unlabeled-per-batch", help="With --teacher: pool images (unlabelled + training) added to every batch. Default 32."),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Where cached teacher outputs live (default $SHITU_HOME/teacher-cache)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last epoch, with its own settings; only --epochs (more or fewer) and --num-workers may change."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary instead of tables."),
    nproc: Optional[int] = scale_out.nproc_option(),
    devices: Optional[str] = scale_out.devices_option(),
    nnodes: Optional[int] = scale_out.nnodes_option(),
    master: Optional[str] = scale_out.master_option(),
) -> None:
    """Train a PP-ShiTuV2 recogniser (CE + triplet, PK batches, EMA) and export it to RUN_DIR/export.

    Ctrl-C (or SIGTERM) stops after the current step, keeps the last epoch's checkpoint and exports the best epoch so far.
    """
    scale_out.relaunch_if_asked(ctx, "train-rec", out, resume, nproc, devices, nnodes, master)  # exits when it relaunched
    from shitu_cli.train.rec import train_rec
    from shitu_cli.train.rec_settings import parse_rgb
    from shitu_cli.train.stop import exit_code_for

    overrides = {"backbone": backbone, "embedding_size": embedding_size, "input_size": input_size, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "seed": seed, "num_workers": num_workers, "eval_every": eval_every,
                 "holdout": holdout, "query_fraction": query_fraction, "pretrained_output": pretrained_output,
                 "pretrained_mean": parse_rgb(pretrained_mean, "--pretrained-mean"),
                 "pretrained_std": parse_rgb(pretrained_std, "--pretrained-std"), "backbone_lr_scale": backbone_lr_scale}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    distill = {"teacher_output": teacher_output, "teacher_size": teacher_size, "teacher_mean": teacher_mean,
               "teacher_std": teacher_std, "teacher_views": teacher_views, "label_weight": label_weight,
               "cosine_weight": cosine_weight, "relation_weight": relation_weight,
               "unlabeled_per_batch": unlabeled_per_batch,
               "cache_dir": str(teacher_cache) if teacher_cache else None}
    distill = {k: v for k, v in distill.items() if v is not None} or None
    with contextlib.ExitStack() as stack:
        result = train_rec(dataset, out, recipe=recipe, pretrained=pretrained, resume=resume,
                           progress=_TrainingProgress(stack), teacher=teacher, unlabeled=unlabeled, distill=distill,
                           **overrides)
    if result is None:  # a data-parallel worker other than rank 0: rank 0 reports
        return
    for note in result.warnings:
        render.warn(note)
    if json_output:
        render.print_json(summary(result))
    else:
        render.file_problems("skipped images (left out of training)", [(s.path, s.reason) for s in result.skipped])
        render.show(_table(result))
        render.show(f"exported {result.embedding_size}-d embeddings to {result.export_dir}; recipe {result.recipe}")
    if result.stopped_by:
        render.warn(f"stopped by {result.stopped_by} after {result.epochs_done} of {result.epochs} epochs; exported the "
                    f"best epoch so far ({result.best_epoch}); continue with `shitu train-rec -o {result.run_dir} --resume`")
        raise typer.Exit(exit_code_for(result.stopped_by))


class _TrainingProgress:
    """A bar opened at the first step (so an input error prints alone); a line per finished epoch, which off
    a terminal is all there is."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.bar, self.total = stack, None, None

    def __call__(self, advance: int = 0, total: int | None = None, completed: int | None = None,
                 epoch_end=None, **fields) -> None:
        if total is not None:
            self.total = total
        if epoch_end is not None:
            render.print_epoch(epoch_end)
            return
        if "teacher" in fields:  # --teacher: outputs not in the cache yet are computed before training
            done, todo = fields["teacher"]
            render.info(f"teacher: {done}/{todo} images run (the others come from the teacher cache)")
            return
        if not render.err_console.is_terminal:
            return
        if self.bar is None:
            self.bar = self.stack.enter_context(render.progress("training", total=self.total, unit="step"))
        self.bar(advance + (completed or 0), **fields)


def summary(result) -> dict:
    """The --json document: metrics as fractions 0..1."""
    return {
        "run_dir": result.run_dir, "export_dir": result.export_dir, "recipe": result.recipe,
        "backbone": result.backbone, "embedding_size": result.embedding_size, "input_size": result.input_size,
        "epochs": result.epochs, "steps_per_epoch": result.steps_per_epoch, "batch_size": result.batch_size,
        "train_images": result.train_images, "train_classes": result.train_classes,
        "gallery_images": result.gallery_images, "query_images": result.query_images,
        "best_epoch": result.best_epoch, "best_metric": result.best_metric, "best_recall1": result.best_recall1,
        "recall1": result.final.get("recall1"), "recall5": result.final.get("recall5"), "mAP": result.final.get("mAP"),
        "initial": result.initial, "export_max_abs_diff": result.export_max_abs_diff,
        "export_normalised_diff": result.export_normalised_diff,
        "pretrained": result.pretrained, "resumed_from_epoch": result.resumed_from_epoch,
        "seconds": result.seconds, "warnings": result.warnings, "skipped": result.skipped,
        "epochs_done": result.epochs_done, "stopped_by": result.stopped_by, "distillation": result.distillation,
    }


def _table(result):
    rows = [
        ("backbone", f"{result.backbone} -> BNNeck({result.embedding_size}), {result.input_size} px"),
        ("data", f"{result.train_images} train images / {result.train_classes} classes; "
                 f"{result.gallery_images} gallery, {result.query_images} query"),
        ("schedule", f"{result.epochs} epochs x {result.steps_per_epoch} steps, batch {result.batch_size}"),
    ]
    if result.distillation:
        d = result.distillation
        rows.append(("teacher", f"{d['teacher']['path']} ({d['teacher']['output']}, {d['teacher']['dim']}-d); "
                                f"{d['pool_images']} images x {d['views']} views: {d['cache_hits']} from the cache, "
                                f"{d['cache_misses']} run now ({d['cache_dir']})"))
    for name in ("recall1", "recall5", "mAP"):
        if name in result.final:
            rows.append((name, f"{result.final[name]:.4f} (untrained {result.initial[name]:.4f})"))
    if result.best_epoch is not None:
        rows.append(("best epoch", f"{result.best_epoch} (by {result.best_metric})"))
    rows.append(("export check", f"max |diff| {result.export_normalised_diff:.1e} on unit embeddings "
                                 f"({result.export_max_abs_diff:.1e} raw) vs the trained model"))
    rows.append(("time", f"{result.seconds:.1f} s"))
    return render.table("train-rec", ["", "value"], rows)
