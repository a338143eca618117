"""Write benchmarks/compress_report.md: size, latency p50, peak memory and quality before/after
`shitu compress`, measured in one run on this machine.

Sections: the default detector and recogniser (the demo models `shitu predict` uses out of the box,
assets/demo/models), then PP-LCNet x1_0 at 224 px trained briefly by `train-cls` on drawn synthetic
classes (no real dataset or pretrained weights can be downloaded here). Usage:
    .venv/bin/python benchmarks/compress_report.py [--work DIR] [--threads 1] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_MODELS = ROOT / "assets" / "demo" / "models"
EPOCHS = 8
DET_METHODS = {"ptq auto (default)": {"algo": "auto"}, "ptq hist": {"algo": "hist"}, "ptq avg": {"algo": "avg"},
               "ptq KL": {"algo": "KL"},
               "onnx-int8 (onnxruntime)": {"onnx_int8": True},
               # Pruning fine-tunes on the images it gets: it is given 200 scenes and 10 epochs.
               "prune 0.3 + distill (200 scenes)": {"prune": 0.3, "quant": "none", "epochs": 10, "lr": 0.01,
                                                    "calib": "large", "calib_size": 200},
               # hist clipped the fine-tuned net's activations in an earlier run (mAP 0.62 -> 0.003); avg keeps them.
               "prune 0.3 + distill + ptq avg (200 scenes)": {"prune": 0.3, "quant": "ptq", "algo": "avg", "epochs": 10,
                                                              "lr": 0.01, "calib": "large", "calib_size": 200}}
REC_METHODS = {"onnx-int8 (onnxruntime)": {"onnx_int8": True}}
CLS_METHODS = {
    "ptq auto (Paddle, oneDNN INT8)": {"quant": "ptq"},
    "onnx-int8 (onnxruntime)": {"onnx_int8": True},
    "prune 0.3 + distill": {"prune": 0.3, "epochs": 3},
    "prune 0.3 + distill + ptq": {"prune": 0.3, "epochs": 3, "quant": "ptq"},
}
# A child process that loads one model, runs it 20 times and reports its peak resident memory.
# VmHWM, not getrusage: Linux carries ru_maxrss over from the forking parent into the exec'd child.
PEAK_RSS_CHILD = """
import json, sys
import numpy as np
from shitu_cli.infer.predictor import PredictorOptions, build_predictor
from shitu_cli.models.manifest import read_model_manifest
manifest = read_model_manifest(sys.argv[1])
backend = manifest.extra.get("backend", sys.argv[2])
predictor = build_predictor(sys.argv[1], PredictorOptions(backend=backend, threads=1), task=manifest.task)
height, width = manifest.input_size
image = np.random.rand(1, 3, height, width).astype(np.float32)
feeds = {"image": image, "scale_factor": np.ones((1, 2), np.float32)} if manifest.task == "det" else image
for _ in range(20):
    predictor.run(feeds)
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(json.dumps({"peak_mb": int(status.split()[0]) / 1024}))
"""


def machine() -> str:
    import os

    from shitu_cli.bench.system import cpu_model

    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def peak_rss_mb(model_dir: Path, backend: str = "paddle") -> float:
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(model_dir), backend], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def det_data(work: Path) -> tuple[dict[str, Path], Path]:
    """Calibration scenes (32, and 200 for fine-tuning) and 40 held-out scenes with COCO boxes, generated like
    the demo's training scenes."""
    from shitu_cli.demo_data import load_sources, write_scenes

    sources = load_sources()
    calib, large, held_out = work / "det_calib", work / "det_calib200", work / "det_eval"
    if not (held_out / "annotations.json").is_file():
        write_scenes(sources, calib, 32, seed=31)
        write_scenes(sources, large, 200, seed=77)
        write_scenes(sources, held_out, 40, seed=41)
    return {"default": calib / "images", "large": large / "images"}, held_out / "annotations.json"


def cls_run(work: Path) -> Path:
    from shitu_cli.train.cls import train_cls
    from tests.synth import make_class_tree

    data, run = work / "data", work / "run"
    if not (run / "export" / "shitu.yaml").is_file():
        make_class_tree(data, 6, 24, size=224, seed=11)
        train_cls(data, run, model="PPLCNet_x1_0", input_size=224, epochs=EPOCHS, batch_size=8, lr=0.05,
                  warmup_epochs=0.5, min_crop=0.5, ema=False, val=0.25, num_workers=2)
    return run


def run_section(model: Path, calib: Path | dict[str, Path], eval_list: Path, methods: dict, work: Path, args, tag: str) -> list:
    from shitu_cli.compress.pipeline import compress

    calib_sets = calib if isinstance(calib, dict) else {"default": calib}
    rows = []
    for number, (name, options) in enumerate(methods.items()):
        options = {"calib_size": 64, **options}
        chosen = calib_sets[options.pop("calib", "default")]
        result = compress(model, chosen, work / f"{tag}{number}", eval_list=eval_list, threads=args.threads, runs=args.runs,
                          max_drop=100.0, batch_size=8, **options)
        memory = (peak_rss_mb(result.before.model_dir), peak_rss_mb(result.after.model_dir))
        rows.append((name, result, memory))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "compress_report.md")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="compress-report-"))

    from shitu_cli.recipes import package_versions

    started = time.perf_counter()
    det_calib, det_eval = det_data(work)
    sections = {
        "det": run_section(DEMO_MODELS / "det", det_calib, det_eval, DET_METHODS, work, args, "det"),
        "rec": run_section(DEMO_MODELS / "rec", ROOT / "assets" / "demo" / "gallery", ROOT / "assets" / "demo" / "gallery",
                           REC_METHODS, work, args, "rec"),
    }
    run = cls_run(work)
    sections["cls"] = run_section(run, run / "split" / "train_list.txt", run / "split" / "val_list.txt", CLS_METHODS,
                                  work, args, "cls")
    onnx_memory = {task: peak_rss_mb(DEMO_MODELS / task, "onnxruntime") for task in ("det", "rec")}
    write_report(args.out, sections, onnx_memory, args, time.perf_counter() - started, package_versions())
    print(f"wrote {args.out}")


SECTION_TEXT = {
    "det": ("The default detector: assets/demo/models/det",
            "PicoDet LCNet x0.75 at 256 px (the mainbody detector `shitu predict` uses by default), compressed "
            "from its export alone (its `ppdet_model.yml` rebuilds the network, the weights come from the export). "
            "Calibration: 32 generated scenes (pruning: 200); quality: 40 other generated scenes with their boxes (COCO mAP, "
            "class-agnostic) and box agreement (F1 of IoU >= 0.5 matches between the two models' boxes above "
            "predict's 0.5 threshold). The pruned row calibrates with `--algo avg`: with hist, INT8 of the "
            "fine-tuned pruned net fell to mAP 0.003 in one run (hist clips the ranges its activations took); "
            "the default `--algo auto` scores hist, abs_max, avg and mse on held-out scenes and keeps the best.",
            "box agreement", "mAP"),
    "rec": ("The default recogniser: assets/demo/models/rec",
            "PP-LCNet x0.5 + BNNeck, 128-d, 96 px. It ships as an export without its training run, so the "
            "route is `--onnx-int8` (Paddle PTQ, pruning and QAT rebuild the network from a train-rec run). "
            "Calibration and quality: the 18 gallery images (leave-one-out recall@1; agreement: the nearest "
            "other image carries the same label under both models).", "NN agreement", "recall@1"),
    "cls": ("A trained classifier: PP-LCNet x1_0",
            f"224 px, trained for {EPOCHS} epochs by `train-cls` on 6 drawn synthetic classes. Calibration and "
            "fine-tuning: the run's train list; quality: its val list.", "top-1 agreement", "top1"),
}


def write_report(path: Path, sections: dict, onnx_memory: dict[str, float], args, seconds: float,
                 versions: dict[str, str]) -> None:
    lines = [
        "# `shitu compress`: before and after",
        "",
        f"Machine: {machine()}. Measured in one run of `benchmarks/compress_report.py` ({seconds:.0f} s);",
        f"latency is the p50 of {args.runs} batch-1 calls at {args.threads} thread(s), oneDNN on for Paddle.",
        "Peak memory: the resident set of a fresh process that loads the model and runs it 20 times.",
        f"Versions: paddlepaddle {versions['paddlepaddle']}, numpy {versions['numpy']}.",
        "Each row re-measures the original (fp32, Paddle Inference) beside the compressed model, so",
        "`before` differs a little from row to row: that is the machine's noise.",
    ]
    for task, rows in sections.items():
        title, text, agreement_name, metric = SECTION_TEXT[task]
        lines += ["", f"## {title}", "", text, "",
                  f"| method | precision | backend | size MB before → after | p50 ms before → after | speedup | "
                  f"{agreement_name} | {metric} before → after | peak memory MB before → after |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, r, (memory_before, memory_after) in rows:
            b, a = r.before, r.after
            lines.append(f"| {name} | {a.precision} | {a.backend} | {b.size_mb:.2f} → {a.size_mb:.2f} | "
                         f"{b.latency_ms_p50:.2f} → {a.latency_ms_p50:.2f} | {r.speedup:.2f}x | "
                         f"{a.agreement['agreement']:.3f} | {b.metric.get(metric, float('nan')):.3f} → "
                         f"{a.metric.get(metric, float('nan')):.3f} | {memory_before:.0f} → {memory_after:.0f} |")
    lines += ["", "## Memory", "",
              "The model files are a small part of a process's memory: the runtime dominates. The same fp32 models",
              f"peak at {onnx_memory['det']:.0f} MB (detector) and {onnx_memory['rec']:.0f} MB (recogniser) on onnxruntime, "
              "against the Paddle Inference",
              "rows above, so on a device with about 200 MB the runtime is the first thing to choose",
              "(`--backend onnxruntime` in predict, build-index and benchmark-cpu), and INT8 then halves the files again.",
              "", "## Notes from the runs", "", "A model that is not faster is said so plainly:", ""]
    for task, rows in sections.items():
        for name, r, _ in rows:
            for note in r.notes:
                lines.append(f"- {task}, {name}: {note}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
