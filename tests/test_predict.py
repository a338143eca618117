"""`shitu predict` end to end, plus the pipeline's pure rules: per-label NMS and the whole-image policy."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from shitu_cli.infer.pipeline import Recognition, boxes_to_recognise, covered_share, iou, nms_per_label
from synth import make_class_tree
from tiny_rec import export_tiny_rec


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny rec model and a flat index of 4 drawn classes x 3 images, built once through the CLI."""
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    root = tmp_path_factory.mktemp("predict")
    rec = export_tiny_rec(root / "rec64", embedding_dim=64)
    gallery = root / "gallery"
    make_class_tree(gallery, n_classes=4, per_class=3, size=64, seed=2)
    done = CliRunner().invoke(app, ["build-index", str(gallery), "-o", str(root / "index"), "--rec", str(rec)])
    assert done.exit_code == 0, done.stderr
    return gallery, root / "index", rec


def test_gallery_images_recognise_as_themselves(cli, built):
    gallery, index, _ = built
    result = cli("predict", gallery, "--index", index, "--json", "--topk", "3")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["count"] == 12 and doc["failed"] == 0
    for image in doc["images"]:
        (top,) = image["recognitions"]
        assert top["label"] == image["path"].split("/")[-2]
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
        assert top["matches"][0]["gallery_path"] == image["path"]
        assert top["box"] == [0.0, 0.0, 64.0, 64.0] and top["source"] == "whole_image"
        labels = [m["label"] for m in top["matches"]]
        assert len(labels) == 3 == len(set(labels))  # top-k distinct labels
        assert [m["score"] for m in top["matches"]] == sorted((m["score"] for m in top["matches"]), reverse=True)


def test_json_is_one_document_with_the_documented_shape(cli, built):
    gallery, index, _ = built
    image = sorted(gallery.rglob("*.jpg"))[0]
    result = cli("predict", image, "--index", index, "--json")
    doc = json.loads(result.stdout)
    assert set(doc) == {"index", "models", "images", "count", "failed"}
    (entry,) = doc["images"]
    assert set(entry) == {"path", "recognitions", "whole_image_policy", "size", "error"}
    assert entry["whole_image_policy"] == "fallback" and entry["size"] == [64, 64] and entry["error"] is None
    assert set(entry["recognitions"][0]) == {"box", "label", "score", "matches", "source", "det_score", "det_label"}
    assert set(entry["recognitions"][0]["matches"][0]) == {"label", "score", "gallery_path"}


def test_a_corrupt_file_in_a_folder_is_reported_not_fatal(cli, built, tmp_path):
    gallery, index, _ = built
    shots = tmp_path / "shots"
    shots.mkdir()
    for image in sorted(gallery.rglob("*.jpg"))[:3]:
        (shots / f"{image.parent.name}-{image.name}").write_bytes(image.read_bytes())
    (shots / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = cli("predict", shots, "--index", index)
    assert result.exit_code == 0, result.stderr
    assert "could not read 1 file(s)" in result.stdout and "broken.png" in result.stdout
    assert "1 of 4 images could not be read" in result.stderr
    doc = json.loads(cli("predict", shots, "--index", index, "--json").stdout)
    assert doc["failed"] == 1
    (bad,) = [img for img in doc["images"] if img["error"]]
    assert bad["path"].endswith("broken.png") and bad["recognitions"] == []

    only_bad = cli("predict", shots / "broken.png", "--index", index)
    assert only_bad.exit_code == 2 and "broken.png" in only_bad.stderr


def test_glob_input(cli, built):
    gallery, index, _ = built
    result = cli("predict", f"{gallery}/*/001.jpg", "--index", index, "--json")
    assert json.loads(result.stdout)["count"] == 4


def test_below_rec_thresh_the_label_is_unknown(cli, built, tmp_path):
    gallery, index, _ = built
    from synth import write_rgb
    import numpy as np

    noise = write_rgb(tmp_path / "noise.jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    doc = json.loads(cli("predict", noise, "--index", index, "--json", "--rec-thresh", "0.999").stdout)
    top = doc["images"][0]["recognitions"][0]
    assert top["label"] == "unknown" and top["score"] < 0.999
    assert top["matches"]  # the nearest items are still reported
    table = cli("predict", sorted(gallery.rglob("*.jpg"))[0], "--index", index, "--rec-thresh", "1.01")
    assert "unknown" in table.stdout


def test_a_model_of_another_dim_or_hash_is_refused(cli, built, tmp_path):
    gallery, index, rec = built
    image = sorted(gallery.rglob("*.jpg"))[0]
    assert cli("predict", image, "--index", index, "--rec", rec).exit_code == 0
    other_dim = export_tiny_rec(tmp_path / "rec32", embedding_dim=32)
    result = cli("predict", image, "--index", index, "--rec", other_dim)
    assert result.exit_code == 2 and "32-d features but the index holds 64-d" in result.stderr
    other_hash = export_tiny_rec(tmp_path / "rec64b", embedding_dim=64, seed=5)
    result = cli("predict", image, "--index", index, "--rec", other_hash)
    assert result.exit_code == 2 and "not the model the index was built with" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_index_or_input_is_exit_2(cli, built, tmp_path):
    gallery, index, _ = built
    assert "index folder not found" in cli("predict", gallery, "--index", tmp_path / "none").stderr
    result = cli("predict", tmp_path / "nothing.jpg", "--index", index)
    assert result.exit_code == 2 and "no such image, folder or glob" in result.stderr


# ----------------------------------------------------------------------------- pure rules


def _rec(label, score, box):
    return Recognition(box=list(box), label=label, score=score, matches=[])


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)


def test_nms_suppresses_only_within_a_label():
    cola_a = _rec("cola", 0.9, [0, 0, 10, 10])
    cola_b = _rec("cola", 0.8, [1, 1, 11, 11])    # same object again: dropped
    fanta = _rec("fanta", 0.7, [1, 0, 11, 10])    # overlaps cola a lot but names another thing: kept
    cola_far = _rec("cola", 0.6, [50, 50, 60, 60])  # a second cola elsewhere: kept
    kept = nms_per_label([cola_b, fanta, cola_far, cola_a], iou_thresh=0.3)
    assert kept == [cola_a, fanta, cola_far]


def test_nms_drops_a_box_only_above_the_iou_threshold():
    a, b = _rec("x", 0.9, [0, 0, 10, 10]), _rec("x", 0.8, [5, 0, 15, 10])
    assert nms_per_label([a, b], iou_thresh=0.34) == [a, b]
    assert nms_per_label([a, b], iou_thresh=0.33) == [a]


def _det_rec(label, score, box):
    return Recognition(box=list(box), label=label, score=score, matches=[], source="detection", det_score=0.5)


def test_covered_share_is_the_intersection_over_the_smaller_box():
    assert covered_share([0, 0, 100, 100], [10, 10, 30, 30]) == 1.0  # inside
    assert covered_share([0, 0, 10, 10], [5, 0, 25, 10]) == pytest.approx(50 / 100)
    assert covered_share([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0


def test_a_loose_box_around_a_better_one_goes_whatever_its_label():
    rocket = _det_rec("rocket", 0.94, [147, 157, 215, 259])
    loose = _det_rec("cameraman", 0.62, [142, 117, 224, 260])  # the demo's scene_004: a second box around the rocket
    neighbour = _det_rec("cat", 0.7, [200, 157, 280, 259])  # side by side, overlapping the rocket by a fifth
    assert nms_per_label([loose, rocket, neighbour], 0.3, cover_thresh=0.6) == [rocket, neighbour]
    assert nms_per_label([loose, rocket, neighbour], 0.3, cover_thresh=1.0) == [rocket, neighbour, loose]  # rule off
    # the tight box inside a better-scored loose one goes too: the rule looks at scores, not sizes
    assert nms_per_label([_det_rec("x", 0.5, rocket.box), _det_rec("y", 0.9, loose.box)], 0.3, 0.6)[0].label == "y"


def test_the_cover_rule_stops_at_its_threshold_and_spares_the_whole_image():
    a, b = _det_rec("a", 0.9, [0, 0, 10, 10]), _det_rec("b", 0.8, [4, 0, 14, 10])  # 60% of the smaller box
    assert nms_per_label([a, b], 0.3, cover_thresh=0.6) == [a, b]
    assert nms_per_label([a, b], 0.3, cover_thresh=0.59) == [a]
    whole = _rec("c", 0.95, [0, 0, 100, 100])  # PaddleClas-style whole-image box covers every detection
    assert nms_per_label([whole, a], 0.3, cover_thresh=0.1) == [whole, a]


@dataclass
class _Det:
    box: list
    score: float


def test_whole_image_policy():
    dets = [_Det([10, 10, 40, 40], 0.9), _Det([-5, 20, 30, 200], 0.6)]
    whole = [0.0, 0.0, 100.0, 80.0]
    fallback = boxes_to_recognise(dets, 100, 80, "fallback")
    assert [b for b, _ in fallback] == [[10, 10, 40, 40], [0.0, 20, 30, 80.0]]  # clipped to the image
    assert boxes_to_recognise([], 100, 80, "fallback") == [(whole, None)]
    assert [b for b, _ in boxes_to_recognise(dets, 100, 80, "always")][-1] == whole
    assert len(boxes_to_recognise(dets, 100, 80, "always")) == 3
    assert boxes_to_recognise([], 100, 80, "off") == []
    assert [s for _, s in boxes_to_recognise(dets, 100, 80, "off")] == [0.9, 0.6]


def test_degenerate_boxes_do_not_count_as_detections():
    assert boxes_to_recognise([_Det([200, 200, 300, 300], 0.9)], 100, 80, "fallback") == [([0.0, 0.0, 100.0, 80.0], None)]


def test_unknown_policy_is_refused():
    from shitu_cli.errors import BadInput

    with pytest.raises(BadInput, match="whole-image policy"):
        boxes_to_recognise([], 10, 10, "sometimes")


def test_train_rec_then_build_index_then_predict(cli, tmp_path):
    """The whole recognition workflow on drawn classes: a trained model's export indexes and predicts."""
    from synth import draw_object, write_rgb
    import numpy as np

    data = tmp_path / "products"
    names = make_class_tree(data, n_classes=6, per_class=6, size=64, seed=3)
    trained = cli("train-rec", data, "-o", tmp_path / "run", "--recipe", "tiny", "--epochs", "4", "--num-workers", "0", "--json")
    assert trained.exit_code == 0, trained.stderr
    export = tmp_path / "run" / "export"
    assert cli("build-index", data, "-o", tmp_path / "index", "--rec", export).exit_code == 0
    image = sorted((data / names[0]).glob("*.jpg"))[0]
    doc = json.loads(cli("predict", image, "--index", tmp_path / "index", "--json").stdout)
    top = doc["images"][0]["recognitions"][0]
    assert top["label"] == names[0] and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["matches"][0]["gallery_path"] == image.resolve().as_posix()
    fresh = write_rgb(tmp_path / "fresh.jpg", draw_object(names[1], 64, np.random.default_rng(99)))
    doc = json.loads(cli("predict", fresh, "--index", tmp_path / "index", "--json").stdout)
    assert doc["images"][0]["recognitions"][0]["matches"]  # a new photo gets ranked gallery labels


def test_predict_with_a_detector_recognises_boxes_and_the_whole_image(cli, built, tmp_path):
    """A 1-epoch PicoDet from `shitu train-det` feeds boxes to the pipeline; the policy decides the whole image."""
    from synth_scenes import make_coco_scenes

    gallery, index, _ = built
    scenes = tmp_path / "scenes"
    make_coco_scenes(scenes, n_train=12, n_val=4, n_classes=2, seed=3)
    trained = cli("train-det", scenes, "-o", tmp_path / "det", "--recipe", "tiny", "--epochs", "1", "--batch-size", "4",
                  "--merge-classes", "--json")
    assert trained.exit_code == 0, trained.stderr
    image = sorted(gallery.rglob("*.jpg"))[0]
    det = tmp_path / "det" / "export"
    always = json.loads(cli("predict", image, "--index", index, "--det", det, "--det-thresh", "0.0",
                            "--whole-image", "always", "--json").stdout)["images"][0]
    sources = [r["source"] for r in always["recognitions"]]
    assert always["whole_image_policy"] == "always" and "whole_image" in sources
    assert all(r["det_score"] is not None for r in always["recognitions"] if r["source"] == "detection")
    off = json.loads(cli("predict", image, "--index", index, "--det", det, "--det-thresh", "1.01",
                         "--whole-image", "off", "--json").stdout)["images"][0]
    assert off["recognitions"] == []  # no box clears the threshold and the whole image is off

    # build-index --det indexes each gallery image's main-object crop and records its box
    built_det = cli("build-index", gallery, "-o", tmp_path / "det_index", "--rec", built[2], "--det", det,
                    "--det-thresh", "0.0", "--json")
    assert built_det.exit_code == 0, built_det.stderr
    from shitu_cli.index.store import load_index

    items = load_index(tmp_path / "det_index").items.values()
    assert items and all(item.box is not None and item.box[2] > item.box[0] for item in items)


def test_save_vis_writes_a_drawn_copy_of_each_image(cli, built, tmp_path):
    from shitu_cli.data.images import read_image

    gallery, index, _ = built
    images = sorted(gallery.rglob("*.jpg"))[:3]
    folder = tmp_path / "queries"
    for i, image in enumerate(images):
        (folder / f"q{i}.jpg").parent.mkdir(exist_ok=True)
        (folder / f"q{i}.jpg").write_bytes(image.read_bytes())
    result = cli("predict", folder, "--index", index, "--save-vis", tmp_path / "vis")
    assert result.exit_code == 0, result.stderr
    drawn = sorted((tmp_path / "vis").iterdir())
    assert [p.name for p in drawn] == ["q0.jpg", "q1.jpg", "q2.jpg"]
    assert (read_image(drawn[0]).astype(int) - read_image(folder / "q0.jpg")).__abs__().max() > 100  # a box was drawn


def test_eval_list_counts_right_wrong_and_unknown(cli, built, tmp_path):
    gallery, index, _ = built
    images = sorted(gallery.rglob("*.jpg"))
    lines = [f"{p.relative_to(gallery).as_posix()}\t{p.parent.name}" for p in images[:5]]
    lines.append(f"{images[5].relative_to(gallery).as_posix()}\tzebra")  # a label the gallery does not have
    (gallery / "eval_list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = cli("predict", "--index", index, "--eval", gallery / "eval_list.txt", "--json")

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["queries"] == 6
    assert doc["counts"]["correct"] == 5 and doc["counts"]["false accept"] == 1
    assert doc["accuracy"] == pytest.approx(5 / 6, abs=1e-3)


def test_missing_eval_list_is_exit_2(cli, built, tmp_path):
    _, index, _ = built
    result = cli("predict", "--index", index, "--eval", tmp_path / "nope.txt")
    assert result.exit_code == 2 and "nope.txt" in result.stderr
    nothing = cli("predict", "--index", index)
    assert nothing.exit_code == 2 and "nothing to predict" in nothing.stderr


def test_configured_default_index_is_used_without_flag(cli, built, monkeypatch):
    gallery, index, _ = built
    monkeypatch.setenv("SHITU_INDEX", str(index))
    image = sorted(gallery.rglob("*.jpg"))[0]
    result = cli("predict", image, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["index"] == str(index.resolve())


def test_model_flag_runs_a_classifier_instead_of_the_index(cli, tmp_path):
    import paddle

    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest
    from shitu_cli.models.ppcls import build_arch

    net = build_arch({"name": "PPLCNet_x0_25", "class_num": 3})

    class Probabilities(paddle.nn.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return paddle.nn.functional.softmax(self.inner(x))

    manifest = ModelManifest(task="cls", arch="PPLCNet_x0_25", input_size=(32, 32), model_file="", params_file="",
                             labels=["кот", "cup", "rocket"])
    model = export_layer(Probabilities(net), tmp_path / "cls", [[None, 3, 32, 32]], manifest)
    make_class_tree(tmp_path / "imgs", n_classes=2, per_class=2, size=48)

    result = cli("predict", tmp_path / "imgs", "--model", model, "--topk", "2", "--json")

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["count"] == 4
    for image in doc["images"]:
        assert len(image["top"]) == 2 and image["top"][0]["label"] in {"кот", "cup", "rocket"}


def test_the_python_api_with_defaults_gives_what_predict_gives(cli, tmp_path):
    """Pipeline(...) with no options equals `shitu predict --json` with no options: one home for the defaults.
    scene_011's two objects score 0.39-0.46 on the demo detector: under the old API default (0.5) both were lost."""
    from shitu_cli import demo
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.pipeline import Pipeline

    index_dir, models, _ = demo.ensure_demo_index(tmp_path)
    image = demo.QUERIES / "images" / "scene_011.jpg"
    api = Pipeline(index_dir, detector=Detector(models.det)).predict_file(image)
    result = cli("predict", image, "--index", index_dir, "--det", models.det, "--json")
    assert result.exit_code == 0, result.stderr
    (cli_image,) = json.loads(result.stdout)["images"]
    assert [r["label"] for r in cli_image["recognitions"]] == [r.label for r in api.recognitions]
    assert len(api.recognitions) == 2 and {r.source for r in api.recognitions} == {"detection"}
    for ours, theirs in zip(api.recognitions, cli_image["recognitions"]):
        assert theirs["box"] == pytest.approx(ours.box) and theirs["score"] == pytest.approx(ours.score)
        assert [m["label"] for m in theirs["matches"]] == [m.label for m in ours.matches]


def test_a_folder_streams_in_groups_and_gives_what_one_file_at_a_time_gives(built, tmp_path):
    """Groups of 2 images (batch 2, no detector): reads run ahead, crops are batched across images, and a broken
    file in the middle keeps its place."""
    from shitu_cli.infer.pipeline import Pipeline

    gallery, index, _ = built
    files = sorted(gallery.rglob("*.jpg"))[:4]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    paths = [files[0], files[1], broken, files[2], files[3]]
    pipeline = Pipeline(index, batch_size=2)
    assert pipeline.images_per_group() == 2

    streamed = pipeline.predict_files(paths)

    assert [r.path for r in streamed] == [p.as_posix() for p in paths]
    assert streamed[2].error and streamed[2].recognitions == []
    for result, path in zip(streamed, paths):
        alone = pipeline.predict_file(path)
        assert [(r.label, r.box) for r in result.recognitions] == [(r.label, r.box) for r in alone.recognitions]
        assert [r.score for r in result.recognitions] == pytest.approx([r.score for r in alone.recognitions], abs=1e-5)
