"""Does SSLD-style distillation help a tiny PP-LCNet? Trains a teacher and, on the same budget, a student
with and without it, on scikit-learn's digits (upscaled), then writes benchmarks/distill_report.md.

    .venv/bin/python benchmarks/distill_report.py [--work DIR] [--teacher RUN_OR_EXPORT]

Two settings: (a) every training image labelled; (b) a quarter labelled, the rest given as
--unlabeled images, which only a teacher can use.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu_cli.data.lists import image_list_text, labels_text  # noqa: E402
from shitu_cli.train.cls import resolve_settings, train_cls  # noqa: E402
from tests.synth import write_digits  # noqa: E402

REPORT = Path(__file__).with_name("distill_report.md")
SIZE = 32  # stored size; the nets read them at COMMON["input_size"], as recipes/cls/digits.yml does
TEACHER = {"model": "PPLCNet_x1_0", "epochs": 10}
STUDENT = {"model": "PPLCNet_x0_25", "epochs": 6}
COMMON = {"input_size": 48, "batch_size": 32, "lr": 0.1, "warmup_epochs": 1, "min_crop": 0.85, "flip": False,
          "ema": False, "label_smoothing": 0.0, "seed": 7}


def fixed_split(images: Path, out: Path, labelled_share: float, seed: int = 0) -> tuple[Path, Path | None]:
    """Lists (in a dataset dir of linked class folders): a fixed 20% val, `labelled_share` of the rest
    labelled; the other training images are copied to an unlabelled folder."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    dataset, unlabeled = out / "dataset", out / "unlabeled"
    dataset.mkdir(parents=True)
    train, val = [], []
    for class_id, name in enumerate(classes):
        (dataset / name).symlink_to(images / name, target_is_directory=True)
        files = sorted((images / name).iterdir())
        order = rng.permutation(len(files))
        n_val = round(0.2 * len(files))
        val += [(f"{name}/{files[i].name}", class_id) for i in order[:n_val]]
        rest = order[n_val:]
        n_labelled = max(2, round(labelled_share * len(rest)))
        train += [(f"{name}/{files[i].name}", class_id) for i in rest[:n_labelled]]
        for i in rest[n_labelled:]:
            unlabeled.mkdir(exist_ok=True)
            shutil.copy(files[i], unlabeled / f"{name}_{files[i].name}")
    (dataset / "train_list.txt").write_text(image_list_text(train), encoding="utf-8")
    (dataset / "val_list.txt").write_text(image_list_text(val), encoding="utf-8")
    (dataset / "labels.txt").write_text(labels_text(classes), encoding="utf-8")
    return dataset, (unlabeled if unlabeled.exists() else None)


def run(dataset: Path, out: Path, **overrides) -> dict:
    settings = resolve_settings(Path("recipes/cls/tiny.yml"), {**COMMON, **overrides})
    summary = train_cls(dataset, out, **settings)
    return {"top1": summary.best_top1, "top5": summary.best_top5, "seconds": summary.seconds,
            "train": summary.train_images, "unlabeled": summary.unlabeled_images}


def machine() -> str:
    from shitu_cli.bench.system import cpu_model

    model = cpu_model()
    return f"{model}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temp dir).")
    parser.add_argument("--teacher", type=Path, default=None, help="Reuse a teacher (run dir or export) instead of training one.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-report-"))
    images = write_digits(work / "digits", SIZE)
    full, _ = fixed_split(images, work / "full", 1.0)
    quarter, extra = fixed_split(images, work / "quarter", 0.25)
    started = time.perf_counter()

    teacher = args.teacher
    teacher_row = None
    if teacher is None:
        teacher_row = run(full, work / "teacher", **TEACHER)
        teacher = work / "teacher" / "export"
    rows = {
        "(a) student alone, all labels": run(full, work / "a_alone", **STUDENT),
        "(a) student + teacher, all labels": run(full, work / "a_distil", teacher=teacher, **STUDENT),
        "(b) student alone, 25% labels": run(quarter, work / "b_alone", **STUDENT),
        "(b) student + teacher, 25% labels + rest unlabelled": run(quarter, work / "b_distil", teacher=teacher, unlabeled=extra, **STUDENT),
    }
    write_report(rows, teacher_row, time.perf_counter() - started)
    print(REPORT.read_text(encoding="utf-8"))


def write_report(rows: dict[str, dict], teacher_row: dict | None, seconds: float) -> None:
    lines = [
        "# Distillation on a tiny PP-LCNet (measured)",
        "",
        "Written by `benchmarks/distill_report.py`; numbers are from one run on this machine:",
        f"{machine()}. The machine was shared with other jobs, so times are rough.",
        "",
        f"Data: scikit-learn's digits (1797 images, 10 classes), 8x8 upscaled to {SIZE} px, a fixed 20% val split.",
        f"Teacher: {TEACHER['model']}, {TEACHER['epochs']} epochs" + (f", val top-1 {teacher_row['top1']:.2%}." if teacher_row else "."),
        f"Students: {STUDENT['model']}, {STUDENT['epochs']} epochs, identical settings and seed "
        f"(input {COMMON['input_size']} px, batch {COMMON['batch_size']}, lr {COMMON['lr']}, cosine, no EMA, no label smoothing); "
        "the only difference is "
        "`--teacher` (KL at T=4, weight 0.5, plus CE) and, in (b), `--unlabeled`.",
        "",
        "| run | labelled train images | unlabelled images | val top-1 | val top-5 | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['train']} | {row['unlabeled']} | {row['top1']:.2%} | {row['top5']:.2%} | {row['seconds']:.0f} |")
    a_gain = rows["(a) student + teacher, all labels"]["top1"] - rows["(a) student alone, all labels"]["top1"]
    b_gain = rows["(b) student + teacher, 25% labels + rest unlabelled"]["top1"] - rows["(b) student alone, 25% labels"]["top1"]
    lines += [
        "",
        f"Distillation changed val top-1 by {a_gain * 100:+.1f} points with all labels and by {b_gain * 100:+.1f} points "
        "with a quarter of the labels plus the rest as unlabelled images.",
        f"Whole benchmark: {seconds:.0f} s.",
        "",
    ]
    REPORT.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
