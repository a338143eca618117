"""`shitu export`: ONNX / OpenVINO model folders checked against the source; nothing written into the source."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from shitu_cli.infer.predictor import installed_backends

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS = ROOT / "assets" / "demo" / "models"


@pytest.fixture
def models(tmp_path):
    """Copies of the demo models, so a test can see that nothing is written into the source."""
    for name in ("rec", "det"):
        shutil.copytree(DEMO_MODELS / name, tmp_path / name)
    return tmp_path


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.skipif("onnxruntime" not in installed_backends(), reason="onnxruntime is not installed")
def test_onnx_export_of_a_rec_model_is_a_model_folder_an_index_of_the_source_accepts(cli, models, tmp_path):
    from shitu_cli.models.manifest import read_model_manifest

    source = models / "rec"
    before = listing(source)
    result = cli("export", source, "--format", "onnx", "-o", tmp_path / "rec-onnx", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == ["model.onnx"] and report["samples"] == 4 and report["backend"] == "onnxruntime"
    assert 0 <= report["max_abs_diff"] < 1e-3
    assert listing(source) == before  # the conversion cache lives under SHITU_HOME now
    assert list((Path(os.environ["SHITU_HOME"]) / "onnx").glob("*/model.onnx"))
    exported = read_model_manifest(tmp_path / "rec-onnx")
    assert exported.model_file == "model.onnx" and exported.method == "export-onnx"
    assert exported.parent_model_hash == read_model_manifest(source).model_hash
    assert sorted(p.name for p in (tmp_path / "rec-onnx").iterdir()) == ["model.onnx", "recipe.yaml", "shitu.yaml"]

    gallery = tmp_path / "gallery"
    shutil.copytree(ROOT / "assets" / "demo" / "gallery", gallery)
    assert cli("build-index", gallery, "-o", tmp_path / "index", "--rec", source).exit_code == 0
    cat = sorted((gallery / "cat").iterdir())[0]
    predicted = cli("predict", cat, "--index", tmp_path / "index", "--rec", tmp_path / "rec-onnx", "--json")
    assert predicted.exit_code == 0, predicted.stderr
    top = json.loads(predicted.stdout)["images"][0]["recognitions"][0]
    assert top["label"] == "cat" and top["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.skipif("openvino" not in installed_backends(), reason="openvino is not installed")
def test_openvino_export_runs_with_openvino_and_matches(cli, models, tmp_path):
    import numpy as np

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    result = cli("export", models / "rec", "--format", "openvino", "-o", tmp_path / "rec-ov", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == ["model.xml", "model.bin"] and report["max_abs_diff"] < 1e-3
    x = np.random.default_rng(0).normal(size=(2, 3, 96, 96)).astype(np.float32)
    got = build_predictor(tmp_path / "rec-ov", PredictorOptions(backend="openvino"), task="rec").run(x)[0]
    want = build_predictor(models / "rec", PredictorOptions(backend="paddle"), task="rec").run(x)[0]
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.skipif("onnxruntime" not in installed_backends(), reason="onnxruntime is not installed")
def test_a_detector_exports_with_its_preprocessing_and_finds_the_same_boxes(cli, models, tmp_path):
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.detector import Detector
    from shitu_cli.infer.predictor import PredictorOptions

    result = cli("export", models / "det", "--format", "onnx", "-o", tmp_path / "det-onnx")
    assert result.exit_code == 0, result.stderr
    assert "max difference from the source on 4 sample image(s)" in result.stdout
    assert (tmp_path / "det-onnx" / "infer_cfg.yml").is_file()
    scene = read_image(ROOT / "assets" / "demo" / "queries" / "images" / "scene_007.jpg")
    found = Detector(tmp_path / "det-onnx").detect(scene)
    expected = Detector(models / "det", PredictorOptions(backend="paddle")).detect(scene)
    assert len(found) == len(expected) >= 1
    for a, b in zip(found, expected):
        assert max(abs(p - q) for p, q in zip(a.box, b.box)) < 0.5


@pytest.mark.parametrize("args, words", [
    (["--format", "paddle"], "cannot turn it back into a legacy .pdmodel"),
    (["--format", "onnx", "--int8"], "--int8 needs a quantised model"),
    (["--format", "tflite"], "unknown format 'tflite'"),
])
def test_refusals_name_the_problem(cli, models, tmp_path, args, words):
    result = cli("export", models / "rec", *args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and words in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_output_is_never_the_source_or_a_full_folder(cli, models, tmp_path):
    inside = cli("export", models / "rec", "--format", "onnx", "-o", models / "rec" / "onnx")
    assert inside.exit_code == 2 and "must not be the model's folder or inside it" in inside.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine", encoding="utf-8")
    taken = cli("export", models / "rec", "--format", "onnx", "-o", full)
    assert taken.exit_code == 2 and "not an empty folder" in taken.stderr
    assert listing(full) == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.skipif(not {"onnxruntime", "openvino"} <= set(installed_backends()), reason="needs onnxruntime and openvino")
def test_an_int8_onnx_model_exports_with_int8_and_only_with_it(cli, models, tmp_path):
    """An ONNX INT8 model (made here by the quantiser `shitu compress --onnx-int8` uses) becomes OpenVINO IR."""
    import dataclasses

    import numpy as np

    from shitu_cli.compress.onnx_int8 import quantize_onnx
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.predictor import onnx_model
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.models.manifest import read_model_manifest, write_model_manifest

    source = models / "rec"
    manifest = read_model_manifest(source)
    photos = sorted((ROOT / "assets" / "demo" / "gallery").rglob("*.jpg"))
    batch = preprocess_batch([read_image(p) for p in photos], manifest.preprocess, manifest.input_size)
    int8_dir = tmp_path / "rec-int8"
    quantize_onnx(onnx_model(source, manifest), int8_dir / "model.onnx",
                  lambda: ({manifest.input_names[0]: batch[i:i + 6]} for i in range(0, len(batch), 6)))
    write_model_manifest(int8_dir, dataclasses.replace(manifest, model_file="model.onnx", params_file="model.onnx",
                                                       precision="int8", method="onnx-int8-minmax",
                                                       parent_model_hash=manifest.model_hash))

    refused = cli("export", int8_dir, "--format", "openvino", "-o", tmp_path / "no")
    assert refused.exit_code == 2 and "pass --int8" in refused.stderr
    result = cli("export", int8_dir, "--format", "openvino", "--int8", "-o", tmp_path / "rec-int8-ov", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["precision"] == "int8" and report["backend"] == "openvino"
    assert 0 < report["max_abs_diff"] < report["scale"]  # reported: two runtimes' INT8 kernels round differently
    assert any("INT8 kernels of openvino round unlike" in note for note in report["notes"])
    exported = read_model_manifest(tmp_path / "rec-int8-ov")
    assert exported.precision == "int8" and exported.method == "onnx-int8-minmax+export-openvino"
    xml = (tmp_path / "rec-int8-ov" / "model.xml").read_text(encoding="utf-8")
    assert "FakeQuantize" in xml or "i8" in xml  # the quantisation survived the conversion
    assert np.isfinite(report["max_abs_diff"])
    same = json.loads(cli("export", int8_dir, "--format", "onnx", "--int8", "-o", tmp_path / "rec-int8-onnx", "--json").stdout)
    assert same["max_abs_diff"] == 0.0 and same["files"] == ["model.onnx"]  # ONNX INT8 stays as it is
