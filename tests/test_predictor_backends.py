"""One predictor factory, three backends: same outputs, a cached ONNX conversion, clear refusals, and "auto"."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.infer.predictor import PredictorOptions, build_predictor, installed_backends

OTHER_BACKENDS = [b for b in installed_backends() if b != "paddle"]


def export_tiny(out_dir, task: str, size: int = 32, seed: int = 0):
    """A tiny untrained PP-LCNet exported the way training exports it (cls: 4 classes, rec: 32-d)."""
    import paddle

    from shitu_cli.models.export import export_layer
    from shitu_cli.models.manifest import ModelManifest
    from shitu_cli.models.ppcls import build_arch

    paddle.seed(seed)
    if task == "cls":
        layer, extra = build_arch({"name": "PPLCNet_x0_25", "class_num": 4}), {"labels": list("abcd")}
    else:
        rec = build_arch({
            "name": "RecModel", "Backbone": {"name": "PPLCNet_x0_25", "pretrained": False},
            "BackboneStopLayer": {"name": "flatten"}, "Neck": {"name": "FC", "embedding_size": 1280, "class_num": 32},
        })

        class Features(paddle.nn.Layer):  # RecModel returns a dict; the predictor hands back the embedding
            def __init__(self):
                super().__init__()
                self.rec = rec

            def forward(self, x):
                return self.rec(x)["features"]

        layer, extra = Features(), {"embedding_dim": 32}
    manifest = ModelManifest(task=task, arch="PPLCNet_x0_25", input_size=(size, size), model_file="", params_file="", **extra)
    return export_layer(layer, out_dir, [[None, 3, size, size]], manifest)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {task: export_tiny(root / task, task) for task in ("cls", "rec")}


def _batch(n=3, size=32, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, 3, size, size)).astype("float32")


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("task", ["cls", "rec"])
def test_backend_matches_paddle(tiny_models, backend, task):
    x = _batch()
    reference = build_predictor(tiny_models[task], task=task).run(x)
    predictor = build_predictor(tiny_models[task], PredictorOptions(backend=backend, threads=2), task=task)
    outputs = predictor.run(x)
    assert predictor.backend == backend
    assert len(outputs) == len(reference) == 1
    assert outputs[0].shape == reference[0].shape
    scale = float(np.abs(reference[0]).max()) or 1.0
    np.testing.assert_allclose(outputs[0], reference[0], atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.skipif(not OTHER_BACKENDS, reason="no ONNX backend installed")
def test_onnx_conversion_is_cached_by_model_hash(tmp_path):
    from shitu_cli.infer.predictor import onnx_cache_dir
    from shitu_cli.models.manifest import read_model_manifest

    model_dir = export_tiny(tmp_path / "cls", "cls")
    cache = lambda: onnx_cache_dir(model_dir, read_model_manifest(model_dir))  # noqa: E731
    backend = OTHER_BACKENDS[0]
    build_predictor(model_dir, PredictorOptions(backend=backend))
    onnx_file = cache() / "model.onnx"
    stamp = json.loads((cache() / "source.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in model_dir.iterdir()) == ["inference.json", "inference.pdiparams", "shitu.yaml"]
    first_mtime = onnx_file.stat().st_mtime_ns
    build_predictor(model_dir, PredictorOptions(backend=backend))
    assert onnx_file.stat().st_mtime_ns == first_mtime  # reused, not converted again

    export_tiny(model_dir, "cls", seed=1)  # new weights, new hash: the old conversion must not be used
    x = _batch()
    fresh = build_predictor(model_dir, PredictorOptions(backend=backend)).run(x)[0]
    assert json.loads((cache() / "source.json").read_text(encoding="utf-8"))["model_hash"] != stamp["model_hash"]
    np.testing.assert_allclose(fresh, build_predictor(model_dir).run(x)[0], atol=1e-4)

    # same weights, another program file (a re-export): the conversion must be made again too
    converted = cache()
    program = model_dir / "inference.json"
    program.write_text(program.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    build_predictor(model_dir, PredictorOptions(backend=backend))
    assert cache() != converted and (cache() / "model.onnx").is_file() and (converted / "model.onnx").is_file()


@pytest.mark.skipif(not OTHER_BACKENDS, reason="no ONNX backend installed")
def test_unconvertible_model_is_work_failed_with_the_reason(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["cls"], broken, ignore=shutil.ignore_patterns(".onnx"))
    (broken / "inference.json").write_text('{"not": "a program"}', encoding="utf-8")
    for backend in ["paddle", *OTHER_BACKENDS]:
        with pytest.raises(WorkFailed) as caught:
            build_predictor(broken, PredictorOptions(backend=backend))
        assert "broken" in caught.value.one_line()
        assert "Invalid model file" in caught.value.one_line()


def test_refusals(tiny_models):
    with pytest.raises(BadInput, match="unknown backend"):
        build_predictor(tiny_models["cls"], PredictorOptions(backend="tensorrt"))
    with pytest.raises(WorkFailed, match="int8 needs a quantized model"):
        build_predictor(tiny_models["cls"], PredictorOptions(precision="int8"))
    with pytest.raises(BadInput, match="cls model, but a rec model"):
        build_predictor(tiny_models["cls"], task="rec")
    if "onnxruntime" in OTHER_BACKENDS:
        with pytest.raises(WorkFailed, match="no bf16 mode"):
            build_predictor(tiny_models["cls"], PredictorOptions(backend="onnxruntime", precision="bf16"))


def test_auto_is_paddle_until_a_benchmark_recorded_something(tiny_models):
    from shitu_cli.bench.record import BackendTiming, update_fastest
    from shitu_cli.models.manifest import read_model_manifest

    assert build_predictor(tiny_models["cls"], PredictorOptions(backend="auto")).backend == "paddle"
    if not OTHER_BACKENDS:
        return
    model_hash = read_model_manifest(tiny_models["cls"]).model_hash
    other = OTHER_BACKENDS[0]
    update_fastest([BackendTiming(model_hash, "paddle", 2.0, 1, True), BackendTiming(model_hash, other, 1.0, 1, False)])
    assert build_predictor(tiny_models["cls"], PredictorOptions(backend="auto")).backend == other
    # The latest measurement of a backend replaces the older one.
    update_fastest([BackendTiming(model_hash, other, 3.0, 1, False)])
    assert build_predictor(tiny_models["cls"], PredictorOptions(backend="auto")).backend == "paddle"
    # Another model's record says nothing about this one.
    assert build_predictor(tiny_models["rec"], PredictorOptions(backend="auto"), task="rec").backend == "paddle"


@pytest.mark.skipif(not OTHER_BACKENDS, reason="no ONNX backend installed")
def test_a_model_dir_holding_onnx_runs_without_conversion(tiny_models, tmp_path):
    """An ONNX model with a shitu.yaml (e.g. an ONNX int8 model) goes straight to onnxruntime/openvino."""
    from shitu_cli.artifacts import read_yaml, write_yaml

    source = tiny_models["cls"]
    from shitu_cli.infer.predictor import onnx_cache_dir
    from shitu_cli.models.manifest import read_model_manifest

    build_predictor(source, PredictorOptions(backend=OTHER_BACKENDS[0]))  # converts into the shitu cache
    onnx_dir = tmp_path / "onnx_model"
    onnx_dir.mkdir()
    shutil.copy(onnx_cache_dir(source, read_model_manifest(source)) / "model.onnx", onnx_dir / "model.onnx")
    (onnx_dir / "model.params").write_bytes(b"")
    manifest = read_yaml(source / "shitu.yaml")
    write_yaml(onnx_dir / "shitu.yaml", {**manifest, "model_file": "model.onnx", "params_file": "model.params"})
    x = _batch()
    expected = build_predictor(source).run(x)[0]
    for backend in OTHER_BACKENDS:
        np.testing.assert_allclose(build_predictor(onnx_dir, PredictorOptions(backend=backend)).run(x)[0], expected, atol=1e-4)
    assert not (onnx_dir / ".onnx").exists()
    with pytest.raises(WorkFailed, match="cannot run an ONNX model"):
        build_predictor(onnx_dir)
