"""Write benchmarks/compress_report.md: size, latency p50 and quality before/after `shitu compress`, measured
in one run on this machine.

The default-size model is PP-LCNet x1_0 at 224 px trained briefly by `train-cls` on drawn synthetic
classes (no real dataset or pretrained weights can be downloaded here). Usage:
    .venv/bin/python benchmarks/compress_report.py [--work DIR] [--threads 1] [--runs 50]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPOCHS = 8
METHODS = {
    "ptq (Paddle, oneDNN INT8)": {"quant": "ptq"},
    "onnx-int8 (onnxruntime)": {"onnx_int8": True},
    "prune 0.3 + distill": {"prune": 0.3, "epochs": 3},
    "prune 0.3 + distill + ptq": {"prune": 0.3, "epochs": 3, "quant": "ptq"},
}


def machine() -> str:
    import os

    from shitu_cli.bench.system import cpu_model

    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "compress_report.md")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="compress-report-"))

    from shitu_cli.compress.pipeline import compress
    from shitu_cli.recipes import package_versions
    from shitu_cli.train.cls import train_cls
    from tests.synth import make_class_tree

    started = time.perf_counter()
    data, run = work / "data", work / "run"
    if not (run / "export" / "shitu.yaml").is_file():
        make_class_tree(data, 6, 24, size=224, seed=11)
        train_cls(data, run, model="PPLCNet_x1_0", input_size=224, epochs=EPOCHS, batch_size=8, lr=0.05,
                  warmup_epochs=0.5, min_crop=0.5, ema=False, val=0.25, num_workers=2)
    calib, val = run / "split" / "train_list.txt", run / "split" / "val_list.txt"
    rows = []
    for number, (name, options) in enumerate(METHODS.items()):
        result = compress(run, calib, work / f"out{number}", eval_list=val, threads=args.threads, runs=args.runs,
                          max_drop=100.0, calib_size=64, batch_size=8, **options)
        rows.append((name, result))
    write_report(args.out, rows, args, time.perf_counter() - started, package_versions())
    print(f"wrote {args.out}")


def write_report(path: Path, rows, args, seconds: float, versions: dict[str, str]) -> None:
    lines = [
        "# `shitu compress`: before and after",
        "",
        f"Machine: {machine()}. Measured in one run of `benchmarks/compress_report.py` ({seconds:.0f} s);",
        f"latency is the p50 of {args.runs} batch-1 calls at {args.threads} thread(s), oneDNN on for Paddle.",
        f"Versions: paddlepaddle {versions['paddlepaddle']}, numpy {versions['numpy']}.",
        "",
        f"Model: PP-LCNet x1_0 at 224 px, trained for {EPOCHS} epochs by `train-cls` on 6 drawn synthetic classes",
        "(the default models cannot be downloaded here). Calibration and fine-tuning: the run's train list;",
        "quality: its val list. Each row re-measures the original (fp32, Paddle Inference) beside the",
        "compressed model, so `before` differs a little from row to row: that is the machine's noise.",
        "",
        "| method | precision | backend | size MB before → after | p50 ms before → after | speedup | top-1 agreement | top-1 before → after |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        b, a = r.before, r.after
        lines.append(f"| {name} | {a.precision} | {a.backend} | {b.size_mb:.2f} → {a.size_mb:.2f} | "
                     f"{b.latency_ms_p50:.2f} → {a.latency_ms_p50:.2f} | {r.speedup:.2f}x | "
                     f"{a.agreement['agreement']:.3f} | {b.metric.get('top1', float('nan')):.3f} → {a.metric.get('top1', float('nan')):.3f} |")
    lines += ["", "Notes from the runs (a model that is not faster is said so plainly):", ""]
    for name, r in rows:
        for note in r.notes:
            lines.append(f"- {name}: {note}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
