"""`shitu compress DET --prune R --teacher BIG_DET`: a pruned detector fine-tuned from a separate detector.

The student is a tiny train-det run (PicoDet LCNet x0.25, 32-channel neck, 128 px); the teacher is the
shipped demo detector (PicoDet LCNet x0.75, 256 px), so the feature losses need their align convs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from synth_scenes import make_coco_scenes

REPO = Path(__file__).resolve().parents[1]
DEMO_DET = REPO / "assets" / "demo" / "models" / "det"
DEMO_REC = REPO / "assets" / "demo" / "models" / "rec"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from shitu_cli.train.det import train_det

    root = tmp_path_factory.mktemp("det-student")
    make_coco_scenes(root / "scenes", n_train=8, n_val=4, n_classes=2, seed=5)
    train_det(root / "scenes", root / "run", recipe="tiny", settings={"epochs": 1, "batch_size": 4}, merge_classes=True)
    return root / "run", root / "scenes"


def _compress(cli, run_dir: Path, calib: Path, out: Path, *extra):
    return cli("compress", run_dir, "--calib", calib, "-o", out, "--prune", "0.3", "--quant", "none", "--epochs", "1",
               "--runs", "2", "--max-drop", "100", "--json", *extra)


def test_a_bigger_teacher_fine_tunes_the_pruned_student_and_is_recorded(cli, student, tmp_path):
    from shitu_cli.artifacts import sha256_file
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector

    run_dir, scenes = student
    out = tmp_path / "pruned"
    # an image folder: no boxes, so the student trains on the teacher's detections
    result = _compress(cli, run_dir, scenes / "images", out, "--teacher", DEMO_DET, "--calib-size", "4")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "prune-l1-0.3+distill-teacher" and report["written"]
    manifest = yaml.safe_load((out / "shitu.yaml").read_text(encoding="utf-8"))
    details = manifest["extra"]["compress"]
    assert details["teacher"]["params_sha256"] == sha256_file(DEMO_DET / "model.pdiparams")
    assert details["teacher"]["path"] == str(DEMO_DET.resolve()) and details["teacher"]["arch"] == "PicoDet-LCNet_x0.75"
    # the demo's PicoHead has the student's strides and classes: at the student's input size its dense outputs
    # line up one for one, so they are passed on (no labels in an image folder: no detection loss)
    assert details["distill"].startswith("student detection loss on 0 labelled image(s); teacher's dense scores")
    assert int(re.search(r"MimicFeatureLoss on (\d+) neck level", details["distill"]).group(1)) >= 3  # every stride paired
    assert details["params_after"] < details["params_before"]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["options"]["teacher"] == str(DEMO_DET)
    boxes, count = Detector(out).raw(read_image(scenes / "images" / "val_000.jpg"))
    assert boxes.shape[-1] == 6 and int(np.asarray(count).reshape(-1)[0]) >= 0  # loads and runs with its NMS


@pytest.mark.slow  # ~20 s alone: a second fine-tune; `make test-slow` runs it
def test_coco_boxes_and_a_teacher_with_the_same_anchors_add_their_losses(cli, student, tmp_path):
    """A teacher with the student's strides, classes and input size (here: the unpruned run itself) also passes
    its dense scores and boxes; a COCO json's boxes train the student's detection loss."""
    run_dir, scenes = student
    result = _compress(cli, run_dir, scenes / "train.json", tmp_path / "pruned", "--teacher", run_dir)
    assert result.exit_code == 0, result.stderr
    details = yaml.safe_load((tmp_path / "pruned" / "shitu.yaml").read_text(encoding="utf-8"))["extra"]["compress"]
    assert details["distill"].startswith("student detection loss on 8 labelled image(s); teacher's dense scores")


def test_without_dense_outputs_to_match_the_teachers_detections_are_the_boxes(student):
    """Another architecture's teacher: its detections (score >= PSEUDO_BOX_SCORE) become boxes in the student's
    input pixels; a COCO json's own boxes win over them."""
    from shitu_cli.compress.det_teacher import PSEUDO_BOX_SCORE, training_images
    from shitu_cli.compress.images import load_image_set
    from shitu_cli.compress.source import resolve_source
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector

    run_dir, scenes = student
    source, teacher = resolve_source(run_dir), resolve_source(DEMO_DET)
    unlabelled = load_image_set(scenes / "images", "calibration set").subset(3)
    data = training_images(source, teacher, unlabelled, pseudo_boxes=True)
    assert data.labelled == 0 and data.has_boxes.all() and data.student.shape[1:] == (3, 128, 128)
    demo = Detector(DEMO_DET)
    for sample, boxes in zip(unlabelled.samples, data.boxes):
        rgb = read_image(sample.path)
        found = demo.detect(rgb, thresh=PSEUDO_BOX_SCORE, max_boxes=30)
        scale = np.array([128 / rgb.shape[1], 128 / rgb.shape[0]] * 2, np.float32)
        assert np.allclose(boxes, np.array([d.box for d in found], np.float32).reshape(-1, 4) * scale, atol=1e-3)
    assert sum(len(b) for b in data.boxes) > 0  # the demo mainbody detector finds the drawn objects
    labelled = load_image_set(scenes / "train.json", "calibration set").subset(2)
    data = training_images(source, teacher, labelled, pseudo_boxes=True)
    assert data.labelled == 2 and [len(b) for b in data.boxes] == [len(s.boxes) for s in labelled.samples]


def _demo_copy(tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(DEMO_DET, copy)
    return copy


@pytest.mark.parametrize("problem", ["other classes", "not rebuildable", "not a detector", "missing"])
def test_a_bad_teacher_is_refused_by_name_and_nothing_is_written(cli, tmp_path, problem):
    if problem == "other classes":
        teacher = _demo_copy(tmp_path, "teacher")
        manifest = yaml.safe_load((teacher / "shitu.yaml").read_text(encoding="utf-8"))
        manifest["labels"] = ["cat", "dog"]
        (teacher / "shitu.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
        expected = "other classes"
    elif problem == "not rebuildable":
        teacher = _demo_copy(tmp_path, "teacher")
        (teacher / "ppdet_model.yml").unlink()
        expected = "cannot be rebuilt"
    elif problem == "not a detector":
        teacher, expected = DEMO_REC, "not a detector"
    else:
        teacher, expected = tmp_path / "nowhere", "model not found"
    out = tmp_path / "out"
    result = _compress(cli, DEMO_DET, REPO / "assets" / "demo" / "queries" / "images", out, "--teacher", teacher)
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr and str(teacher) in result.stderr
    assert not out.exists()


def test_teacher_needs_prune_and_a_detector(cli, tmp_path):
    calib = REPO / "assets" / "demo" / "queries" / "images"
    no_prune = cli("compress", DEMO_DET, "--calib", calib, "-o", tmp_path / "a", "--teacher", DEMO_DET)
    assert no_prune.exit_code == 2 and "--teacher needs --prune" in no_prune.stderr
    rec = cli("compress", DEMO_REC, "--calib", calib, "-o", tmp_path / "b", "--prune", "0.3", "--teacher", DEMO_DET)
    assert rec.exit_code == 2 and "built for detectors" in rec.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
