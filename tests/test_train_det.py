"""`shitu train-det` end to end on drawn scenes: outputs, manifest, export match, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shitu_cli.artifacts import read_yaml, sha256_file
from det_checks import assert_export_matches_dygraph
from synth_scenes import make_coco_scenes

TINY = ("--recipe", "tiny", "--epochs", "1", "--batch-size", "4")


def _invoke(*args):
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "scenes"
    names = make_coco_scenes(root, n_train=12, n_val=4, n_classes=2, seed=3)
    return root, names


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    """One tiny run (1 epoch, classes merged to 'foreground') shared by the tests that read its outputs."""
    root, _ = scenes
    run = tmp_path_factory.mktemp("runs") / "det"
    result = _invoke("train-det", root, "-o", run, *TINY, "--merge-classes", "--json")
    assert result.exit_code == 0, result.stderr
    (run.parent / "stderr.txt").write_text(result.stderr, encoding="utf-8")
    return run, json.loads(result.stdout)


def test_a_line_per_epoch_off_a_terminal(trained):
    run, _ = trained
    lines = [line for line in (run.parent / "stderr.txt").read_text(encoding="utf-8").splitlines() if line.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1  loss "), lines
    assert " mAP " in lines[0] and " img/s " in lines[0] and lines[0].endswith("eta 0s"), lines


def test_run_dir_holds_every_output(trained):
    run, summary = trained
    for name in ("metrics.csv", "curves.png", "recipe.yaml", "ppdet.yml", "export/model.json",
                 "export/model.pdiparams", "export/infer_cfg.yml", "export/shitu.yaml"):
        assert (run / name).is_file(), name
    assert (run / "metrics.csv").read_text(encoding="utf-8").splitlines()[0] == "epoch,lr,loss,mAP,mAP50"
    assert summary["labels"] == ["foreground"]
    assert summary["epochs"] == 1 and summary["best_epoch"] == 1
    assert summary["train_images"] == 12 and summary["val_images"] == 4
    assert 0.0 <= summary["best_map"] <= 1.0
    assert not list(Path.cwd().glob("bbox.json")), "ppdet's eval output must stay inside the run dir"


def test_manifest_describes_the_ppdet_export(trained):
    run, _ = trained
    manifest = read_yaml(run / "export" / "shitu.yaml")
    infer_cfg = read_yaml(run / "export" / "infer_cfg.yml")
    assert manifest["task"] == "det"
    assert manifest["model_file"] == "model.json" and manifest["params_file"] == "model.pdiparams"
    assert manifest["input_names"] == ["image", "scale_factor"]
    assert manifest["input_size"] == [128, 128]
    assert manifest["labels"] == ["foreground"] == infer_cfg["label_list"]
    assert manifest["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["model_hash"] == sha256_file(run / "export" / "model.pdiparams")
    from shitu_cli.artifacts import sha256_bytes

    portable = (run / "ppdet.yml").read_text(encoding="utf-8").replace(str(run.resolve()), "<RUN_DIR>")
    assert str(run.resolve()) in (run / "ppdet.yml").read_text(encoding="utf-8")  # ppdet reads it from any cwd
    assert manifest["recipe_hash"] == sha256_bytes(portable.encode("utf-8"))


def test_recipe_yaml_holds_the_resolved_config(trained):
    run, summary = trained
    recipe = read_yaml(run / "recipe.yaml")
    assert recipe["command"] == "train-det" and recipe["core"] == "shitu_cli.train.det:train_det"
    resolved = recipe["options"]["recipe"]
    assert resolved["name"] == "tiny"
    assert resolved["shitu"]["epochs"] == 1  # the flag beat the recipe's 2
    assert resolved["shitu"]["input_size"] == 128 and resolved["LCNet"]["scale"] == 0.25
    assert recipe["options"]["merge_classes"] is True
    assert recipe["metrics"]["best_map"] == summary["best_map"]
    assert recipe["outputs"]["export/model.pdiparams"] == sha256_file(run / "export" / "model.pdiparams")


def test_a_warm_up_longer_than_the_run_allows_is_cut_said_and_recorded(trained):
    """tiny's 2-step warm-up on a 3-step run (12 images, batch 4, 1 epoch) is cut to 10 % of it (1 step)."""
    run, summary = trained
    recipe = read_yaml(run / "recipe.yaml")
    assert recipe["inputs"]["warmup"] == {"steps": 1, "asked": 2, "run_steps": 3, "capped": True, "explicit": False,
                                          "first_decay": None}
    assert recipe["options"]["recipe"]["shitu"]["warmup_steps"] == 1  # what a replay trains with
    assert read_yaml(run / "ppdet.yml")["LearningRate"]["schedulers"][1] == {"name": "LinearWarmup", "start_factor": 0.1,
                                                                            "steps": 1}
    assert summary["warmup"]["steps"] == 1
    stderr = (run.parent / "stderr.txt").read_text(encoding="utf-8")
    lines = [line for line in stderr.splitlines() if "warm-up" in line]
    assert lines == ["warning: the recipe's 2-step warm-up is longer than 10% of this run's 3 steps: warming up for "
                     "1 steps instead (set it with --warmup-steps)"]


def test_reproduce_replays_the_run_byte_for_byte_elsewhere(trained, tmp_path):
    import subprocess
    import sys

    run, _ = trained
    result = subprocess.run([sys.executable, "-m", "shitu_cli", "reproduce", str(run / "recipe.yaml"),
                             "-o", str(tmp_path / "again"), "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["identical"] and {f["path"] for f in report["files"]} >= {"export/model.pdiparams", "export/shitu.yaml"}


def test_exported_boxes_match_the_dygraph_model(trained, scenes):
    run, _ = trained
    assert_export_matches_dygraph(run, scenes[0])


def test_detector_runs_with_and_without_onednn(trained, scenes):
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.predictor import PredictorOptions

    run, _ = trained
    root, _ = scenes
    rgb = read_image(sorted((root / "images").glob("val_*.jpg"))[0])
    found = {mkldnn: Detector(run / "export", PredictorOptions(mkldnn=mkldnn)).detect(rgb, 0.0, 5) for mkldnn in (True, False)}
    assert len(found[True]) == len(found[False]) == 5
    height, width = rgb.shape[:2]
    for with_onednn, plain in zip(found[True], found[False]):
        assert with_onednn.label == plain.label == "foreground"
        assert with_onednn.score == pytest.approx(plain.score, abs=1e-3)
        x1, y1, x2, y2 = plain.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def test_resume_continues_from_the_last_epoch(trained, scenes, tmp_path):
    run, _ = trained
    root, _ = scenes
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    result = _invoke("train-det", root, "-o", resumed, *TINY[:2], "--epochs", "2", "--merge-classes", "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    rows = (resumed / "metrics.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]
    assert rows[0] == (run / "metrics.csv").read_text(encoding="utf-8").splitlines()[1]


def test_resume_keeps_the_runs_recipe_and_merged_classes(trained, scenes, tmp_path):
    """`--resume --recipe tiny` on a --merge-classes run once re-exported a detector of every category."""
    run, _ = trained
    root, _ = scenes
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    result = _invoke("train-det", "-o", resumed, "--resume", "--recipe", "tiny", "--epochs", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["labels"] == ["foreground"]
    assert read_yaml(resumed / "export" / "shitu.yaml")["labels"] == ["foreground"]

    for args, name in ((("--keep-classes",), "merge_classes"), (("--recipe", "small"), "recipe"),
                       (("--lr", "0.5"), "lr"), ((str(tmp_path),), "dataset")):
        refused = _invoke("train-det", *args, "-o", resumed, "--resume")
        assert refused.exit_code == 2, args
        assert name in refused.stderr and "--resume continues the run" in refused.stderr


def test_an_earlier_run_is_not_overwritten(trained, scenes):
    run, _ = trained
    root, _ = scenes
    before = (run / "metrics.csv").read_text(encoding="utf-8")
    result = _invoke("train-det", root, "-o", run, *TINY)
    assert result.exit_code == 2 and "already holds a training run" in result.stderr
    assert (run / "metrics.csv").read_text(encoding="utf-8") == before


def test_sigterm_stops_training_and_exports_the_best_epoch_so_far(scenes, tmp_path):
    import signal

    from training_runs import signal_when

    root, _ = scenes
    run = tmp_path / "run"
    state = run / "checkpoints" / "train_state.yaml"
    code, stderr = signal_when(["train-det", root, "-o", run, "--recipe", "tiny", "--batch-size", "4", "--epochs", "300",
                                "--merge-classes"], state.is_file, signal.SIGTERM, timeout=300)
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in stderr and "FatalError" not in stderr and "stopped by SIGTERM" in stderr
    assert (run / "checkpoints" / "last.pdparams").is_file()
    assert (run / "export" / "model.pdiparams").is_file()
    assert 1 <= len((run / "metrics.csv").read_text(encoding="utf-8").splitlines()[1:]) < 300


def test_categories_are_kept_without_merge(scenes, tmp_path):
    from shitu_cli.train.det import prepare_dataset

    root, names = scenes
    data = prepare_dataset(root, tmp_path / "data")
    assert data.labels == names
    train = json.loads(data.train_json.read_text(encoding="utf-8"))
    assert {c["id"] for c in train["categories"]} == {1, 2}
    assert all(Path(i["file_name"]).is_absolute() and Path(i["file_name"]).is_file() for i in train["images"])
    assert all(a["area"] > 0 and a["iscrowd"] == 0 for a in train["annotations"])


def test_voc_datasets_are_converted(tmp_path):
    from shitu_cli.train.det import prepare_dataset
    from synth import write_rgb

    root = tmp_path / "voc"
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        (root).mkdir(exist_ok=True)
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
        for image_id in ids:
            write_rgb(root / "JPEGImages" / f"{image_id}.jpg", np.full((40, 50, 3), 120, np.uint8))
            xml = (f"<annotation><filename>{image_id}.jpg</filename><object><name>bottle</name>"
                   "<bndbox><xmin>5</xmin><ymin>6</ymin><xmax>25</xmax><ymax>30</ymax></bndbox></object></annotation>")
            (root / "Annotations").mkdir(exist_ok=True)
            (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
    data = prepare_dataset(root, tmp_path / "data")
    assert data.kind == "voc" and data.labels == ["bottle"]
    assert (data.train_images, data.val_images, data.train_boxes) == (2, 1, 2)
    box = json.loads(data.val_json.read_text(encoding="utf-8"))["annotations"][0]["bbox"]
    assert box == [5.0, 6.0, 20.0, 24.0]


# ---------------------------------------------------------------- bad input: exit 2, one line


def test_missing_dataset_is_refused(tmp_path):
    result = _invoke("train-det", tmp_path / "nope", "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2
    assert "dataset folder not found" in result.stderr and "Traceback" not in result.stderr


def test_folder_without_train_json_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    result = _invoke("train-det", tmp_path / "data", "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2
    assert "no train.json" in result.stderr and "split-dataset" in result.stderr


def test_missing_val_json_is_refused(scenes, tmp_path):
    root, _ = scenes
    copy = tmp_path / "scenes"
    shutil.copytree(root, copy)
    (copy / "val.json").unlink()
    result = _invoke("train-det", copy, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "val.json is missing" in result.stderr


def test_unreadable_and_missing_images_are_skipped_and_named(scenes, tmp_path):
    root, _ = scenes
    copy = tmp_path / "scenes"
    shutil.copytree(root, copy)
    (copy / "images" / "train_000.jpg").unlink()
    (copy / "images" / "train_001.jpg").write_bytes((root / "images" / "train_001.jpg").read_bytes()[:300])
    result = _invoke("train-det", copy, "-o", tmp_path / "run", *TINY, "--json")
    assert result.exit_code == 0, result.stderr
    skipped = {s["path"]: s["reason"] for s in json.loads(result.stdout)["skipped"]}
    assert skipped.keys() == {"images/train_000.jpg", "images/train_001.jpg"}
    assert skipped["images/train_000.jpg"] == "file not found"
    assert json.loads(result.stdout)["train_images"] == 10

    for image in (copy / "images").glob("val_*.jpg"):
        image.unlink()
    nothing = _invoke("train-det", copy, "-o", tmp_path / "run2", *TINY)
    assert nothing.exit_code == 2
    assert "none of the 4 images listed in val.json can be read" in nothing.stderr


def test_dataset_without_boxes_is_refused(scenes, tmp_path):
    root, _ = scenes
    copy = tmp_path / "scenes"
    shutil.copytree(root, copy)
    document = json.loads((copy / "train.json").read_text(encoding="utf-8"))
    document["annotations"] = []
    (copy / "train.json").write_text(json.dumps(document), encoding="utf-8")
    result = _invoke("train-det", copy, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "no box annotations" in result.stderr


def test_unknown_recipe_lists_the_valid_names(scenes, tmp_path):
    root, _ = scenes
    result = _invoke("train-det", root, "-o", tmp_path / "run", "--recipe", "tinyy")
    assert result.exit_code == 2
    assert "unknown detection recipe 'tinyy'" in result.stderr
    for name in ("pp-shituv2-mainbody", "small", "tiny"):
        assert name in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_pretrained_file_or_name_is_refused_before_training(scenes, tmp_path):
    root, _ = scenes
    missing = _invoke("train-det", root, "-o", tmp_path / "run", *TINY, "--pretrained", tmp_path / "nope.pdparams")
    assert missing.exit_code == 2 and "nope.pdparams" in missing.stderr and "not found" in missing.stderr
    name = _invoke("train-det", root, "-o", tmp_path / "run2", *TINY, "--pretrained", "PPLCNet_x0_25-pretrained")
    assert name.exit_code == 2 and "shitu models pull PPLCNet_x0_25-pretrained" in name.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
