"""What makes `shitu train-rec` learn from scratch on real photos within a CPU budget: one probe per knob.

Usage (from the repository root, with the project's venv):

    python benchmarks/rec_recipe_probe.py prepare            # write the probe datasets (not part of the repo)
    python benchmarks/rec_recipe_probe.py baselines          # raw-pixel retrieval on the same held-out split
    python benchmarks/rec_recipe_probe.py run NAME [NAME...] # train; one JSON line per run in results.jsonl
    python benchmarks/rec_recipe_probe.py table              # the results as a markdown table

Datasets: fmnist and fruits held-out-class splits, written by benchmarks/_rec_data.py (see there).

Each experiment is `shitu_cli.train.rec.train_rec` with a base recipe plus overrides, run in its own
process so that its wall time and peak memory (ru_maxrss) are its own. A few experiments change a
knob that recipes do not expose (CE weight, no BN neck); the child process patches it in before
training, and the report says which.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from _rec_data import (PREPARE, PROBE_DIR, REPO, append_row, list_counts, prepared, print_child_result, read_history,
                       rounded, run_child)

RESULTS = REPO / "benchmarks" / "rec_recipe_results.jsonl"

# A small, fast student: PPLCNet_x0_5 at 64 px, 128-d. Each entry: base recipe, overrides, patches.
BASE = {"backbone": "PPLCNet_x0_5", "embedding_size": 128, "input_size": 64, "epochs": 8, "batch_size": 32,
        "images_per_class": 4, "lr": 0.04, "warmup_epochs": 2, "eval_every": 1, "num_workers": 2, "seed": 42}
LIGHT = {"rotate_degrees": 10.0, "crop_scale_min": 0.8}
EXPERIMENTS: dict[str, dict] = {
    # the shipped pp-shituv2 knobs (lr 0.04, ema 0.999, weight decay 1e-5, strong aug) on the small student
    "default-knobs": {"recipe": "pp-shituv2", "overrides": dict(BASE)},
    "lr0.1": {"recipe": "pp-shituv2", "overrides": {**BASE, "lr": 0.1}},
    "lr0.01": {"recipe": "pp-shituv2", "overrides": {**BASE, "lr": 0.01}},
    "ema0.99": {"recipe": "pp-shituv2", "overrides": {**BASE, "ema_decay": 0.99}},
    "no-ema": {"recipe": "pp-shituv2", "overrides": {**BASE, "ema_decay": 0.0}},
    "wd5e-4": {"recipe": "pp-shituv2", "overrides": {**BASE, "weight_decay": 5e-4}},
    "light-aug": {"recipe": "pp-shituv2", "overrides": {**BASE, "rotate_degrees": 10.0, "crop_scale_min": 0.8}},
    "no-aug": {"recipe": "pp-shituv2", "overrides": {**BASE, "rotate_degrees": 0.0, "crop_scale_min": 1.0}},
    "triplet-only": {"recipe": "pp-shituv2", "overrides": dict(BASE), "patch": {"ce_weight": 0.0}},
    "ce-only": {"recipe": "pp-shituv2", "overrides": {**BASE, "triplet_weight": 0.0}},
    "margin0.2": {"recipe": "pp-shituv2", "overrides": {**BASE, "margin": 0.2}},
    "no-bnneck": {"recipe": "pp-shituv2", "overrides": dict(BASE), "patch": {"bnneck": False}},
    "k8": {"recipe": "pp-shituv2", "overrides": {**BASE, "images_per_class": 8}},
    "size32": {"recipe": "pp-shituv2", "overrides": {**BASE, "input_size": 32}},
    "size96": {"recipe": "pp-shituv2", "overrides": {**BASE, "input_size": 96}},
    "x0_25": {"recipe": "pp-shituv2", "overrides": {**BASE, "backbone": "PPLCNet_x0_25"}},
    "x1_0": {"recipe": "pp-shituv2", "overrides": {**BASE, "backbone": "PPLCNet_x1_0"}},
    "epochs16": {"recipe": "pp-shituv2", "overrides": {**BASE, "epochs": 16}},
    # light augmentation (the single-knob winner) with one more knob changed
    "lr0.01-light-aug": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT, "lr": 0.01}},
    "light-aug-seed1": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT, "seed": 1}},
    "default-knobs-seed1": {"recipe": "pp-shituv2", "overrides": {**BASE, "seed": 1}},
    "mid-aug": {"recipe": "pp-shituv2", "overrides": {**BASE, "rotate_degrees": 20.0, "crop_scale_min": 0.65}},
    "combo-epochs4": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT, "epochs": 4}},
    "combo-size96": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT, "input_size": 96}},
    "combo-x1_0": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT, "backbone": "PPLCNet_x1_0"}},
    "combo-k8": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT, "images_per_class": 8}},
    "combo-no-bnneck": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT}, "patch": {"bnneck": False}},
    "combo-epochs16": {"recipe": "pp-shituv2", "overrides": {**BASE, **LIGHT, "epochs": 16}},
    # the shipped CPU recipe as a file (recipes/rec/cpu.yml), no overrides
    "cpu-recipe": {"recipe": str(REPO / "recipes" / "rec" / "cpu.yml"), "overrides": {"num_workers": 2}},
    "tiny-recipe": {"recipe": "tiny", "overrides": {"num_workers": 2}},
}


# ----------------------------------------------------------------------------- datasets


def prepare() -> None:
    for name in PREPARE:
        if (PROBE_DIR / name / "query_list.txt").is_file():
            continue
        print(name, list_counts(prepared(name)))


# ----------------------------------------------------------------------------- baselines


def _read_side(root: Path, list_name: str, size: int) -> tuple[np.ndarray, list[str]]:
    from shitu_cli.data.images import read_image
    import cv2

    vectors, labels = [], []
    for line in (root / list_name).read_text(encoding="utf-8").splitlines():
        rel, label = line.split("\t")
        rgb = cv2.resize(read_image(root / rel), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
        vectors.append((rgb - rgb.mean()).ravel())
        labels.append(label)
    return np.stack(vectors), labels


def baselines() -> None:
    """Raw pixels (mean-centred, cosine) and a colour histogram: what any learnt model must beat."""
    from shitu_cli.train.metrics import retrieval_metrics

    for name, size in (("fmnist", 28), ("fruits", 32)):
        root = PROBE_DIR / name
        gallery, gallery_labels = _read_side(root, "gallery_list.txt", size)
        query, query_labels = _read_side(root, "query_list.txt", size)
        metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels)
        append_row(RESULTS, {"name": f"raw-pixels-{size}px", "dataset": name, "final": rounded(metrics), "initial": {},
                             "seconds": None, "peak_rss_mb": None})
        print(name, "raw pixels", rounded(metrics))


# ----------------------------------------------------------------------------- experiments


def _apply_patches(patch: dict) -> None:
    """Knobs that recipes do not expose: changed in this child process only."""
    if "ce_weight" in patch:
        import shitu_cli.train.losses as losses

        original = losses.RecLossConfig.__init__

        def init(self, *args, **kwargs):
            kwargs.setdefault("ce_weight", patch["ce_weight"])
            original(self, *args, **kwargs)

        losses.RecLossConfig.__init__ = init
    if patch.get("bnneck") is False:
        # rec_arch / embedding_layer live in train.rec_model since the train-rec split; patch every
        # module that holds a name for them.
        modules = [importlib.import_module(name) for name in ("shitu_cli.train.rec", "shitu_cli.train.rec_model")
                   if importlib.util.find_spec(name)]
        original_arch = getattr(modules[-1], "rec_arch")
        original_layer = getattr(modules[-1], "embedding_layer")

        def arch(settings, class_num):
            config = original_arch(settings, class_num)
            config.pop("Neck")  # backbone features straight into the FC head and the triplet
            return config

        def embedding_layer(model):
            import paddle

            if model.neck is None:
                model.neck = paddle.nn.Identity()
            return original_layer(model)

        for module in modules:
            if hasattr(module, "rec_arch"):
                module.rec_arch = arch
            if hasattr(module, "embedding_layer"):
                module.embedding_layer = embedding_layer


def run_one(name: str, dataset: str, out: Path) -> dict:
    """In the child: train one experiment and return its result row."""
    from shitu_cli.train.rec import train_rec

    spec = EXPERIMENTS[name]
    _apply_patches(spec.get("patch", {}))
    result = train_rec(PROBE_DIR / dataset, out, recipe=spec["recipe"], **spec["overrides"])
    history = read_history(out)
    return {"name": name, "dataset": dataset, "final": result.final, "initial": result.initial,
            "best_epoch": result.best_epoch, "epochs": result.epochs, "backbone": result.backbone,
            "input_size": result.input_size, "train_images": result.train_images, "seconds": result.seconds,
            "per_epoch_recall1": [row.get("recall1") for row in history], "per_epoch_loss": [row.get("loss") for row in history],
            "patch": spec.get("patch", {}), "warnings": result.warnings}


def run(names: list[str], dataset: str) -> None:
    for name in names:
        if name not in EXPERIMENTS:
            raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
        out = PROBE_DIR / "runs" / f"{dataset}-{name}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        row = run_child(Path(__file__), name, dataset, out)
        if row is None:
            print(f"{name}: failed", file=sys.stderr)
            continue
        append_row(RESULTS, row)
        print(f"{dataset} {name}: {row['final']} (untrained {row['initial']}) best epoch {row['best_epoch']}, "
              f"{row['wall_s']} s, {row['peak_rss_mb']} MB", flush=True)


def table() -> None:
    """Markdown rows: metrics of the exported (best recall@1) epoch, and mAP after every epoch."""
    rows = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    print("| dataset | experiment | recall@1 | recall@5 | mAP | untrained r@1 / mAP | best epoch | mAP per epoch | wall s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        final, initial = row["final"], row.get("initial") or {}
        untrained = f"{initial['recall1']:.3f} / {initial['mAP']:.3f}" if initial else "-"
        history = read_history(PROBE_DIR / "runs" / f"{row['dataset']}-{row['name']}")
        curve = " ".join(f"{r['mAP']:.2f}" for r in history if r.get("mAP") is not None) or "-"
        print(f"| {row['dataset']} | {row['name']} | {final['recall1']:.3f} | {final['recall5']:.3f} | {final['mAP']:.3f} | "
              f"{untrained} | {row.get('best_epoch', '-')} | {curve} | {row.get('wall_s') or '-'} | {row.get('peak_rss_mb') or '-'} |")


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        prepare()
    elif command == "baselines":
        baselines()
    elif command == "run":
        dataset = os.environ.get("PROBE_DATASET", "fmnist")
        run(rest, dataset)
    elif command == "_one":
        print_child_result(lambda: run_one(rest[0], rest[1], Path(rest[2])))
    elif command == "table":
        table()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
