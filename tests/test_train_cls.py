"""`shitu train-cls` end to end on generated images: split or lists in, a run dir with an export that
Paddle Inference reproduces out; and the bad inputs a user will hit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from synth import make_class_tree

TINY = ("--recipe", "recipes/cls/tiny.yml", "--input-size", "32", "--batch-size", "16")


def _invoke(*args):
    from shitu_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    make_class_tree(root, n_classes=4, per_class=16, size=40, seed=3)
    return root


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """One tiny run on a class-folder tree (train-cls splits it itself); shared by the checks below."""
    run_dir = tmp_path_factory.mktemp("runs") / "cls"
    result = _invoke("train-cls", shapes, "-o", run_dir, *TINY, "--epochs", "3", "--json")
    assert result.exit_code == 0, result.stderr
    (run_dir.parent / "stderr.txt").write_text(result.stderr, encoding="utf-8")
    return run_dir, json.loads(result.stdout)


def test_a_line_per_epoch_off_a_terminal(trained):
    run_dir, _ = trained
    lines = [line for line in (run_dir.parent / "stderr.txt").read_text(encoding="utf-8").splitlines()
             if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], lines
    assert all(" top1 " in line and " img/s " in line and " eta " in line for line in lines), lines


def test_run_dir_holds_metrics_confusion_export_and_recipe(trained):
    run_dir, summary = trained
    assert 0.0 <= summary["best_top1"] <= 1.0 and 0.0 <= summary["best_top5"] <= 1.0
    assert summary["classes"] == 4 and summary["model"] == "PPLCNet_x0_25"
    assert (run_dir / "metrics.csv").read_text(encoding="utf-8").startswith("epoch,lr,loss,top1,top5")
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert (run_dir / "confusion.png").stat().st_size > 1000
    manifest = yaml.safe_load((run_dir / "export" / "shitu.yaml").read_text(encoding="utf-8"))
    assert manifest["task"] == "cls" and manifest["input_size"] == [32, 32]
    assert manifest["preprocess"]["resize"] == "short" and manifest["preprocess"]["resize_short"] == 37
    labels = (run_dir / "split" / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert manifest["labels"] == labels and len(labels) == 4


def test_recipe_records_split_settings_metrics_and_hashes(trained):
    from shitu_cli.artifacts import sha256_file

    run_dir, summary = trained
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["core"] == "shitu_cli.train.cls:train_cls"
    assert recipe["options"]["model"] == "PPLCNet_x0_25" and recipe["options"]["epochs"] == 3
    assert recipe["inputs"]["split"]["counts"]["val"] == summary["val_images"]
    assert recipe["metrics"]["best_top1"] == summary["best_top1"]
    assert "paddlepaddle" in recipe["versions"]
    for rel in ("export/inference.pdiparams", "export/shitu.yaml", "checkpoints/best.pdparams", "metrics.csv"):
        assert recipe["outputs"][rel] == sha256_file(run_dir / rel)


def test_reproduce_replays_the_run_byte_for_byte(trained, tmp_path):
    import subprocess
    import sys

    run_dir, _ = trained
    # A fresh process, as a user runs it: paddle's jit export names layers by a per-process counter.
    result = subprocess.run([sys.executable, "-m", "shitu_cli", "reproduce", str(run_dir / "recipe.yaml"),
                             "-o", str(tmp_path / "again"), "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["identical"] and {f["path"] for f in report["files"]} >= {"export/inference.pdiparams", "checkpoints/best.pdparams"}


def test_export_reproduces_the_trained_model_through_paddle_inference(trained):
    import paddle

    from shitu_cli.data.images import read_image
    from shitu_cli.infer.classifier import Classifier
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.models.ppcls import build_arch

    run_dir, summary = trained
    assert summary["export_max_abs_diff"] < 1e-4
    classifier = Classifier(run_dir / "export")
    root = Path(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))["options"]["dataset"])
    from shitu_cli.data.lists import read_labelled_list

    paths = [entry.path for entry in read_labelled_list(run_dir / "split" / "val_list.txt")]
    assert all(p.is_relative_to(root) for p in paths)
    rgbs = [read_image(p) for p in paths]
    model = build_arch({"name": "PPLCNet_x0_25", "class_num": 4})
    model.set_state_dict(paddle.load(str(run_dir / "checkpoints" / "best.pdparams")))
    model.eval()
    batch = preprocess_batch(rgbs, classifier.manifest.preprocess, classifier.manifest.input_size)
    with paddle.no_grad():
        expected = paddle.nn.functional.softmax(model(paddle.to_tensor(batch)), axis=-1).numpy()
    np.testing.assert_allclose(classifier.probabilities(rgbs), expected, atol=1e-4)


def test_lists_from_split_dataset_train_and_piecewise_mixup_cutmix_run(shapes, tmp_path):
    lists = tmp_path / "lists"
    assert _invoke("split-dataset", shapes, "--val", "0.25", "--test", "0", "-o", lists).exit_code == 0
    run_dir = tmp_path / "run"
    ds = _dataset_with_lists(shapes, lists, tmp_path / "ds")
    result = _invoke("train-cls", ds, "-o", run_dir, *TINY, "--epochs", "2", "--lr-schedule", "piecewise",
                     "--lr-decay-epochs", "1", "--mixup", "0.2", "--cutmix", "1.0", "--no-ema", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["split"] is None and summary["ema_decay"] is None
    assert summary["train_images"] + summary["val_images"] == 64
    lrs = [float(line.split(",")[1]) for line in (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert lrs[1] == pytest.approx(lrs[0] * 0.1, rel=1e-6)


def _dataset_with_lists(images: Path, lists: Path, target: Path) -> Path:
    """A dataset folder that holds class folders (linked) and the imagenet lists, as PaddleX expects."""
    target.mkdir()
    for folder in images.iterdir():
        (target / folder.name).symlink_to(folder, target_is_directory=True)
    for name in ("train_list.txt", "val_list.txt", "labels.txt"):
        (target / name).write_bytes((lists / name).read_bytes())
    return target


def test_label_file_that_does_not_match_the_lists_exits_2_naming_it(shapes, tmp_path, cli):
    lists = tmp_path / "lists"
    assert cli("split-dataset", shapes, "--val", "0.25", "--test", "0", "-o", lists).exit_code == 0
    ds = _dataset_with_lists(shapes, lists, tmp_path / "ds")
    (ds / "labels.txt").write_text("only one\nand two\n", encoding="utf-8")
    result = cli("train-cls", ds, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2
    assert "labels.txt" in result.stderr and "class id" in result.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_empty_dataset_exits_2(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    result = cli("train-cls", tmp_path / "empty", "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2
    assert "empty" in result.stderr


def test_unknown_model_suggests_the_closest_name(shapes, tmp_path, cli):
    result = cli("train-cls", shapes, "-o", tmp_path / "run", "--model", "PPLCNet_x0_3")
    assert result.exit_code == 2
    assert "PPLCNet_x0_3" in result.stderr and "did you mean PPLCNet_x0_35" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_teacher_and_missing_pretrained_exit_2_naming_the_file(shapes, tmp_path, cli):
    for flag in ("--teacher", "--pretrained"):
        missing = tmp_path / f"nowhere{flag}.pdparams"
        result = cli("train-cls", shapes, "-o", tmp_path / "run", *TINY, flag, missing)
        assert result.exit_code == 2, flag
        assert missing.name in result.stderr and "not found" in result.stderr


def test_pretrained_with_another_class_count_loads_all_but_the_head(shapes, tmp_path, cli):
    import paddle

    from shitu_cli.models.ppcls import build_arch

    weights = tmp_path / "seven_classes.pdparams"
    paddle.save(build_arch({"name": "PPLCNet_x0_25", "class_num": 7}).state_dict(), str(weights))
    result = cli("train-cls", shapes, "-o", tmp_path / "run", *TINY, "--epochs", "1", "--pretrained", weights)
    assert result.exit_code == 0, result.stderr
    assert "head (7 classes there) starts fresh" in result.stderr

    other_arch = tmp_path / "x0_5.pdparams"
    paddle.save(build_arch({"name": "PPLCNet_x0_5", "class_num": 4}).state_dict(), str(other_arch))
    result = cli("train-cls", shapes, "-o", tmp_path / "run2", *TINY, "--pretrained", other_arch)
    assert result.exit_code == 2
    assert "x0_5.pdparams" in result.stderr and "does not fit PPLCNet_x0_25" in result.stderr


def test_mix_batch_keeps_targets_distributions():
    from shitu_cli.train.cls import mix_batch, smooth_targets

    rng = np.random.RandomState(0)
    images = rng.normal(size=(6, 3, 8, 8)).astype("float32")
    targets = smooth_targets(np.array([0, 1, 2, 0, 1, 2]), 3, 0.1)
    assert targets[0].tolist() == pytest.approx([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        mixed, soft = mix_batch(images, targets, mixup, cutmix, rng)
        assert mixed.shape == images.shape and not np.array_equal(mixed, images)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.slow  # ~70-100 s: the cls learning proof; `make test-slow` runs it
def test_tiny_pplcnet_learns_the_digits_dataset(tmp_path, cli):
    """A real small dataset a dependency ships; about a minute on 2 cores, so it runs in CI."""
    from tests.synth import write_digits

    data = write_digits(tmp_path / "digits")
    result = cli("train-cls", data, "-o", tmp_path / "run", "--recipe", "recipes/cls/digits.yml", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["val_images"] > 300 and summary["classes"] == 10
    assert summary["best_top1"] > 0.92  # measured 0.96
