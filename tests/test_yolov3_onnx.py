"""The ONNX path gives Paddle's outputs for nets with leaky ReLU (YOLOv3's neck and head): paddle2onnx 2.1.0
misreads a Paddle 3 program's negative_slope, and shitu puts it back (models/onnx_repair.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synth_scenes import make_coco_scenes


@pytest.fixture(scope="module")
def leaky_model(tmp_path_factory) -> Path:
    """A tiny conv net with two leaky ReLUs of different slopes, exported like a shitu rec model."""
    import paddle

    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest, Preprocess

    paddle.seed(3)

    class Leaky(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn = paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8)
            self.conv2 = paddle.nn.Conv2D(8, 8, 3, stride=2, padding=1)

        def forward(self, x):
            x = paddle.nn.functional.leaky_relu(self.bn(self.conv1(x)), 0.1)
            x = paddle.nn.functional.leaky_relu(self.conv2(x), 0.3)
            return paddle.flatten(x, 1)

    net = Leaky()
    net.eval()
    manifest = ModelManifest(task="rec", arch="leaky-test", input_size=(16, 16), model_file="", params_file="",
                             preprocess=Preprocess(), embedding_dim=8 * 8 * 8)
    return export_layer(net, tmp_path_factory.mktemp("leaky") / "model", [[None, 3, 16, 16]], manifest)


def _slopes(path: Path) -> list[float]:
    import onnx

    return [a.f for node in onnx.load(str(path)).graph.node if node.op_type == "LeakyRelu" for a in node.attribute]


def test_onnx_keeps_the_programs_leaky_relu_slopes_and_a_stale_cache_is_converted_again(leaky_model):
    import onnx

    from shitu_cli.infer.onnx_convert import ONNX_STAMP, onnx_cache_dir
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor, onnx_model
    from shitu_cli.models.manifest import read_model_manifest

    manifest = read_model_manifest(leaky_model)
    path = onnx_model(leaky_model, manifest)
    assert np.allclose(_slopes(path), [0.1, 0.3])
    batch = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    paddle_out = build_predictor(leaky_model, PredictorOptions(backend="paddle"))
    onnx_out = build_predictor(leaky_model, PredictorOptions(backend="onnxruntime"))
    want, got = paddle_out.run(batch)[0], onnx_out.run(batch)[0]
    assert (want < 0).mean() > 0.2  # the negative side, where the slope matters, is exercised
    assert np.abs(want - got).max() < 1e-4 * max(1.0, np.abs(want).max())

    # a conversion cached by an earlier shitu (no repairs in its stamp, paddle2onnx's slopes) is made again
    stamp = onnx_cache_dir(leaky_model, manifest) / ONNX_STAMP
    old = json.loads(stamp.read_text(encoding="utf-8"))
    del old["repairs"]
    stamp.write_text(json.dumps(old), encoding="utf-8")
    broken = onnx.load(str(path))
    for node in broken.graph.node:
        if node.op_type == "LeakyRelu":
            node.attribute[0].f = 0.0
    onnx.save(broken, str(path))
    assert np.allclose(_slopes(onnx_model(leaky_model, manifest)), [0.1, 0.3])


@pytest.mark.slow  # trains a narrowed YOLOv3 for an epoch (~1 min on 2 cores)
def test_a_trained_yolov3s_onnx_boxes_are_paddles(tmp_path):
    from typer.testing import CliRunner

    from shitu_cli.artifacts import dump_yaml
    from shitu_cli.cli import app
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.predictor import PredictorOptions
    from shitu_cli.train.det_config import load_recipe

    root = tmp_path / "scenes"
    make_coco_scenes(root, n_train=8, n_val=4, n_classes=3, seed=5)
    _, recipe = load_recipe("yolov3-mobilenetv1")
    recipe["MobileNet"] = {**recipe["MobileNet"], "scale": 0.25}
    recipe["BBoxPostProcess"]["nms"]["score_threshold"] = 0.001
    recipe["shitu"] = {**recipe["shitu"], "warmup_steps": 2, "multi_scale_steps": 0, "ema": False}
    (tmp_path / "yolov3-test.yml").write_text(dump_yaml(recipe), encoding="utf-8")
    result = CliRunner().invoke(app, ["train-det", str(root), "-o", str(tmp_path / "run"), "--recipe",
                                      str(tmp_path / "yolov3-test.yml"), "--epochs", "1", "--batch-size", "4",
                                      "--input-size", "160", "--mixup-epochs", "1", "--json"],
                                     catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    export = tmp_path / "run" / "export"
    paddle, onnx = (Detector(export, PredictorOptions(backend=name)) for name in ("paddle", "onnxruntime"))
    for path in sorted((root / "images").glob("val_*.jpg"))[:2]:
        rgb = read_image(path)
        want, got = paddle.detect(rgb, 0.001, 10), onnx.detect(rgb, 0.001, 10)
        assert len(want) == len(got) == 10
        for a, b in zip(want, got):
            assert a.label == b.label and abs(a.score - b.score) < 1e-3 and np.abs(np.subtract(a.box, b.box)).max() < 0.05


def test_the_export_check_pairs_a_detectors_tied_boxes_instead_of_ranking_them():
    from shitu_cli.models.convert import _matched_difference

    source = np.array([[0, 0.50010, 10, 10, 50, 50], [0, 0.50008, 60, 60, 90, 90], [1, 0.4, 5, 5, 20, 20]])
    export = source[[1, 0, 2]].copy()  # the two tied boxes in the other order, as another runtime may rank them
    export[0, 1], export[1, 1] = 0.50011, 0.50007
    assert _matched_difference(source, export) < 1e-3
    export[2, 0] = 2  # a box of another class has no partner
    assert _matched_difference(source, export) == float("inf")
