"""Distillation for train-rec on real photos: from scratch vs distilled vs distilled + labels, same student
and schedule, next to the teacher's own retrieval figures and its speed.

Usage (repository root, the project's venv; needs ../shared/teachers and the probe datasets):

    python benchmarks/rec_recipe_probe.py prepare   # fmnist / fruits held-out-class splits (benchmarks/_rec_data.py)
    python benchmarks/distill_rec.py prepare        # + an unlabelled fmnist pool (train split, never test images)
    python benchmarks/distill_rec.py teacher        # the teacher's retrieval figures on the held-out classes
    python benchmarks/distill_rec.py run NAME...    # one child process per run: wall time and peak RSS are its own
    python benchmarks/distill_rec.py speed          # student vs teacher latency, interleaved, onnxruntime 1 thread
    python benchmarks/distill_rec.py table          # markdown rows from benchmarks/distill_rec_results.jsonl

Every run trains the same student (recipes/rec/cpu.yml: PPLCNet_x0_5 -> BNNeck 128, 96 px) for the same
number of steps; distilled runs add 32 pool images to each batch of 32 labelled ones. The teacher is
EfficientNet-Lite0 (ImageNet) from ../shared/teachers, output `embedding` (1280-d), 224 px, mean = std = 0.5.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _rec_data import (FMNIST, PROBE_DIR, REPO, TEACHER, append_row, print_child_result, read_history, read_idx,
                       read_list, rounded, run_child)

RESULTS = Path(os.environ.get("DISTILL_RESULTS", REPO / "benchmarks" / "distill_rec_results.jsonl"))
CACHE = PROBE_DIR / "teacher-cache"
POOL_PER_CLASS = 400  # unlabelled fmnist train-split photos per class (all 10 classes), none in the labelled list

TEACHER_ARGS = {"teacher": str(TEACHER), "distill": {"teacher_output": "embedding", "teacher_mean": [0.5] * 3,
                                                     "teacher_std": [0.5] * 3, "cache_dir": str(CACHE)}}
EPOCHS = {"fmnist": 8, "fruits": 8}


def _teacher(**distill) -> dict:
    return {"teacher": TEACHER_ARGS["teacher"], "distill": {**TEACHER_ARGS["distill"], **distill}}


EXPERIMENTS: dict[str, dict] = {
    "scratch": {},
    "distilled": {**_teacher(label_weight=0.0), "pool": True},
    "distilled+labels": {**_teacher(label_weight=1.0), "pool": True},
    "distilled-b": {**_teacher(label_weight=0.0), "pool": True},  # the same as distilled, run in parallel
    "distilled+labels0.3": {**_teacher(label_weight=0.3), "pool": True},
    "distilled-nopool": _teacher(label_weight=0.0),
    "distilled+labels-nopool": _teacher(label_weight=1.0),
    "distilled+labels-rel-only": {**_teacher(label_weight=1.0, cosine_weight=0.0), "pool": True},
    "distilled+labels-views1": {**_teacher(label_weight=1.0, teacher_views=1), "pool": True},
    "distilled+labels-16ep": {**_teacher(label_weight=1.0), "pool": True, "epochs": 16},
    "scratch-16ep": {"epochs": 16},
}


# ----------------------------------------------------------------------------- data


def prepare() -> None:
    """fmnist-pool/: POOL_PER_CLASS train-split photos of each of the 10 classes that the labelled list
    does not hold. The held-out gallery/query photos come from the test split, so none is in the pool."""
    import cv2

    root = PROBE_DIR / "fmnist-pool"
    labelled = {int(Path(line.split("\t")[0]).stem) for line in
                (PROBE_DIR / "fmnist" / "train_list.txt").read_text(encoding="utf-8").splitlines()}
    images, labels = read_idx(FMNIST / "train-images-idx3-ubyte.gz"), read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(1)
    written = 0
    for cls in range(10):
        candidates = [i for i in np.flatnonzero(labels == cls) if int(i) not in labelled]
        for i in rng.choice(candidates, POOL_PER_CLASS, replace=False):
            path = root / f"{int(i):05d}.png"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), images[i])
            written += 1
    print(f"fmnist-pool: {written} unlabelled photos in {root}")


# ----------------------------------------------------------------------------- teacher figures


def teacher_session(threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(TEACHER), options, providers=["CPUExecutionProvider"])


def teacher_batch(paths: list[Path]) -> np.ndarray:
    import cv2

    from shitu_cli.data.images import read_image

    rgb = [cv2.resize(read_image(p), (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0 for p in paths]
    return ((np.stack(rgb) - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def _side(dataset: str, name: str) -> tuple[list[Path], list[str]]:
    return read_list(PROBE_DIR / dataset, f"{name}_list.txt")


def teacher() -> None:
    """The teacher's own embedding (raw, as a user would index it) on the same held-out classes."""
    from shitu_cli.train.metrics import retrieval_metrics

    session = teacher_session(threads=2)
    for dataset in EPOCHS:
        started = time.perf_counter()
        sides = {}
        for name in ("gallery", "query"):
            paths, labels = _side(dataset, name)
            features = np.concatenate([session.run(["embedding"], {"image": teacher_batch(paths[i : i + 32])})[0]
                                       for i in range(0, len(paths), 32)])
            sides[name] = (features, labels)
        metrics = retrieval_metrics(sides["query"][0], sides["query"][1], sides["gallery"][0], sides["gallery"][1])
        row = {"name": "teacher (EfficientNet-Lite0 embedding, 224 px)", "dataset": dataset,
               "final": rounded(metrics),
               "wall_s": round(time.perf_counter() - started, 1), "kind": "teacher"}
        append_row(RESULTS, row)
        print(dataset, row["final"], flush=True)


# ----------------------------------------------------------------------------- runs


def run_one(name: str, dataset: str, out: Path) -> dict:
    from shitu_cli.train.rec import train_rec

    spec = dict(EXPERIMENTS[name])
    kwargs: dict = {}
    if "teacher" in spec:
        kwargs = {"teacher": spec["teacher"], "distill": dict(spec["distill"])}
        if spec.get("pool") and dataset == "fmnist":
            kwargs["unlabeled"] = str(PROBE_DIR / "fmnist-pool")
    epochs = spec.get("epochs", EPOCHS[dataset])
    result = train_rec(PROBE_DIR / dataset, out, recipe="cpu", epochs=epochs, num_workers=2, **kwargs)
    return {"name": name, "dataset": dataset, "final": result.final, "initial": result.initial,
            "best_epoch": result.best_epoch, "epochs": result.epochs, "steps": result.epochs * result.steps_per_epoch,
            "backbone": result.backbone, "input_size": result.input_size, "seconds": result.seconds,
            "distillation": result.distillation, "warnings": result.warnings, "export": str(result.export_dir)}


def run(names: list[str], dataset: str) -> None:
    import shutil

    for name in names:
        if name not in EXPERIMENTS:
            raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
        out = PROBE_DIR / "distill-runs" / f"{dataset}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        row = run_child(Path(__file__), name, dataset, out)
        if row is None:
            print(f"{dataset} {name}: failed", file=sys.stderr, flush=True)
            continue
        append_row(RESULTS, row)
        print(f"{dataset} {name}: {row['final']} (untrained {row['initial']}), {row['wall_s']} s, "
              f"{row['peak_rss_mb']} MB", flush=True)


# ----------------------------------------------------------------------------- speed


def speed(repeats: int = 200) -> None:
    """Median latency per image, batch 1, 1 thread, onnxruntime for both, interleaved call by call."""
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    export = PROBE_DIR / "distill-runs" / "fmnist-distilled+labels" / "export"
    student = build_predictor(export, PredictorOptions(backend="onnxruntime", threads=1), task="rec")
    session = teacher_session(threads=1)
    paths, _ = _side("fmnist", "query")
    x_teacher = teacher_batch(paths[:1])
    x_student = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    for _ in range(10):
        session.run(["embedding"], {"image": x_teacher}), student.run(x_student)
    for _ in range(repeats):
        tick = time.perf_counter()
        session.run(["embedding"], {"image": x_teacher})
        times["teacher"].append(time.perf_counter() - tick)
        tick = time.perf_counter()
        student.run(x_student)
        times["student"].append(time.perf_counter() - tick)
    medians = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    row = {"kind": "speed", "teacher_ms": round(medians["teacher"], 3), "student_ms": round(medians["student"], 3),
           "ratio": round(medians["teacher"] / medians["student"], 1), "repeats": repeats, "backend": student.backend}
    append_row(RESULTS, row)
    print(row, flush=True)


# ----------------------------------------------------------------------------- report


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    print("| dataset | run | recall@1 | recall@5 | mAP | untrained r@1 / mAP | best epoch | mAP per epoch | steps | wall s "
          "| peak MB | teacher cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row.get("kind") == "speed":
            continue
        final, initial = row["final"], row.get("initial") or {}
        untrained = f"{initial['recall1']:.3f} / {initial['mAP']:.3f}" if initial else "-"
        d = row.get("distillation") or {}
        cache = (f"{d['cache_hits']} hit / {d['cache_misses']} run ({d['teacher_seconds']} s), pool {d['pool_images']}"
                 if d else "-")
        curve = " ".join(f"{float(r['mAP']):.2f}" for r in _history(row)) or "-"
        print(f"| {row['dataset']} | {row['name']} | {final['recall1']:.3f} | {final['recall5']:.3f} | {final['mAP']:.3f} | "
              f"{untrained} | {row.get('best_epoch', '-')} | {curve} | {row.get('steps', '-')} | {row.get('wall_s', '-')} | "
              f"{row.get('peak_rss_mb', '-')} | {cache} |")
    for row in rows:
        if row.get("kind") == "speed":
            print(f"\nspeed (onnxruntime, 1 thread, batch 1, median of {row['repeats']} interleaved calls): teacher "
                  f"{row['teacher_ms']} ms, student {row['student_ms']} ms: the student is {row['ratio']}x faster")


def _history(row: dict) -> list[dict]:
    if row.get("kind"):
        return []
    return [r for r in read_history(PROBE_DIR / "distill-runs" / f"{row['dataset']}-{row['name']}") if r.get("mAP") is not None]


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        prepare()
    elif command == "teacher":
        teacher()
    elif command == "run":
        run(rest, os.environ.get("PROBE_DATASET", "fmnist"))
    elif command == "_one":
        print_child_result(lambda: run_one(rest[0], rest[1], Path(rest[2])))
    elif command == "speed":
        speed()
    elif command == "table":
        table()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
