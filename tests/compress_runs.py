"""Tiny trained run dirs for the compress tests, made by the real trainers (train-cls, train-rec) on drawn
classes, and the check of what `--algo auto` records."""

from __future__ import annotations

from pathlib import Path

from tests.synth import make_class_tree

# Small but learnable: a 64 px PPLCNet_x0_25 on four drawn classes. It needs ~30 epochs (180 steps) to
# converge: after 10 it classified ~0.7 of its own images, and with its batch-norm statistics not yet
# describing what the net computes, 10-40% of the images had logits 15-380x the median norm (measured on
# the Intel and the AVX2 MKL paths), which INT8 cannot hold. After 30: ~0.98 and at most ~5x.
TINY_CLS = dict(model="PPLCNet_x0_25", input_size=64, epochs=30, batch_size=8, lr=0.05, warmup_epochs=0.5,
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
    # best_metric recall1: the model these tests' floors were measured on. train-rec now exports the best-mAP
    # epoch by default, here an earlier one whose per-class norm spread PTQ keeps worse (cosine 0.59 vs 0.84).
    train_rec(root / "products", root / "run", recipe="tiny", epochs=epochs, num_workers=0, best_metric="recall1")
    return root / "run"


def assert_auto_picked_the_best(report, calibrated: int, scored: int):
    """--algo auto tried every algorithm it names, wrote the best of them and says so everywhere."""
    from shitu_cli.compress.choose import AUTO_ALGOS

    choice = report["algo_choice"]
    assert [t["algo"] for t in choice["trials"]] == list(AUTO_ALGOS)
    assert (choice["calib_images"], choice["scored_on"], choice["held_out"]) == (calibrated, scored, True)
    scored_trials = [t for t in choice["trials"] if t["error"] is None]
    picked = [t for t in choice["trials"] if t["chosen"]]
    assert len(picked) == 1 and picked[0]["algo"] == choice["picked"]
    # a detector ranks by mAP against the original's boxes first, cls and rec by agreement first
    order = ("closeness", "agreement") if report["task"] == "det" else ("agreement", "closeness")
    assert choice["ranked_by"] == list(order)
    for trial in scored_trials:  # at least as good as each single algorithm it tried
        assert tuple(picked[0][k] for k in order) >= tuple(trial[k] for k in order)
    assert report["method"].endswith(f"ptq-{choice['picked']}")
    return picked[0]

