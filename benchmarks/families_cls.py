"""train-cls families side by side on a small real set: each model trained briefly from scratch (no
downloads) with one recipe, then its export's size, test top-1 and CPU latency, measured in one run.
Writes benchmarks/families_cls.md.

    .venv/bin/python benchmarks/families_cls.py [--work DIR] [--epochs N] [--models A,B,...]

Data: ../shared/data/fruits360 (7 classes; train/ is split 80/20 into train/val by train-cls, test/ is
held out and only used for the reported top-1). Images are shrunk once to a 96 px short side first, so
decoding does not dominate the CPU budget. Latency: Paddle Inference, oneDNN, 1 thread, batch 1; the
models are timed in interleaved rounds (each round times every model once), median over rounds, at the
trained input size and at 224 px (the trained weights exported again at 224 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPORT = Path(__file__).with_name("families_cls.md")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fruits360"
MODELS = ("PPLCNet_x1_0", "MobileNetV3_small_x1_0", "ResNet18_vd", "ResNet50_vd")
RECIPE = "resnet-cpu"  # the shipped CPU recipe (64 px, cosine lr 0.05, EMA), the same for every model
SHORT_SIDE = 96
ROUNDS, CALLS = 30, 3


def shrink_tree(source: Path, target: Path) -> None:
    from PIL import Image

    for path in sorted(source.rglob("*.jpg")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = SHORT_SIDE / min(image.size)
            image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR).save(out, quality=95)


def test_top1(export_dir: Path, test_dir: Path) -> float:
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.classifier import Classifier

    classifier = Classifier(export_dir)
    hits = total = 0
    for class_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        images = [read_image(p) for p in sorted(class_dir.glob("*.jpg"))]
        for top in classifier.classify(images, topk=1):
            hits += top[0].label == class_dir.name
            total += 1
    return hits / total


def export_at(run_dir: Path, size: int, out: Path) -> Path:
    """The run's trained weights (checkpoints/best.pdparams) exported again at `size` px. Trained, not
    freshly initialised weights: random-init ResNets pass denormal floats between layers, which made them
    look 3-4x slower on this CPU than the same net with trained weights."""
    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import read_model_manifest
    from shitu_cli.train.cls_model import WithSoftmax, _inference_form
    from shitu_cli.train.distill import load_teacher

    manifest = read_model_manifest(run_dir / "export")
    manifest.input_size = (size, size)
    model = _inference_form(load_teacher(run_dir).model)
    return export_layer(WithSoftmax.wrap(model), out, [[None, 3, size, size]], manifest)


def interleaved_latency(model_dirs: dict[str, Path]) -> dict[str, tuple[float, float]]:
    """(best round, median round) ms per batch-1 call of each model; rounds interleaved so machine load
    hits all alike. On a machine shared with other jobs the best round is the steadier figure."""
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    predictors = {k: build_predictor(d, PredictorOptions(threads=1, mkldnn=True), task="cls") for k, d in model_dirs.items()}
    inputs = {k: np.random.default_rng(0).normal(size=(1, 3, *p.manifest.input_size)).astype(np.float32) for k, p in predictors.items()}
    for key, predictor in predictors.items():  # warm-up: oneDNN builds its kernels on the first calls
        for _ in range(3):
            predictor.run(inputs[key])
    samples: dict[str, list[float]] = {k: [] for k in predictors}
    for _ in range(ROUNDS):
        for key, predictor in predictors.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                predictor.run(inputs[key])
            samples[key].append((time.perf_counter() - start) / CALLS * 1000)
    return {k: (float(np.min(v)), float(np.median(v))) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--reuse", action="store_true", help="Take the trained runs and scores from --work/rows.json; time them again.")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"no data at {DATA}")
    work = args.work or Path(tempfile.mkdtemp(prefix="families-cls-"))
    rows = json.loads((work / "rows.json").read_text(encoding="utf-8")) if args.reuse else train_all(work, args)
    at_224 = {a: export_at(work / "runs" / a, 224, work / "at224" / a) for a in rows}
    load_before = os.getloadavg()[0]
    latency = interleaved_latency({**{(a, "trained"): Path(r["export"]) for a, r in rows.items()},
                                   **{(a, 224): d for a, d in at_224.items()}})
    write_report(rows, latency, args.epochs, (load_before, os.getloadavg()[0]))


def train_all(work: Path, args) -> dict:
    from shitu_cli.train.cls import resolve_settings, train_cls

    shrink_tree(DATA / "train", work / "train")
    shrink_tree(DATA / "test", work / "test")
    rows = {}
    for arch in args.models.split(","):
        settings = resolve_settings(RECIPE, {"model": arch, "epochs": args.epochs, "num_workers": 1})
        started = time.perf_counter()
        summary = train_cls(work / "train", work / "runs" / arch, **settings)
        rows[arch] = {"train_s": time.perf_counter() - started, "val_top1": summary.best_top1,
                      "test_top1": test_top1(summary.export_dir, work / "test"), "export": str(summary.export_dir),
                      "size_mb": (summary.export_dir / "inference.pdiparams").stat().st_size / 2**20,
                      "input": settings["input_size"], "diff": summary.export_max_abs_diff}
        print(f"{arch}: {rows[arch]}", file=sys.stderr, flush=True)
        (work / "rows.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


def write_report(rows: dict, latency: dict, epochs: int, load: tuple[float, float]) -> None:
    base = "PPLCNet_x1_0" if "PPLCNet_x1_0" in rows else next(iter(rows))
    lines = [
        "# train-cls families on fruits360 (CPU)",
        "",
        f"Written by `benchmarks/families_cls.py` on {time.strftime('%Y-%m-%d')}, one run, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs shared with other jobs: load average {load[0]:.1f} before and {load[1]:.1f} after the "
        "latency rounds, so absolute times are noisy and even the interleaved ratios move between repeated runs.",
        "",
        f"Each model trained from scratch (no pretrained weights, nothing downloaded) for {epochs} epochs with `--recipe {RECIPE}` "
        f"(input {next(iter(rows.values()))['input']} px, SGD cosine lr 0.05, label smoothing 0.1, EMA) and only `--model` changed. "
        "Data: fruits360, 7 classes, 280 train photos (224 train / 56 val after train-cls's split), 105 held-out test photos. "
        "Latency: Paddle Inference with oneDNN, 1 thread, batch 1, "
        f"{ROUNDS} interleaved rounds x {CALLS} calls, best and median round; the 224 px column times the trained weights exported again at 224 px.",
        "",
        "| model | params file MB | test top-1 | val top-1 | export vs dygraph | ms @ train size (best / median) | ms @ 224 (best / median) | x PP-LCNet @ 224 (best) | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, r in rows.items():
        (small, small_med), (big, big_med) = latency[(arch, "trained")], latency[(arch, 224)]
        lines.append(f"| {arch} | {r['size_mb']:.1f} | {r['test_top1']:.3f} | {r['val_top1']:.3f} | {r['diff']:.1e} | "
                     f"{small:.2f} / {small_med:.2f} | {big:.1f} / {big_med:.1f} | {big / latency[(base, 224)][0]:.1f} | {r['train_s']:.0f} |")
    lines += [
        "",
        "Read with care: a short from-scratch run on 280 photos says little about what each family reaches with",
        "ImageNet weights (`--pretrained NAME-pretrained` / `_ssld-pretrained`, see `shitu models families`);",
        "the deeper nets are the ones that need more data or epochs. The latency and size columns do not depend on that.",
        "",
    ]
    REPORT.write_text("\n".join(lines), encoding="utf-8")
    print(REPORT.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
