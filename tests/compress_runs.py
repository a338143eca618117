"""Tiny trained run dirs for the compress tests, made by the real trainers (train-cls, train-rec) on drawn classes."""

from __future__ import annotations

from pathlib import Path

from tests.synth import make_class_tree

# Small but learnable: a 64 px PPLCNet_x0_25 reaches ~0.8 top-1 on four drawn classes in ~10 epochs.
TINY_CLS = dict(model="PPLCNet_x0_25", input_size=64, epochs=10, batch_size=8, lr=0.05, warmup_epochs=0.5,
                min_crop=0.5, val=0.25, ema=False, num_workers=0)


def train_cls_run(root: Path, n_classes: int = 4, per_class: int = 16, **overrides) -> Path:
    """root/data (class folders) -> root/run, a train-cls run dir with split/{train,val}_list.txt."""
    from shitu_cli.train.cls import train_cls

    make_class_tree(root / "data", n_classes, per_class, size=64, seed=3)
    train_cls(root / "data", root / "run", **{**TINY_CLS, **overrides})
    return root / "run"


def train_rec_run(root: Path, epochs: int = 4) -> Path:
    """root/products (rec split lists: train/gallery/query) -> root/run, a train-rec run dir (tiny recipe)."""
    from shitu_cli.data.split import split_dataset
    from shitu_cli.train.rec import train_rec

    make_class_tree(root / "products", n_classes=12, per_class=10, size=64, seed=5)
    split_dataset(root / "products", val=0.34, test=0.3, seed=42, format="rec")
    train_rec(root / "products", root / "run", recipe="tiny", epochs=epochs, num_workers=0)
    return root / "run"
