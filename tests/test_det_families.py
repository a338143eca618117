"""train-det's multi-class families (PP-YOLOE, YOLOv3-MobileNetV1) end to end on drawn 3-class scenes:
train briefly, export with NMS, exported boxes = dygraph boxes, AP per class reported, predict carries
the detector's classes; the PP-YOLO tricks land in ppdet's config; per-class AP on known detections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shitu_cli.artifacts import dump_yaml, read_yaml
from det_checks import assert_export_matches_dygraph
from synth_scenes import make_coco_scenes

QUICK = ("--epochs", "1", "--batch-size", "4", "--input-size", "160")


def _invoke(*args):
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _narrow_recipe(name: str, path: Path, **sections) -> Path:
    """A shipped recipe's network, narrowed so it trains in seconds; boxes kept from score 0.001 so a
    briefly trained net still returns boxes to compare."""
    from shitu_cli.train.det_config import load_recipe

    _, document = load_recipe(name)
    for key, value in sections.items():
        document[key] = {**document[key], **value} if isinstance(value, dict) else value
    holder = "PPYOLOEHead" if "PPYOLOEHead" in document else "BBoxPostProcess"
    document[holder]["nms"]["score_threshold"] = 0.001
    # keep_top_k above the candidate count: a net trained for seconds scores most boxes alike, and which
    # of the tied boxes a top-k cut keeps differs between the exported and the dygraph kernels
    document["shitu"] = {**document["shitu"], "warmup_steps": 2, "multi_scale_steps": 0, "eval_every": 1, "ema": False,
                         "keep_top_k": 2000}
    path.write_text(dump_yaml(document), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("families") / "scenes"
    names = make_coco_scenes(root, n_train=8, n_val=4, n_classes=3, seed=5)
    return root, names


def _train(scenes, tmp_path_factory, recipe: Path, *extra):
    root, _ = scenes
    run = tmp_path_factory.mktemp("runs") / recipe.stem
    result = _invoke("train-det", root, "-o", run, "--recipe", recipe, *QUICK, *extra, "--json")
    assert result.exit_code == 0, result.stderr
    return run, json.loads(result.stdout)


@pytest.fixture(scope="module")
def ppyoloe(scenes, tmp_path_factory):
    recipe = _narrow_recipe("ppyoloe-cpu", tmp_path_factory.mktemp("recipes") / "ppyoloe-test.yml", width_mult=0.125)
    return _train(scenes, tmp_path_factory, recipe, "--nms", "matrix")


@pytest.fixture(scope="module")
def yolov3(scenes, tmp_path_factory):
    recipe = _narrow_recipe("yolov3-mobilenetv1", tmp_path_factory.mktemp("recipes") / "yolov3-test.yml",
                            MobileNet={"scale": 0.25})
    # --warmup-steps past the run's 2 steps: taken as given, not cut (test_an_explicit_warm_up_is_taken_as_given)
    return _train(scenes, tmp_path_factory, recipe, "--label-smooth", "--mixup-epochs", "1", "--warmup-steps", "3")


@pytest.fixture(params=["ppyoloe", "yolov3"])
def family_run(request):
    return request.param, request.getfixturevalue(request.param)


def test_each_family_trains_exports_and_reports_ap_per_class(family_run, scenes):
    family, (run, summary) = family_run
    _, names = scenes
    assert summary["labels"] == sorted(names)
    assert set(summary["per_class"]) == set(names)
    for ap in summary["per_class"].values():
        assert 0.0 <= ap["AP"] <= ap["AP50"] <= 1.0 and ap["boxes"] > 0
    assert read_yaml(run / "recipe.yaml")["metrics"]["per_class"] == summary["per_class"]
    manifest = read_yaml(run / "export" / "shitu.yaml")
    assert manifest["extra"]["family"] == family and manifest["labels"] == sorted(names)
    assert manifest["input_names"] == ["image", "scale_factor"]
    assert manifest["arch"].startswith({"ppyoloe": "PP-YOLOE-CSPResNet", "yolov3": "YOLOv3-MobileNetV1"}[family])


def test_the_tricks_reach_ppdet(ppyoloe, yolov3):
    config = read_yaml(ppyoloe[0] / "ppdet.yml")
    assert config["PPYOLOEHead"]["nms"]["name"] == "MatrixNMS"
    assert read_yaml(ppyoloe[0] / "export" / "shitu.yaml")["extra"]["nms"]["name"] == "MatrixNMS"
    config = read_yaml(yolov3[0] / "ppdet.yml")
    assert config["YOLOv3Loss"]["label_smooth"] is True
    assert {"Mixup": {"alpha": 1.5, "beta": 1.5}} in config["TrainReader"]["sample_transforms"]
    assert config["TrainReader"]["mixup_epoch"] == 1


def test_an_explicit_warm_up_is_taken_as_given(yolov3):
    run, summary = yolov3
    assert read_yaml(run / "ppdet.yml")["LearningRate"]["schedulers"][1]["steps"] == 3
    shitu = read_yaml(run / "recipe.yaml")["options"]["recipe"]["shitu"]
    assert (shitu["warmup_steps"], shitu["warmup_max_share"]) == (3, 0.0)  # a replay keeps it uncut too
    assert summary["warmup"] == {"steps": 3, "asked": 3, "run_steps": 2, "capped": False, "explicit": True,
                                 "first_decay": 2}


def test_exported_boxes_match_the_dygraph_model(family_run, scenes):
    _, (run, _) = family_run
    assert_export_matches_dygraph(run, scenes[0])


def test_predict_det_only_reports_the_detectors_classes(family_run, scenes, tmp_path):
    _, (run, summary) = family_run
    root, _ = scenes
    result = _invoke("predict", root / "images" / "val_000.jpg", root / "images" / "val_001.jpg", "--det", run / "export",
                     "--det-only", "--det-thresh", "0", "--max-boxes", "3", "--save-vis", tmp_path / "vis", "--json")
    assert result.exit_code == 0, result.stderr
    images = json.loads(result.stdout)["images"]
    boxes = [r for image in images for r in image["recognitions"]]
    assert len(boxes) == 6
    assert all(r["det_label"] in summary["labels"] and r["label"] == r["det_label"] and r["matches"] == [] for r in boxes)
    assert (tmp_path / "vis" / "val_000.jpg").is_file()
    from shitu_cli import Detect  # the Python API gives what the CLI gives

    same = Detect(run / "export", det_thresh=0, max_boxes=3)(root / "images" / "val_000.jpg")
    assert [(r.label, round(r.score, 5)) for r in same.recognitions] == \
        [(r["label"], round(r["score"], 5)) for r in images[0]["recognitions"]]


def test_predict_with_an_index_keeps_the_detectors_class(yolov3, scenes, tmp_path):
    from synth import make_class_tree
    from tiny_rec import export_tiny_rec

    run, summary = yolov3
    root, _ = scenes
    rec = export_tiny_rec(tmp_path / "rec")
    make_class_tree(tmp_path / "gallery", n_classes=2, per_class=2)
    built = _invoke("build-index", tmp_path / "gallery", "-o", tmp_path / "index", "--rec", rec, "--json")
    assert built.exit_code == 0, built.stderr
    result = _invoke("predict", root / "images" / "val_000.jpg", "--index", tmp_path / "index", "--det", run / "export",
                     "--det-thresh", "0", "--max-boxes", "2", "--whole-image", "always", "--cover-thresh", "1", "--json")
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)["images"][0]["recognitions"]
    detected = [r for r in found if r["source"] == "detection"]
    assert detected and all(r["det_label"] in summary["labels"] and r["matches"] for r in detected)
    assert [r["det_label"] for r in found if r["source"] == "whole_image"] == [None]


def test_det_only_needs_a_detector_and_no_index(tmp_path):
    image = tmp_path / "a.jpg"
    from conftest import write_image

    write_image(image)
    result = _invoke("predict", image, "--det-only")
    assert result.exit_code == 2 and "--det-only needs a detector" in result.stderr


# ---------------------------------------------------------------- config and metrics, no training


def _config(recipe: str, flags: dict):
    from shitu_cli.train.det_config import build_ppdet_config, load_recipe, resolve_settings
    from shitu_cli.train.det_data import DetDataset

    _, document = load_recipe(recipe)
    placeholder = Path("/nonexistent/data.json")
    data = DetDataset(Path("/nonexistent"), "coco", placeholder, placeholder, ["a", "b"], 1, 1, 1, 1)
    return build_ppdet_config(document, resolve_settings(document, flags), data, Path("/nonexistent/run"))


def test_the_2x_schedule_doubles_the_epochs_with_steps_at_the_same_fractions():
    one = _config("yolov3-mobilenetv1", {"epochs": 12, "schedule": "1x"})
    two = _config("yolov3-mobilenetv1", {"epochs": 12, "schedule": "2x"})
    assert (one["epoch"], two["epoch"]) == (12, 24)
    assert one["LearningRate"]["schedulers"][0] == {"name": "PiecewiseDecay", "gamma": 0.1, "milestones": [8, 11]}
    assert two["LearningRate"]["schedulers"][0]["milestones"] == [16, 22]
    assert _config("ppyoloe-s", {})["LearningRate"]["schedulers"][0]["name"] == "CosineDecay"


def test_a_cut_warm_up_is_cut_no_further_on_replay_and_the_user_s_is_kept():
    from shitu_cli.train.det_config import load_recipe, resolve_settings
    from shitu_cli.train.det_schedule import fit_warmup

    _, document = load_recipe("yolov3-mobilenetv1")
    settings = resolve_settings(document, {"epochs": 12})
    plan = fit_warmup(settings, epoch_steps=8, epochs=12, explicit=False)  # 1000 steps asked of a 96-step run
    assert (plan.steps, plan.capped, plan.first_decay) == (9, True, 64) and "warming up for 9 steps" in plan.note()
    replay = resolve_settings({**document, "shitu": {**document["shitu"], "warmup_steps": settings.warmup_steps}}, {})
    assert fit_warmup(replay, epoch_steps=8, epochs=12, explicit=False).steps == 9
    user = resolve_settings(document, {"epochs": 12, "warmup_steps": 70})
    plan = fit_warmup(user, epoch_steps=8, epochs=12, explicit=True)
    assert (plan.steps, plan.capped, user.warmup_max_share) == (70, False, 0.0)
    assert "ends after the schedule's first lr drop at step 64" in plan.note()
    assert fit_warmup(resolve_settings(document, {"warmup_max_share": 0.0}), 8, 12, explicit=False).steps == 1000


def test_epoch_switches_scale_to_a_short_run_once_and_a_flag_wins():
    from dataclasses import asdict

    from shitu_cli.train.det import _fit_epoch_switches
    from shitu_cli.train.det_config import build_ppdet_config, load_recipe, resolve_settings
    from shitu_cli.train.det_data import DetDataset

    placeholder = Path("/nonexistent/data.json")
    data = DetDataset(Path("/nonexistent"), "coco", placeholder, placeholder, ["a", "b"], 1, 1, 1, 1)
    notes = []

    def fitted(recipe, flags, document=None):
        document = document or load_recipe(recipe)[1]
        settings = resolve_settings(document, flags)
        points = {p["name"]: p for p in _fit_epoch_switches(settings, document, set(flags), notes.append)}
        config = build_ppdet_config(document, settings, data, Path("/nonexistent/run"))
        return settings, points, config, {**document, "shitu": asdict(settings)}

    # PP-YOLO mixes 250 of 270 epochs: a 20-epoch run mixes 18 and trains the last 2 on plain images
    settings, points, config, recorded = fitted("yolov3-mobilenetv1", {"epochs": 20})
    assert (settings.mixup_epochs, config["TrainReader"]["mixup_epoch"], points["mixup_epochs"]["scaled"]) == (18, 18, True)
    assert notes.pop() == ("the recipe's epoch switches are set for 270 epochs and this run trains 20: mixup for the "
                           "first 18 epochs instead of 250 (set them with --mixup-epochs)")
    # a replay of the recorded recipe trains the same 18, scaled no further and with no note
    settings, points, config, _ = fitted(None, {}, recorded)
    assert (settings.mixup_epochs, points["mixup_epochs"]["scaled"], notes) == (18, False, [])
    # PP-YOLOE assigns with ATSS for 30 of 300 epochs: 2 of 20; the flag is taken as given
    settings, points, config, _ = fitted("ppyoloe-s", {"epochs": 20})
    assert (config["PPYOLOEHead"]["static_assigner_epoch"], settings.static_assigner_epochs) == (2, 2)
    assert "the static (ATSS) assigner for the first 2 epochs instead of 30" in notes.pop()
    settings, points, config, _ = fitted("ppyoloe-s", {"epochs": 20, "static_assigner_epochs": 15})
    assert (config["PPYOLOEHead"]["static_assigner_epoch"], points["static_assigner_epochs"]["explicit"], notes) == (15, True, [])
    # a run as long as the recipe's keeps its switches; a 2x run of a 1x recipe is longer
    assert fitted("ppyoloe-s", {})[2]["PPYOLOEHead"]["static_assigner_epoch"] == 30
    assert fitted("yolov3-mobilenetv1", {"schedule": "2x"})[0].mixup_epochs == 250 and notes == []


def test_a_scaled_switch_keeps_an_epoch_on_each_side_where_the_run_has_two():
    from shitu_cli.train.det_schedule import scaled_epoch_point

    assert [scaled_epoch_point(250, run, 270) for run in (1, 2, 3, 20, 269, 270, 400)] == [1, 1, 2, 18, 249, 250, 250]
    assert [scaled_epoch_point(30, run, 300) for run in (5, 9, 10, 299)] == [1, 1, 1, 29]
    assert scaled_epoch_point(0, 20, 270) == 0  # off stays off
    assert scaled_epoch_point(269, 20, 270) == 19


def test_static_assigner_epochs_are_a_ppyoloe_setting():
    from shitu_cli.errors import BadInput

    with pytest.raises(BadInput, match="static-assigner-epochs is a PP-YOLOE-head setting"):
        _config("yolov3-mobilenetv1", {"static_assigner_epochs": 3})
    with pytest.raises(BadInput, match="must not be negative"):
        _config("ppyoloe-cpu", {"static_assigner_epochs": -1})


def test_the_runs_record_the_switch_epochs_they_trained_with(ppyoloe, yolov3):
    run, summary = ppyoloe  # ppyoloe-cpu's 30 of 80 ATSS epochs, on a 1-epoch run
    assert read_yaml(run / "ppdet.yml")["PPYOLOEHead"]["static_assigner_epoch"] == 1
    recipe = read_yaml(run / "recipe.yaml")
    assert recipe["options"]["recipe"]["shitu"]["static_assigner_epochs"] == 1
    assert recipe["inputs"]["epoch_switches"] == summary["epoch_switches"] == [
        {"name": "static_assigner_epochs", "epochs": 1, "asked": 30, "run_epochs": 1, "recipe_epochs": 80,
         "scaled": True, "explicit": False}]
    run, summary = yolov3  # --mixup-epochs 1: taken as given
    assert [(s["name"], s["epochs"], s["explicit"], s["scaled"]) for s in summary["epoch_switches"]] == [
        ("mixup_epochs", 1, True, False)]


def test_the_iou_aware_head_is_ppdets():
    config = _config("yolov3-mobilenetv1", {"iou_aware": True, "nms": "matrix"})
    assert config["YOLOv3Head"]["iou_aware"] is True and config["YOLOv3Loss"]["iou_aware_loss"] == "IouAwareLoss"
    assert config["IouAwareLoss"] == {"loss_weight": 1.0}
    assert config["BBoxPostProcess"]["nms"]["name"] == "MatrixNMS"
    assert "IouAwareLoss" not in _config("yolov3-mobilenetv1", {})


def test_yolov3_head_tricks_are_refused_for_other_families():
    from shitu_cli.errors import BadInput

    with pytest.raises(BadInput, match="label_smooth is a YOLOv3-head trick"):
        _config("ppyoloe-cpu", {"label_smooth": True})
    with pytest.raises(BadInput, match="unknown nms"):
        _config("ppyoloe-cpu", {"nms": "soft"})


def test_class_aps_scores_known_detections(tmp_path):
    from shitu_cli.train.det_metrics import class_aps

    truth = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
                             {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0}],
             "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "eel"}]}
    (tmp_path / "val.json").write_text(json.dumps(truth), encoding="utf-8")
    # cat found exactly; dog's only box is shifted to IoU 2/3: right at IoU 0.50-0.65, wrong from 0.70 up
    detections = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
                  {"image_id": 1, "category_id": 2, "bbox": [58, 50, 40, 40], "score": 0.8}]
    (tmp_path / "bbox.json").write_text(json.dumps(detections), encoding="utf-8")
    aps = class_aps(tmp_path / "val.json", tmp_path / "bbox.json")
    assert aps["cat"] == {"AP": 1.0, "AP50": 1.0, "boxes": 1}
    assert aps["dog"]["AP50"] == 1.0 and aps["dog"]["AP"] == pytest.approx(0.4)  # right at 4 of the 10 thresholds
    assert aps["eel"]["AP"] == -1.0 and aps["eel"]["boxes"] == 0
    assert class_aps(tmp_path / "val.json", tmp_path / "missing.json")["cat"]["AP"] == 0.0


@pytest.mark.slow
def test_reproduce_replays_a_ppyoloe_run_byte_for_byte(ppyoloe, tmp_path):
    import subprocess
    import sys

    run, _ = ppyoloe
    result = subprocess.run([sys.executable, "-m", "shitu_cli", "reproduce", str(run / "recipe.yaml"),
                             "-o", str(tmp_path / "again"), "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["identical"] and {f["path"] for f in report["files"]} >= {"export/model.pdiparams", "export/model.json"}


@pytest.mark.slow
def test_yolov3_with_every_trick_trains_exports_and_agrees(scenes, tmp_path_factory):
    """IoU-aware head + loss, label smoothing, mixup with a last epoch without it, EMA, Matrix NMS, 2x."""
    recipe = _narrow_recipe("yolov3-mobilenetv1", tmp_path_factory.mktemp("recipes") / "yolov3-tricks.yml",
                            MobileNet={"scale": 0.25})
    run, summary = _train(scenes, tmp_path_factory, recipe, "--iou-aware", "--label-smooth", "--mixup-epochs", "1",
                          "--ema", "--nms", "matrix", "--schedule", "2x")
    assert summary["epochs"] == 2 and summary["epochs_done"] == 2 and set(summary["per_class"]) == set(summary["labels"])
    assert read_yaml(run / "export" / "shitu.yaml")["extra"]["nms"]["name"] == "MatrixNMS"
    result = _invoke("predict", scenes[0] / "images" / "val_000.jpg", "--det", run / "export", "--det-only",
                     "--det-thresh", "0", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["images"][0]["recognitions"]
