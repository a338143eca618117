"""Write benchmarks/families_det.md: each train-det family's CPU latency (1 thread, interleaved), size and
mAP on a small real-photo set, measured in one run on this machine.

The set: real Fruits-360 photos (../shared/data/fruits360; white-background fruit shots) cut out of
their white background and pasted, 1-3 per scene at 160x160, onto crops of the demo's real background
photos (assets/demo/sources/background_*.jpg). Train scenes use train/ photos, val scenes the unseen
test/ photos. Four classes. Every family trains from scratch (no pretrained weights can be fetched here)
for the same short budget, so the mAPs compare what each learns in a few CPU minutes, not what it can reach.
Usage:
    .venv/bin/python benchmarks/families_det.py [--work DIR] [--epochs 20] [--runs 32]
The recorded families_det.md: --epochs 20 --train-scenes 128 --val-scenes 32 --runs 32 --eval-every 4
--train-minutes 58, run with nice; ppyoloe-m (latency and size only) from a 1-epoch export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRUITS = ROOT.parent / "shared" / "data" / "fruits360"
CLASSES = ["apple_golden_1", "Cherry 3", "Papaya 2", "Plum 5"]
SIZE = 160  # small enough that every family trains in minutes on 2 shared cores
# (family, recipe, flags): the PicoDet row is the mainbody architecture trained multi-class (--keep-classes).
FAMILIES = [
    ("picodet", "small", []),
    ("ppyoloe", "ppyoloe-cpu", []),
    # the recipe mixes up 250 of 270 epochs; on a budget of a few hundred steps mixup only slows learning
    ("yolov3", "yolov3-mobilenetv1", ["--mixup-epochs", "0"]),
    ("ppyoloe", "ppyoloe-s", []),
]
# measured for latency and size only: training it is beyond this benchmark's CPU budget
UNTRAINED = [("ppyoloe", "ppyoloe-m")]


# ---------------------------------------------------------------- data


def cut_out(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tight crop, mask) of the fruit: everything not near-white, closed and filled."""
    foreground = (photo.min(axis=2) < 230).astype(np.uint8) * 255
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    contours, _ = cv2.findContours(foreground, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros_like(foreground)
    cv2.drawContours(mask, [max(contours, key=cv2.contourArea)], -1, 255, thickness=cv2.FILLED)
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return photo[top:bottom, left:right], mask[top:bottom, left:right]


def paste(scene: np.ndarray, photo: np.ndarray, mask: np.ndarray, rng, taken: list) -> list[float] | None:
    side = rng.uniform(0.2, 0.45) * SIZE
    ratio = side / max(photo.shape[:2])
    size = (max(8, round(photo.shape[1] * ratio)), max(8, round(photo.shape[0] * ratio)))
    photo, mask = cv2.resize(photo, size, interpolation=cv2.INTER_AREA), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    photo = np.clip(photo.astype(np.float32) * rng.uniform(0.75, 1.2) + rng.uniform(-15, 15), 0, 255).astype(np.uint8)
    h, w = mask.shape
    for _ in range(30):
        x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
        box = [float(x), float(y), float(w), float(h)]
        if all(_overlap(box, other) < 0.05 for other in taken):
            region = scene[y : y + h, x : x + w]
            region[mask > 0] = photo[mask > 0]
            return box
    return None


def _overlap(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def build_set(out: Path, train_scenes: int, val_scenes: int, seed: int = 0) -> Path:
    from shitu_cli.data.images import read_image
    from shitu_cli.data.scenes import background_crop

    rng = np.random.default_rng(seed)
    backgrounds = [read_image(p) for p in sorted((ROOT / "assets" / "demo" / "sources").glob("background_*.jpg"))]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, folder, count in (("train", "train", train_scenes), ("val", "test", val_scenes)):
        photos = {c: [cut_out(read_image(p)) for p in sorted((FRUITS / folder / c).glob("*.jpg"))] for c in CLASSES}
        document = {"images": [], "annotations": [],
                    "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]}
        for number in range(count):
            scene = background_crop(backgrounds[int(rng.integers(len(backgrounds)))], (SIZE, SIZE), rng)
            taken = []
            for label in rng.choice(len(CLASSES), size=int(rng.integers(1, 4)), replace=True):
                choices = photos[CLASSES[label]]
                photo, mask = choices[int(rng.integers(len(choices)))]
                box = paste(scene, photo, mask, rng, taken)
                if box is not None:
                    taken.append(box)
                    document["annotations"].append({"id": len(document["annotations"]) + 1, "image_id": number + 1,
                                                    "category_id": int(label) + 1, "bbox": box, "area": box[2] * box[3],
                                                    "iscrowd": 0})
            name = f"images/{split}_{number:04d}.jpg"
            cv2.imwrite(str(out / name), scene[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
            document["images"].append({"id": number + 1, "file_name": name, "width": SIZE, "height": SIZE})
        (out / f"{split}.json").write_text(json.dumps(document), encoding="utf-8")
    return out


# ---------------------------------------------------------------- training


def start_training(data: Path, work: Path, recipe: str, flags: list[str], args) -> tuple[subprocess.Popen, float] | None:
    """Start one train-det run (None when an earlier invocation already finished it)."""
    run = work / "runs" / recipe
    if (run / "summary.json").is_file():
        return None
    command = [sys.executable, "-m", "shitu_cli", "train-det", str(data), "-o", str(run), "--recipe", recipe,
               "--keep-classes", "--epochs", str(args.epochs), "--input-size", str(SIZE), "--batch-size", "8",
               "--eval-every", str(args.eval_every), *flags, "--json"]
    # one thread per run: several runs side by side waste less of a shared machine than 2-thread runs stalling
    env = {**os.environ, "OMP_NUM_THREADS": str(args.train_threads), "MKL_NUM_THREADS": str(args.train_threads)}
    log = open(work / f"{recipe}.stderr", "w", encoding="utf-8")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    return process, time.perf_counter()


def finish_training(work: Path, recipe: str, started: tuple[subprocess.Popen, float] | None, deadline: float) -> dict:
    """Wait for a run; at the deadline SIGTERM it: train-det then exports its best epoch so far (a partial row)."""
    run = work / "runs" / recipe
    if started is None:
        return json.loads((run / "summary.json").read_text(encoding="utf-8"))
    process, begun = started
    try:
        stdout, _ = process.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate()
    if not stdout.strip():
        return {"error": (work / f"{recipe}.stderr").read_text(encoding="utf-8")[-500:]}
    summary = {**json.loads(stdout), "train_seconds": round(time.perf_counter() - begun, 1)}
    (run / "summary.json").write_text(json.dumps(summary, default=str), encoding="utf-8")
    return summary


def untrained_export(data: Path, work: Path, recipe: str) -> Path:
    """A zero-epoch stand-in has no meaning for mAP, so: one iteration's export, for latency and size only."""
    run = work / "runs" / recipe
    if not (run / "export" / "shitu.yaml").is_file():
        subprocess.run([sys.executable, "-m", "shitu_cli", "train-det", str(data), "-o", str(run), "--recipe", recipe,
                        "--keep-classes", "--epochs", "1", "--input-size", str(SIZE), "--batch-size", "8", "--json"],
                       capture_output=True, text=True, check=True)
    return run / "export"


# ---------------------------------------------------------------- measuring


def measure(exports: dict[str, Path], data: Path, runs: int, threads: int) -> dict[str, dict]:
    """Median / p90 latency of each exported detector (Paddle Inference, oneDNN, `threads` threads), the
    models taking turns image by image so machine load falls on all of them alike."""
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.predictor import PredictorOptions

    options = PredictorOptions(backend="paddle", threads=threads, mkldnn=True)
    detectors = {name: Detector(path, options) for name, path in exports.items()}
    images = [read_image(p) for p in sorted((data / "images").glob("val_*.jpg"))[:runs]]
    times: dict[str, list[float]] = {name: [] for name in detectors}
    for detector in detectors.values():
        detector.detect(images[0])  # warm-up
    for rgb in images:
        for name, detector in detectors.items():
            started = time.perf_counter()
            detector.detect(rgb)
            times[name].append((time.perf_counter() - started) * 1000)
    rows = {}
    for name, path in exports.items():
        params = path / "model.pdiparams"
        rows[name] = {"p50_ms": round(float(np.median(times[name])), 1), "p90_ms": round(float(np.percentile(times[name], 90)), 1),
                      "size_mb": round(params.stat().st_size / 2**20, 1), "arch": detectors[name].manifest.arch}
    return rows


def write_report(rows: list[dict], out: Path, args, seconds: float) -> None:
    cpu = platform.processor() or platform.machine()
    steps = args.train_scenes // 8 * args.epochs
    lines = [
        "# train-det families: latency, size and mAP on a small real-photo set",
        "",
        f"Written by `benchmarks/families_det.py` in one run ({seconds / 60:.0f} min) on a shared 2-core machine ({cpu}); "
        "other jobs kept the load average between 6 and 19 during training, so the training runs (niced) got a small "
        "share of the CPU, and p90 latency sits far above p50.",
        "",
        f"- **Set**: {args.train_scenes} train / {args.val_scenes} val scenes at {SIZE}x{SIZE}: real Fruits-360 photos "
        f"({', '.join(CLASSES)}) cut from their white background and pasted, 1-3 per scene, onto crops of the demo's "
        "real background photos; val scenes use the unseen test/ photos. Composited, so easier than street photos.",
        f"- **Training**: from scratch (no pretrained weights can be downloaded here), {args.epochs} epochs of "
        f"{args.train_scenes // 8} steps ({steps} steps), batch 8, {SIZE} px, each recipe's own lr, schedule and EMA; "
        "yolov3 without mixup (its recipe mixes 250 of 270 epochs; on a few hundred steps that only slows learning). "
        f"train-det cut every recipe's warm-up (100, 300 or 1000 steps) to {steps // 10} steps, 10% of the run. "
        f"The families trained side by side, one thread each; a run still training after {args.train_minutes:.0f} "
        "minutes is stopped with SIGTERM and train-det exports its best evaluated epoch (the epochs column says how "
        "far each got). "
        f"mAP is COCO mAP on the val scenes, evaluated every {args.eval_every} epochs, best epoch kept.",
        "- **The lesson of the previous run**: 8 epochs of 64 scenes (64 steps) ended inside the recipes' warm-ups, "
        "so the learning rate never reached its base value and every mAP stayed at or below 0.004. train-det now "
        "cuts such a warm-up to 10% of the run, says so in one warning line and records it in recipe.yaml.",
        f"- **Latency**: Paddle Inference, oneDNN, {args.threads} thread, batch 1, preprocessing + network + NMS, "
        f"the detectors taking turns per image over {args.runs} val images (interleaved), p50 / p90.",
        "- **Size**: model.pdiparams (float32). ppyoloe-m is a 1-epoch export (untrained), for latency and size only.",
        "",
        "| family | recipe | arch | epochs | mAP | mAP50 | AP per class | p50 ms | p90 ms | size MB | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_class = ", ".join(f"{k} {v['AP']:.2f}" for k, v in (row.get("per_class") or {}).items()) or "not trained"
        fmt = (lambda v: f"{v:.3f}" if isinstance(v, float) else "-")
        minutes = f"{row['seconds'] / 60:.1f}" if row.get("seconds") else "-"  # train-det's own clock, this run alone
        epochs = f"{row['epochs_done']}/{row['epochs']}" if row.get("epochs") else "-"
        if row.get("stopped_by"):
            epochs += " (stopped)"
        lines.append(f"| {row['family']} | {row['recipe']} | {row.get('arch', '-')} | {epochs} | {fmt(row.get('best_map'))} | "
                     f"{fmt(row.get('best_map50'))} | {per_class} | {row.get('p50_ms', '-')} | {row.get('p90_ms', '-')} | "
                     f"{row.get('size_mb', '-')} | {minutes} |")
    lines += ["", READING]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


# What the recorded run shows (written after reading it and its metrics.csv files; the table is the script's own).
READING = """**What it shows.** With its warm-up cut to 32 steps, PicoDet learns: mAP 0.240 / mAP50 0.483 after 320 steps \
(0.002, 0.012, 0.093, 0.210, 0.240 at epochs 4 to 20), where the 64-step run that never left its warm-up stopped at \
0.004. PP-YOLOE (cpu) and YOLOv3-MobileNetV1 stay near zero on the same budget, and not because of the warm-up, \
which they also left after 32 steps: PP-YOLOE's classification loss climbs from 0.5 to 30-45 once the lr reaches \
its base 0.01 and stays there (note that its recipe keeps the static ATSS assigner for 30 epochs, so this 20-epoch \
run never switched to task-aligned assignment), and YOLOv3's recipe lr (0.001, the published 8-GPU run's) moves a from-scratch \
MobileNetV1 + YOLOv3 head too little in 320 steps (objectness loss 1100 down to 25-110, mAP50 < 0.001). Both need \
pretrained backbones or thousands of steps, which this machine cannot give; their mAP columns say \
"does not learn from scratch in 320 CPU steps", not how they rank at convergence. ppyoloe-s was stopped after \
5 of 20 epochs by hand (SIGTERM; its one evaluation, at epoch 4, gave mAP 0) to give the CPU to the three rows \
above; ppyoloe-m was not trained. \
Latency, measured on the exports of this run: PicoDet is the fastest and smallest (p50 24 ms, 3.7 MB); \
PP-YOLOE cpu / s / m take 1.4x / 1.9x / 4.0x its p50, YOLOv3-MobileNetV1 4.2x at 25x its size. \
Train minutes are each run's own clock with four runs side by side on a loaded machine, not a speed measure."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/shitu-families-det"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-scenes", type=int, default=128)
    parser.add_argument("--val-scenes", type=int, default=32)
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--train-threads", type=int, default=1, help="OMP threads per training run")
    parser.add_argument("--train-minutes", type=float, default=60,
                        help="runs still training then are stopped (SIGTERM: the best epoch so far is exported)")
    parser.add_argument("--only", nargs="*", help="recipes to train (default: all)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from families_det.json")
    args = parser.parse_args()
    if not FRUITS.is_dir():
        raise SystemExit(f"needs the Fruits-360 subset at {FRUITS}")
    started = time.perf_counter()
    if args.report_only:
        rows = json.loads((ROOT / "benchmarks" / "families_det.json").read_text(encoding="utf-8"))
        write_report(rows, ROOT / "benchmarks" / "families_det.md", args, float(rows[0].get("run_seconds", 0)))
        return
    data = args.work / "data"
    if not (data / "val.json").is_file():
        build_set(data, args.train_scenes, args.val_scenes)
    rows, exports = [], {}
    chosen = [(f, r, flags) for f, r, flags in FAMILIES if not args.only or r in args.only]
    # the families train side by side, so machine load falls on all of them alike
    running = {r: start_training(data, args.work, r, flags, args) for _, r, flags in chosen}
    deadline = time.time() + args.train_minutes * 60
    for family, recipe, _ in chosen:
        summary = finish_training(args.work, recipe, running[recipe], deadline)
        rows.append({"family": family, "recipe": recipe, **summary})
        if (args.work / "runs" / recipe / "export" / "shitu.yaml").is_file():
            exports[recipe] = args.work / "runs" / recipe / "export"
    for family, recipe in UNTRAINED:
        exports[recipe] = untrained_export(data, args.work, recipe)
        rows.append({"family": family, "recipe": recipe})
    timings = measure(exports, data, args.runs, args.threads)
    for row in rows:
        row.update(timings.get(row["recipe"], {}))
    rows[0]["run_seconds"] = round(time.perf_counter() - started)
    (ROOT / "benchmarks" / "families_det.json").write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    write_report(rows, ROOT / "benchmarks" / "families_det.md", args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
