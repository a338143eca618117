"""`shitu compress` on detectors: the shipped demo PicoDet (an export alone) and a tiny train-det run go
through Paddle PTQ to INT8 models that keep their boxes, load in predict, and record their lineage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shitu_cli.compress.images import Sample
from shitu_cli.compress.measure import Detections, box_agreement, detection_map
from synth_scenes import make_coco_scenes
from tests.compress_runs import assert_auto_picked_the_best

REPO = Path(__file__).resolve().parents[1]
DEMO_DET = REPO / "assets" / "demo" / "models" / "det"
QUERIES = REPO / "assets" / "demo" / "queries"


def _rows(*rows):
    return np.array(rows, np.float32).reshape(-1, 6)


# ----------------------------------------------------------------------------- box agreement and mAP


def test_identical_boxes_agree_fully():
    boxes = [_rows([0, 0.9, 10, 10, 50, 50], [0, 0.8, 60, 60, 90, 90])]
    assert box_agreement(boxes, boxes) == {"agreement": 1.0, "matched_iou": 1.0}


def test_a_lost_box_and_a_moved_box_lower_agreement():
    before = [_rows([0, 0.9, 10, 10, 50, 50], [0, 0.8, 60, 60, 90, 90])]
    lost = [_rows([0, 0.9, 10, 10, 50, 50])]
    assert box_agreement(before, lost)["agreement"] == pytest.approx(2 / 3)
    moved = [_rows([0, 0.9, 10, 10, 50, 50], [0, 0.8, 80, 80, 110, 110])]  # IoU with its twin < 0.5
    assert box_agreement(before, moved)["agreement"] == pytest.approx(0.5)


def test_agreement_counts_only_boxes_the_pipeline_acts_on_and_needs_the_same_class():
    before = [_rows([0, 0.9, 10, 10, 50, 50], [0, 0.1, 60, 60, 90, 90])]  # the 0.1 box is below predict's 0.2
    after = [_rows([0, 0.7, 11, 11, 50, 50])]
    assert box_agreement(before, after)["agreement"] == 1.0
    assert box_agreement(before, [_rows([1, 0.7, 11, 11, 50, 50])])["agreement"] == 0.0
    assert box_agreement([_rows()], [_rows()])["agreement"] == 1.0  # neither model finds anything


def test_detection_map_is_one_for_exact_boxes_and_zero_for_none():
    samples = [Sample(Path("a.jpg"), None, ((10, 10, 50, 50, "cup"),)), Sample(Path("b.jpg"), None, ((5, 5, 40, 30, "cat"),))]
    exact = Detections([_rows([0, 0.9, 10, 10, 50, 50]), _rows([0, 0.8, 5, 5, 40, 30])], samples)
    # a one-class (mainbody) detector is scored class-agnostic: "cup" and "cat" are both objects to find
    assert detection_map(exact, ["foreground"]) == ("mAP", pytest.approx(1.0))
    assert detection_map(Detections([_rows(), _rows()], samples), ["foreground"]) == ("mAP", 0.0)
    assert detection_map(Detections(exact.per_image, [Sample(Path("a.jpg"), "x"), samples[1]]), ["foreground"]) is None


# ----------------------------------------------------------------------------- the shipped demo detector


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory):
    """The demo detector (an export with ppdet_model.yml, no run dir) compressed once, with the CLI's JSON.
    One algorithm (hist) keeps the default run short; --algo auto on a detector is the slow test below."""
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    out = tmp_path_factory.mktemp("det-int8") / "int8"
    result = CliRunner().invoke(app, ["compress", str(DEMO_DET), "--calib", str(QUERIES / "images"),
                                      "--eval", str(QUERIES / "annotations.json"), "-o", str(out), "--runs", "3",
                                      "--algo", "hist", "--json"])
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_ptq_shrinks_the_demo_detector_and_keeps_its_boxes(demo_int8):
    out, report = demo_int8
    assert report["written"] and report["task"] == "det" and report["method"] == "ptq-hist"
    assert report["after"]["precision"] == "int8"
    assert report["after"]["size_bytes"] < 0.5 * report["before"]["size_bytes"]
    assert report["after"]["agreement"]["agreement"] >= 0.9
    # the demo detector scores about 0.72 COCO mAP on its 12 query scenes; INT8 must stay within --max-drop 1
    assert report["before"]["metric"]["mAP"] > 0.6
    assert report["quality_basis"] == "mAP on the --eval images" and report["quality_drop"] <= 1.0
    assert (report["calib_images"], report["eval_images"]) == (12, 12)


@pytest.mark.slow  # ~45 s: four calibrations of the detector; `make test-slow` runs it
def test_auto_ranks_detector_calibrations_by_map_against_the_original(cli, tmp_path):
    result = cli("compress", DEMO_DET, "--calib", QUERIES / "images", "--eval", QUERIES / "annotations.json",
                 "-o", tmp_path / "int8", "--runs", "1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert_auto_picked_the_best(report, 9, 3)  # the default --algo auto: 9 scenes calibrate, 3 score
    assert report["after"]["agreement"]["agreement"] >= 0.9


def test_the_int8_detector_is_a_normal_model_dir_with_its_lineage(demo_int8):
    from shitu_cli.artifacts import read_yaml
    from shitu_cli.models.manifest import read_model_manifest

    out, report = demo_int8
    manifest, parent = read_model_manifest(out), read_model_manifest(DEMO_DET)
    assert (manifest.task, manifest.precision, manifest.method) == ("det", "int8", report["method"])
    assert manifest.extra["compress"]["quality_basis"] == report["quality_basis"]
    assert manifest.parent_model_hash == parent.model_hash and manifest.labels == parent.labels
    assert (out / "infer_cfg.yml").read_text() == (DEMO_DET / "infer_cfg.yml").read_text()
    recipe = read_yaml(out / "recipe.yaml")
    assert recipe["command"] == "compress" and recipe["metrics"]["after"]["mAP"] > 0.6


def test_predict_finds_the_query_objects_with_the_int8_detector(cli, demo_int8):
    from shitu_cli.infer.pipeline import iou

    out, _ = demo_int8
    truth = json.loads((QUERIES / "ground_truth.json").read_text())
    result = cli("predict", QUERIES / "images", "--det", out, "--json")
    assert result.exit_code == 0, result.stderr
    found = {Path(r["path"]).name: [rec["box"] for rec in r["recognitions"]] for r in json.loads(result.stdout)["images"]}
    hits = sum(any(iou(obj["box"], box) >= 0.5 for box in found[Path(name).name]) for name, objs in truth.items() for obj in objs)
    assert hits >= 0.8 * sum(len(objs) for objs in truth.values())


def test_an_export_without_its_architecture_is_refused(cli, tmp_path):
    bare = tmp_path / "det"
    shutil.copytree(DEMO_DET, bare, ignore=shutil.ignore_patterns("ppdet_model.yml"))
    result = cli("compress", bare, "--calib", QUERIES / "images", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "ppdet_model.yml" in result.stderr and "train-det run dir" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_architecture_file_that_does_not_match_the_export_is_refused(cli, tmp_path):
    edited = tmp_path / "det"
    shutil.copytree(DEMO_DET, edited)
    sections = edited / "ppdet_model.yml"
    sections.write_text(sections.read_text().replace("num_convs: 2", "num_convs: 1"))
    result = cli("compress", edited, "--calib", QUERIES / "images", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "ppdet_model.yml" in result.stderr and "does not match" in result.stderr
    assert not (tmp_path / "out").exists()


def test_qat_is_refused_for_a_detector(cli, tmp_path):
    result = cli("compress", DEMO_DET, "--calib", QUERIES / "images", "-o", tmp_path / "out", "--quant", "qat")
    assert result.exit_code == 2 and "--quant ptq" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~50 s: detector pruning is the slowest compress path; `make test-slow` runs it
def test_prune_distill_then_ptq_shrinks_the_detector_backbone(cli, tmp_path):
    """Mechanics, not quality: a tiny fine-tune on 12 images cannot repair 30% fewer filters (the report
    measures a longer run), so --max-drop is lifted here."""
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector

    args = ["--calib", QUERIES / "images", "--eval", QUERIES / "annotations.json", "--epochs", "1", "--runs", "2",
            "--max-drop", "100", "--algo", "hist", "--json"]  # one algorithm: the choice is tested on the demo detector
    pruned = cli("compress", DEMO_DET, "--prune", "0.3", "--quant", "none", "-o", tmp_path / "pruned", *args)
    assert pruned.exit_code == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert report["method"] == "prune-l1-0.3+distill" and report["after"]["precision"] == "fp32"
    assert report["after"]["size_bytes"] < 0.9 * report["before"]["size_bytes"]
    boxes, count = Detector(tmp_path / "pruned").raw(read_image(QUERIES / "images" / "scene_000.jpg"))
    assert boxes.shape[-1] == 6 and int(np.asarray(count).reshape(-1)[0]) > 0  # a working detector, NMS included

    both = cli("compress", DEMO_DET, "--prune", "0.3", "--quant", "ptq", "-o", tmp_path / "pruned-int8", *args)
    assert both.exit_code == 0, both.stderr
    report = json.loads(both.stdout)
    assert report["method"] == "prune-l1-0.3+distill+ptq-hist" and report["after"]["precision"] == "int8"
    assert report["after"]["size_bytes"] < 0.4 * report["before"]["size_bytes"]


def test_the_demo_detector_runs_on_onnxruntime_with_the_same_boxes(tmp_path):
    """paddle2onnx 2.1 cannot read the scale attribute of PicoDet's upsampling; exports avoid it."""
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.predictor import PredictorOptions

    model = tmp_path / "det"
    shutil.copytree(DEMO_DET, model)  # the ONNX conversion is cached beside the model
    paddle_det, onnx_det = Detector(model), Detector(model, PredictorOptions(backend="onnxruntime"))
    assert onnx_det.predictor.backend == "onnxruntime"
    for image in sorted((QUERIES / "images").glob("*.jpg"))[:4]:
        rgb = read_image(image)
        expected, got = paddle_det.detect(rgb), onnx_det.detect(rgb)
        assert [d.label for d in got] == [d.label for d in expected]
        assert np.allclose([d.box for d in got], [d.box for d in expected], atol=1.0)
        assert np.allclose([d.score for d in got], [d.score for d in expected], atol=1e-3)


def test_onnx_int8_compresses_the_demo_detector(cli, tmp_path):
    model = tmp_path / "det"
    shutil.copytree(DEMO_DET, model)
    out = tmp_path / "onnx-int8"
    result = cli("compress", model, "--onnx-int8", "--calib", QUERIES / "images", "--eval", QUERIES / "annotations.json",
                 "-o", out, "--runs", "3", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] and report["after"]["backend"] == "onnxruntime" and report["after"]["precision"] == "int8"
    assert report["after"]["size_bytes"] < 0.5 * report["before"]["size_bytes"]
    assert report["after"]["agreement"]["agreement"] >= 0.9 and report["quality_drop"] <= 1.0
    assert any("on onnxruntime itself the original takes" in note for note in report["notes"])
    assert (out / "model.onnx").is_file() and (out / "infer_cfg.yml").is_file()
    found = cli("predict", QUERIES / "images" / "scene_000.jpg", "--det", out, "--json")
    assert found.exit_code == 0, found.stderr
    assert json.loads(found.stdout)["images"][0]["recognitions"][0]["label"] == "horse"


def test_a_broken_eval_json_is_a_one_line_error(cli, tmp_path):
    broken = tmp_path / "val.json"
    broken.write_text("{not json")
    result = cli("compress", DEMO_DET, "--calib", QUERIES / "images", "--eval", broken, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "val.json" in result.stderr and "COCO" in result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- a train-det run dir


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    from shitu_cli.train.det import train_det

    root = tmp_path_factory.mktemp("det-run")
    make_coco_scenes(root / "scenes", n_train=12, n_val=4, n_classes=2, seed=3)
    train_det(root / "scenes", root / "run", recipe="tiny", settings={"epochs": 1, "batch_size": 4}, merge_classes=True)
    return root / "run", root / "scenes"


@pytest.mark.slow  # ~45 s alone: a second detector PTQ (the demo detector's covers the path); `make test-slow`
def test_ptq_from_a_train_det_run_dir_and_from_its_export_alone(cli, det_run, tmp_path):
    run_dir, scenes = det_run
    assert (run_dir / "export" / "ppdet_model.yml").is_file()
    args = ["--calib", scenes / "train.json", "--eval", scenes / "val.json", "--runs", "2", "--max-drop", "100",
            "--algo", "hist", "--json"]  # the rebuild is under test here; the choice is tested on the demo detector
    from_run = cli("compress", run_dir, "-o", tmp_path / "a", *args)
    assert from_run.exit_code == 0, from_run.stderr
    alone = tmp_path / "export"
    shutil.copytree(run_dir / "export", alone)  # no run dir beside it: the weights come from the export
    from_export = cli("compress", alone, "-o", tmp_path / "b", *args)
    assert from_export.exit_code == 0, from_export.stderr
    for result, out in ((from_run, tmp_path / "a"), (from_export, tmp_path / "b")):
        report = json.loads(result.stdout)
        assert report["written"] and report["after"]["precision"] == "int8" and "mAP" in report["after"]["metric"]
        assert (out / "inference.pdmodel").is_file() and (out / "infer_cfg.yml").is_file()


@pytest.mark.slow  # ~50 s: a second full det PTQ; `make test-slow` runs it
def test_an_int8_detector_reproduces_byte_for_byte(cli, demo_int8, tmp_path):
    """Paddle's PTQ writes its ops in a run-dependent order; the saved program is put in a canonical one."""
    out, _ = demo_int8
    result = cli("reproduce", out / "recipe.yaml", "-o", tmp_path / "again", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    statuses = {entry["path"]: entry["status"] for entry in report["files"]}
    assert statuses["inference.pdmodel"] == statuses["inference.pdiparams"] == "identical" and report["identical"]


@pytest.mark.slow  # ~20 s alone: the legacy-export PTQ path; `make test-slow` runs it
def test_an_old_format_detector_without_its_architecture_is_quantized_as_is(cli, tmp_path):
    """The official PP-ShiTuV2 detector ships as inference.pdmodel with nothing to rebuild it from; here the
    demo detector exported the same way (its DFL as a matmul by 0..7) stands in for it."""
    import dataclasses

    from shitu_cli.compress.det import export_legacy_detector
    from shitu_cli.compress.det_rebuild import rebuild_detector
    from shitu_cli.compress.source import resolve_source
    from shitu_cli.models.manifest import write_model_manifest

    source = resolve_source(DEMO_DET)
    legacy = tmp_path / "official-like"
    export_legacy_detector(rebuild_detector(source), legacy, tuple(source.manifest.input_size), dfl_as_sum=False)
    shutil.copy2(DEMO_DET / "infer_cfg.yml", legacy / "infer_cfg.yml")
    write_model_manifest(legacy, dataclasses.replace(source.manifest, model_file="inference.pdmodel",
                                                      params_file="inference.pdiparams"))
    result = cli("compress", legacy, "--calib", QUERIES / "images", "--eval", QUERIES / "annotations.json",
                 "-o", tmp_path / "int8", "--runs", "2", "--algo", "hist", "--json")  # the rewrite is under test, not the choice
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] and report["after"]["precision"] == "int8"
    assert report["after"]["agreement"]["agreement"] >= 0.9 and report["quality_drop"] <= 1.0


class _WritesMarker:
    """Unpickling this runs `open(marker, 'w')`: the payload an untrusted .pdiparams.info could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_an_old_format_exports_pdiparams_info_is_never_unpickled(tmp_path):
    """Paddle's loader for old-format programs (reached with FLAGS_enable_pir_api=0) unpickles
    `<stem>.pdiparams.info` unrestricted; the detector's weights are read without it."""
    import os
    import pickle
    import subprocess
    import sys

    from shitu_cli.compress.det import export_legacy_detector
    from shitu_cli.compress.det_rebuild import rebuild_detector
    from shitu_cli.compress.source import resolve_source

    legacy = tmp_path / "legacy"
    export_legacy_detector(rebuild_detector(resolve_source(DEMO_DET)), legacy, (96, 96))
    marker = tmp_path / "payload-ran"
    (legacy / "inference.pdiparams.info").write_bytes(pickle.dumps(_WritesMarker(marker)))
    script = ("import sys; from pathlib import Path; from shitu_cli.compress.det_rebuild import _exported_parameters; "
              "print(len(_exported_parameters(Path(sys.argv[1]), 'inference')))")
    env = {**os.environ, "FLAGS_enable_pir_api": "0"}
    done = subprocess.run([sys.executable, "-c", script, str(legacy)], env=env, capture_output=True, text=True)
    assert not marker.exists()
    assert done.returncode == 0 and int(done.stdout.split()[-1]) > 50, done.stderr[-2000:]
