"""What the train-rec benchmarks share (rec_recipe_probe.py, onnx_finetune.py, distill_rec.py): the
held-out-class datasets they train and measure on, and running each experiment in a child process so
that its wall time and peak memory are its own.

Datasets (written under $SHITU_PROBE_DIR, default /tmp/shitu-rec-probe; never committed):
- fmnist: Debian's dataset-fashion-mnist (real product photos, 28x28 grey). Train on 6 classes
  (300 training photos each); measure retrieval on 4 classes the model never saw, with 50 gallery
  and 100 query photos each from the test set (400 queries).
- fruits: ../shared/data/fruits360: train on train/+test/ (7 classes, 385 photos); measure on the
  3 held-out classes (5 gallery + 15 query photos each, 45 queries).
- fmnist-inst / fruits-inst: the same images, each training photo its own class.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROBE_DIR = Path(os.environ.get("SHITU_PROBE_DIR", "/tmp/shitu-rec-probe"))
SHARED = Path(os.environ.get("SHITU_SHARED", REPO.parent / "shared"))
FMNIST = Path("/usr/share/datasets/fashion-mnist")
FRUITS = SHARED / "data" / "fruits360"
TEACHER = SHARED / "teachers" / "efficientnet_lite0_imagenet.onnx"  # EfficientNet-Lite0, mean = std = 0.5
FMNIST_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FMNIST_TRAIN = (0, 1, 3, 4, 5, 9)
FMNIST_HELDOUT = (2, 6, 7, 8)  # pullover and shirt look like coat and t-shirt; sneaker like sandal/boot
LISTS = ("train_list.txt", "gallery_list.txt", "query_list.txt")


# ----------------------------------------------------------------------------- datasets


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-style gzipped IDX file as an array."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_lists(root: Path, lists: dict[str, list[tuple[str, str]]]) -> None:
    for name, rows in lists.items():
        (root / name).write_text("".join(f"{rel}\t{label}\n" for rel, label in rows), encoding="utf-8")


def prepare_fmnist(root: Path, per_train_class: int = 300, gallery: int = 50, query: int = 100, seed: int = 0) -> None:
    import cv2

    rng = np.random.default_rng(seed)
    train_x, train_y = read_idx(FMNIST / "train-images-idx3-ubyte.gz"), read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    lists: dict[str, list[tuple[str, str]]] = {name: [] for name in LISTS}

    def save(split: str, name: str, number: int, pixels: np.ndarray) -> str:
        rel = f"images/{split}/{name}/{number:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), pixels)
        return rel

    for cls in FMNIST_TRAIN:
        for i in rng.choice(np.flatnonzero(train_y == cls), per_train_class, replace=False):
            lists["train_list.txt"].append((save("train", FMNIST_NAMES[cls], int(i), train_x[i]), FMNIST_NAMES[cls]))
    for cls in FMNIST_HELDOUT:
        picked = rng.choice(np.flatnonzero(test_y == cls), gallery + query, replace=False)
        for j, i in enumerate(picked):
            side = "gallery_list.txt" if j < gallery else "query_list.txt"
            lists[side].append((save("test", FMNIST_NAMES[cls], int(i), test_x[i]), FMNIST_NAMES[cls]))
    write_lists(root, lists)


def prepare_fruits(root: Path, gallery: int = 5) -> None:
    lists: dict[str, list[tuple[str, str]]] = {name: [] for name in LISTS}
    for split in ("train", "test", "heldout"):
        for folder in sorted(p for p in (FRUITS / split).iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.jpg"))
            for j, path in enumerate(files):
                rel = f"images/{split}/{folder.name}/{path.name}"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, root / rel)
                side = "train_list.txt" if split != "heldout" else ("gallery_list.txt" if j % 4 == 0 and j // 4 < gallery else "query_list.txt")
                lists[side].append((rel, folder.name))
    write_lists(root, lists)


def prepare_instances(root: Path, source: Path) -> None:
    """The same images, each training photo its own class: PK batches then hold K augmented views of
    one photo, and CE + triplet learn instance discrimination (no class labels used for training)."""
    for name in ("gallery_list.txt", "query_list.txt"):
        (root / name).write_text((source / name).read_text(encoding="utf-8"), encoding="utf-8")
    rows = [line.split("\t")[0] for line in (source / "train_list.txt").read_text(encoding="utf-8").splitlines()]
    (root / "images").symlink_to(source / "images")
    write_lists(root, {"train_list.txt": [(rel, f"photo{i:05d}") for i, rel in enumerate(rows)]})


PREPARE: dict[str, Callable[[Path], None]] = {
    "fmnist": prepare_fmnist,
    "fruits": prepare_fruits,
    "fmnist-inst": lambda root: prepare_instances(root, prepared("fmnist")),
    "fruits-inst": lambda root: prepare_instances(root, prepared("fruits")),
}


def prepared(name: str) -> Path:
    """PROBE_DIR/<name>, written first if it is not there yet."""
    root = PROBE_DIR / name
    if not (root / "query_list.txt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        PREPARE[name](root)
    return root


def list_counts(root: Path) -> dict[str, int]:
    return {name: len((root / name).read_text(encoding="utf-8").splitlines()) for name in LISTS if (root / name).is_file()}


def read_list(root: Path, list_name: str) -> tuple[list[Path], list[str]]:
    """The image paths and labels of one list file (`rel<TAB>label` lines)."""
    rows = [line.split("\t") for line in (root / list_name).read_text(encoding="utf-8").splitlines()]
    return [root / rel for rel, _ in rows], [label for _, label in rows]


# ----------------------------------------------------------------------------- results


def rounded(metrics: dict) -> dict:
    return {k: round(float(metrics[k]), 4) for k in ("recall1", "recall5", "mAP")}


def read_history(run_dir: Path) -> list[dict]:
    """A run's metrics.csv, one dict per epoch, numbers as floats and empty cells as None."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(handle)]


def append_row(results: Path, row: dict) -> None:
    with results.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- one experiment per child process


def run_child(script: Path, *args: str) -> dict | None:
    """`python SCRIPT _one ARGS...` in a child process: its result row (the last stdout line, JSON) with
    its own wall time and peak RSS (ru_maxrss) added; None when it failed."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(script), "_one", *map(str, args)], stdout=subprocess.PIPE, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return None
    row = json.loads(stdout.strip().splitlines()[-1])
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    return row


def print_child_result(make_row: Callable[[], dict]) -> dict:
    """In the child: the row on stdout as one JSON line; library chatter goes to stderr so it cannot mix in."""
    with contextlib.redirect_stdout(sys.stderr):
        row = make_row()
    print(json.dumps(row, default=str))
    return row
