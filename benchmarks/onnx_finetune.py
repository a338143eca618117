"""Fine-tuning an ONNX backbone with `shitu train-rec --pretrained model.onnx` on real photos.

Usage (from the repository root, with the project's venv):

    python benchmarks/onnx_finetune.py teacher          # the ONNX teacher's own features (onnxruntime)
    python benchmarks/onnx_finetune.py run NAME [...]    # fine-tune; one JSON line per run in onnx_finetune_results.jsonl
    python benchmarks/onnx_finetune.py indomain NAME...  # teacher vs fine-tuned runs on the TRAINED classes' test photos
    python benchmarks/onnx_finetune.py table            # the results as a markdown table

Data: the fashion-mnist held-out-class split of benchmarks/_rec_data.py (train on 6 classes,
300 photos each; retrieval on 4 classes never trained on: 200 gallery, 400 query photos), written
under $SHITU_PROBE_DIR (default /tmp/shitu-rec-probe) when missing. Teacher:
../shared/teachers/efficientnet_lite0_imagenet.onnx (mean = std = 0.5). Runs go to
$SHITU_ONNX_RUNS (default /tmp/shitu-onnx-finetune/NAME); each run's export/ is a normal rec model.
Each run is its own process, so its wall time and peak memory (ru_maxrss) are its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _rec_data import (FMNIST, FMNIST_NAMES, FMNIST_TRAIN, PROBE_DIR, REPO, TEACHER, append_row, prepared,
                       print_child_result, read_history, read_idx, read_list, rounded, run_child, write_lists)

RUNS = Path(os.environ.get("SHITU_ONNX_RUNS", "/tmp/shitu-onnx-finetune"))
RESULTS = REPO / "benchmarks" / "onnx_finetune_results.jsonl"
HALF = [0.5, 0.5, 0.5]

# All runs: the teacher's 1280-d embedding output (no projection), CE + triplet, PK batches 8 x 4.
BASE = {"embedding_size": 1280, "input_size": 96, "epochs": 4, "batch_size": 32, "images_per_class": 4,
        "warmup_epochs": 1, "rotate_degrees": 10.0, "crop_scale_min": 0.8, "pretrained_mean": HALF,
        "pretrained_std": HALF, "num_workers": 2, "seed": 42, "eval_every": 1}
EXPERIMENTS: dict[str, dict] = {
    # the new head learns at lr 0.01, the converted backbone at a tenth of it
    "lr0.01-bb0.1": {**BASE, "lr": 0.01, "backbone_lr_scale": 0.1},
    # the whole net at lr 0.01 (what collapsed a teacher in an earlier probe, there without warm-up)
    "lr0.01-bb1": {**BASE, "lr": 0.01, "backbone_lr_scale": 1.0},
    # backbone frozen: only BNNeck + FC learn (the features stay the teacher's)
    "frozen": {**BASE, "lr": 0.01, "backbone_lr_scale": 0.0},
    "lr0.003-bb0.3": {**BASE, "lr": 0.003, "backbone_lr_scale": 0.3},
}


def dataset() -> Path:
    return prepared("fmnist")


def _read(root: Path, list_name: str, size: int) -> tuple[np.ndarray, list[str]]:
    import cv2

    from shitu_cli.data.images import read_image

    paths, labels = read_list(root, list_name)
    images = []
    for path in paths:
        rgb = cv2.resize(read_image(path), (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        images.append(((rgb / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(images), labels


def teacher() -> None:
    """The teacher's raw `embedding` output through onnxruntime, cosine retrieval, at 96 and 224 px."""
    import onnxruntime as ort

    from shitu_cli.train.metrics import retrieval_metrics

    root = dataset()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(TEACHER), options, providers=["CPUExecutionProvider"])
    for size in (96, 224):
        sides = {}
        started = time.perf_counter()
        for side in ("gallery_list.txt", "query_list.txt"):
            images, labels = _read(root, side, size)
            if size != 224:
                # the ONNX graph fixes 224 x 224; the converted Paddle layer takes any size, so run it there
                features = _paddle_features(images)
            else:
                features = np.concatenate([session.run(["embedding"], {"image": images[i:i + 32]})[0]
                                           for i in range(0, len(images), 32)])
            sides[side] = (features, labels)
        metrics = retrieval_metrics(sides["query_list.txt"][0], sides["query_list.txt"][1],
                                    sides["gallery_list.txt"][0], sides["gallery_list.txt"][1])
        row = {"name": f"teacher-features-{size}px", "final": rounded(metrics), "initial": {},
               "seconds": round(time.perf_counter() - started, 1), "engine": "onnxruntime" if size == 224 else "x2paddle layer"}
        append_row(RESULTS, row)
        print(row, flush=True)


def indomain(names: list[str]) -> None:
    """Retrieval on test-set photos of the 6 trained classes (50 gallery + 100 query each, never trained
    on): the teacher's raw features (x2paddle layer, 96 px) vs each run's export (Paddle Inference)."""
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.models.manifest import IMAGENET_MEAN, IMAGENET_STD
    from shitu_cli.train.metrics import retrieval_metrics

    root = _indomain_lists()
    sides = {side: _read(root, side, 96) for side in ("gallery_list.txt", "query_list.txt")}
    half = np.reshape([0.5] * 3, (1, 3, 1, 1))
    imagenet = {side: ((images * half + half - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1)))
                       / np.reshape(IMAGENET_STD, (1, 3, 1, 1))).astype("float32")
                for side, (images, _) in sides.items()}
    models = {"teacher-features-96px": lambda side: _paddle_features(sides[side][0])}
    for name in names:
        predictor = build_predictor(RUNS / name / "export", PredictorOptions(threads=2), task="rec")
        models[name] = lambda side, p=predictor: np.concatenate(
            [p.run(imagenet[side][i:i + 32])[0] for i in range(0, len(imagenet[side]), 32)])
    for name, embed in models.items():
        metrics = retrieval_metrics(embed("query_list.txt"), sides["query_list.txt"][1], embed("gallery_list.txt"),
                                    sides["gallery_list.txt"][1])
        row = {"name": f"{name} (trained classes)", "final": rounded(metrics), "initial": {}}
        append_row(RESULTS, row)
        print(row, flush=True)


def _indomain_lists() -> Path:
    root = PROBE_DIR / "fmnist-indomain"
    if (root / "query_list.txt").is_file():
        return root
    import cv2

    rng = np.random.default_rng(1)
    test_x, test_y = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    lists = {"gallery_list.txt": [], "query_list.txt": []}
    for cls in FMNIST_TRAIN:
        for j, i in enumerate(rng.choice(np.flatnonzero(test_y == cls), 150, replace=False)):
            rel = f"images/{FMNIST_NAMES[cls]}/{int(i):05d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / rel), test_x[i])
            lists["gallery_list.txt" if j < 50 else "query_list.txt"].append((rel, FMNIST_NAMES[cls]))
    write_lists(root, lists)
    return root


def _paddle_features(images: np.ndarray) -> np.ndarray:
    from shitu_cli.models.onnx_import import import_onnx, net_outputs

    net = import_onnx(TEACHER).net
    index = 1  # outputs: logits, embedding
    return np.concatenate([net_outputs(net, images[i:i + 32])[index] for i in range(0, len(images), 32)])


def run_one(name: str, out: Path) -> dict:
    from shitu_cli.train.rec import train_rec

    result = train_rec(dataset(), out, recipe="pp-shituv2", pretrained=TEACHER, **EXPERIMENTS[name])
    return {"name": name, "settings": EXPERIMENTS[name], "final": result.final, "initial": result.initial,
            "best_epoch": result.best_epoch, "epochs": result.epochs, "input_size": result.input_size,
            "train_images": result.train_images, "seconds": result.seconds, "export": str(result.export_dir),
            "history": read_history(out), "warnings": result.warnings,
            "onnxruntime_max_abs_diff": result.pretrained["onnxruntime_max_abs_diff"]}


def finish_one(name: str, out: Path) -> dict:
    """Export a run whose training finished but whose export failed: --resume with nothing left to train
    measures the untrained (converted teacher) net again, then exports the best epoch."""
    from shitu_cli.train.rec import train_rec

    result = train_rec(None, out, resume=True)
    return {"name": name, "settings": EXPERIMENTS[name], "final": result.final, "initial": result.initial,
            "best_epoch": result.best_epoch, "epochs": result.epochs, "input_size": result.input_size,
            "train_images": result.train_images, "seconds": None, "export": str(result.export_dir),
            "history": read_history(out), "warnings": result.warnings, "finished_by_resume": True}


def run(names: list[str]) -> None:
    import shutil

    for name in names:
        out = RUNS / name
        shutil.rmtree(out, ignore_errors=True)
        row = run_child(Path(__file__), name, out)
        if row is None:
            print(f"{name}: failed", file=sys.stderr)
            continue
        append_row(RESULTS, row)
        print(f"{name}: {row['final']} (before {row['initial']}) best epoch {row['best_epoch']}, {row['wall_s']} s, "
              f"{row['peak_rss_mb']} MB", flush=True)


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    print("| run | recall@1 | recall@5 | mAP | before: r@1 / mAP | best epoch | mAP per epoch | wall s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        final, initial = row["final"], row.get("initial") or {}
        before = f"{initial['recall1']:.3f} / {initial['mAP']:.3f}" if initial else "-"
        curve = " ".join(f"{r['mAP']:.3f}" for r in row.get("history", []) if r.get("mAP") is not None) or "-"
        print(f"| {row['name']} | {final['recall1']:.3f} | {final['recall5']:.3f} | {final['mAP']:.3f} | {before} | "
              f"{row.get('best_epoch', '-')} | {curve} | {row.get('wall_s') or row.get('seconds') or '-'} | "
              f"{row.get('peak_rss_mb') or '-'} |")


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "teacher":
        teacher()
    elif command == "run":
        run(rest)
    elif command == "indomain":
        indomain(rest)
    elif command == "_one":
        print_child_result(lambda: run_one(rest[0], Path(rest[1])))
    elif command == "finish":
        append_row(RESULTS, print_child_result(lambda: finish_one(rest[0], RUNS / rest[0])))
    elif command == "table":
        table()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
