"""`shitu train-rec --pretrained model.onnx`: an ONNX CNN made here is converted by x2paddle, checked
against onnxruntime, fine-tuned with CE + triplet, exported, indexed and predicted; bad files are refused
by name. Also `--pretrained PPLCNet_x0_25` (an official model name) through a loopback model server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shitu_cli.artifacts import read_yaml
from synth import make_class_tree

pytest.importorskip("x2paddle")

TINY = ("--recipe", "tiny", "--input-size", "32", "--embedding-size", "16", "--num-workers", "0")
HALF = ("--pretrained-mean", "0.5,0.5,0.5", "--pretrained-std", "0.5,0.5,0.5")


# ---------------------------------------------------------------- tiny ONNX models, built here


def tiny_cnn(path: Path, outputs=("embedding", "logits"), channels: int = 3, seed: int = 0, names: dict | None = None,
             kernel_shape: bool = True) -> Path:
    """conv(s2) -> relu -> conv -> relu -> global pool -> flatten = `embedding` [N, 16]; gemm -> `logits` [N, 5]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = {"image": "image", "embedding": "embedding", "logits": "logits", "conv1": "conv1", **(names or {})}
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.normal(0, 0.3, (8, channels, 3, 3)), "b1": rng.normal(0, 0.1, 8),
               "w2": rng.normal(0, 0.2, (16, 8, 3, 3)), "b2": rng.normal(0, 0.1, 16),
               "wf": rng.normal(0, 0.3, (5, 16)), "bf": rng.normal(0, 0.1, 5)}
    kernel = {"kernel_shape": [3, 3]} if kernel_shape else {}
    nodes = [helper.make_node("Conv", [n["image"], "w1", "b1"], ["c1"], name=n["conv1"], pads=[1, 1, 1, 1],
                              strides=[2, 2], **kernel),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], **kernel),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], [n["embedding"]], axis=1),
             helper.make_node("Gemm", [n["embedding"], "wf", "bf"], [n["logits"]], transB=1)]
    shapes = {"embedding": [None, 16], "logits": [None, 5], "second": [None, 16]}
    if "second" in outputs:
        nodes.append(helper.make_node("Identity", [n["embedding"]], ["second"]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(n["image"], TensorProto.FLOAT, ["N", channels, 32, 32])],
        [helper.make_tensor_value_info(n.get(o, o), TensorProto.FLOAT, ["N" if d is None else d for d in shapes[o]])
         for o in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One $SHITU_HOME for the module, so x2paddle converts each tiny model once."""
    return tmp_path_factory.mktemp("shitu-home")


@pytest.fixture
def home(shared_home, monkeypatch):
    monkeypatch.setenv("SHITU_HOME", str(shared_home))
    return shared_home


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return tiny_cnn(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """Six drawn classes split by split-dataset: two held out for gallery/query."""
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    root = tmp_path_factory.mktemp("rec") / "products"
    make_class_tree(root, n_classes=6, per_class=8, size=32, seed=3)
    done = CliRunner().invoke(app, ["split-dataset", str(root), "--format", "rec", "--val", "0.34", "--test", "0.3"])
    assert done.exit_code == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def fine_tuned(lists, onnx_file, shared_home, tmp_path_factory):
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    run = tmp_path_factory.mktemp("runs") / "onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHITU_HOME", str(shared_home))
        result = CliRunner().invoke(app, ["train-rec", str(lists), "-o", str(run), *TINY, "--epochs", "2", "--lr", "0.05",
                                          "--pretrained", str(onnx_file), *HALF, "--json"])
    assert result.exit_code == 0, result.stderr
    return run, json.loads(result.stdout)


# ---------------------------------------------------------------- conversion


def test_converted_layer_matches_onnxruntime_and_the_conversion_is_cached(onnx_file, home):
    from shitu_cli.models.onnx_import import import_onnx, net_outputs, onnxruntime_outputs

    first = import_onnx(onnx_file)
    code = first.cache_dir / "x2paddle_code.py"
    written = code.stat().st_mtime_ns
    images = np.random.default_rng(5).normal(0, 1, (3, 3, 32, 32)).astype("float32")
    for want, got in zip(onnxruntime_outputs(onnx_file, "image", images), net_outputs(first.net, images)):
        assert want.shape == got.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert max(first.max_abs_diff.values()) < 1e-5 and set(first.max_abs_diff) == {"embedding", "logits"}
    again = import_onnx(onnx_file)
    assert again.cache_dir == first.cache_dir and code.stat().st_mtime_ns == written  # not converted twice


def test_backbone_renormalises_imagenet_input_to_the_onnx_models_own(onnx_file, home):
    """The shitu pipeline feeds ImageNet-normalised pixels; the ONNX model here wants (p - 0.5) / 0.5."""
    import paddle

    from shitu_cli.models.manifest import IMAGENET_MEAN, IMAGENET_STD
    from shitu_cli.models.onnx_import import onnxruntime_outputs
    from shitu_cli.train.rec_model import build_rec_model
    from shitu_cli.train.rec_settings import resolve_settings

    settings = resolve_settings("tiny", {"input_size": 32, "embedding_size": 16, "pretrained_mean": [0.5] * 3,
                                         "pretrained_std": [0.5] * 3})
    model = build_rec_model(settings, 4, onnx_file)
    pixels = np.random.default_rng(1).uniform(0, 1, (2, 3, 32, 32)).astype("float32")
    imagenet = (pixels - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
    model.eval()
    with paddle.no_grad():
        got = model.backbone(paddle.to_tensor(imagenet.astype("float32"))).numpy()
    want = onnxruntime_outputs(onnx_file, "image", ((pixels - 0.5) / 0.5).astype("float32"))[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_names_that_are_not_identifiers_are_renamed_before_x2paddle_writes_code(tmp_path, home):
    from shitu_cli.errors import BadInput
    from shitu_cli.models.onnx_import import check_generated_code, import_onnx

    hostile = {"image": "in put", "embedding": "emb=__import__('os')", "conv1": "c;import os"}
    path = tiny_cnn(tmp_path / "names.onnx", names=hostile, seed=2)
    imported = import_onnx(path)
    assert imported.image.output_names == ["emb=__import__('os')", "logits"]  # reported as the file names them
    code = (imported.cache_dir / "x2paddle_code.py").read_text(encoding="utf-8")
    assert "'os'" not in code and ";import" not in code and "in put" not in code  # only identifiers left
    check_generated_code(code, path)
    assert max(imported.max_abs_diff.values()) < 1e-5
    for bad in ("import os\n", "x = eval('1')\n", "y = ().__class__\n", "from subprocess import run\n"):
        with pytest.raises(BadInput, match="refusing to import it"):
            check_generated_code(bad, path)


# ---------------------------------------------------------------- train-rec end to end


def test_fine_tuning_changes_the_converted_weights_and_records_the_source(fine_tuned, onnx_file):
    import onnx
    from onnx import numpy_helper

    from shitu_cli.artifacts import sha256_file
    from shitu_cli.models.legacy import load_weights

    run, summary = fine_tuned
    info = summary["pretrained"]
    assert info["format"] == "onnx" and info["output"] == "embedding" and info["sha256"] == sha256_file(onnx_file)
    assert max(info["onnxruntime_max_abs_diff"].values()) < 1e-5 and info["projection"] is False
    assert summary["export_normalised_diff"] < 1e-4  # the export is checked against the trained layer
    initial = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_file)).graph.initializer}
    trained = load_weights(run / "checkpoints" / "last.pdparams")
    first_conv = trained["backbone.net.conv0.weight"]
    assert first_conv.shape == initial["w1"].shape
    assert np.abs(first_conv - initial["w1"]).max() > 1e-4  # training moved the converted weights
    recipe = read_yaml(run / "recipe.yaml")
    assert recipe["options"]["pretrained"] == onnx_file.resolve().as_posix()
    assert recipe["options"]["pretrained_mean"] == [0.5, 0.5, 0.5]
    assert recipe["inputs"]["pretrained"]["sha256"] == info["sha256"]
    manifest = read_yaml(run / "export" / "shitu.yaml")
    assert manifest["arch"] == "RecModel/onnx" and manifest["embedding_dim"] == 16
    assert summary["backbone"] == "onnx:tiny.onnx"
    assert manifest["extra"]["pretrained_onnx"]["sha256"] == info["sha256"]
    assert manifest["extra"]["pretrained_onnx"]["onnx_input_std"] == [0.5, 0.5, 0.5]


def test_the_export_indexes_and_predicts_like_any_rec_model(fine_tuned, lists, cli, tmp_path):
    run, _ = fine_tuned
    gallery = lists / "gallery_list.txt"
    index = cli("build-index", gallery, "--rec", run / "export", "-o", tmp_path / "index", "--json")
    assert index.exit_code == 0, index.stderr
    query = lists / gallery.read_text(encoding="utf-8").splitlines()[0].split("\t")[0]
    label = gallery.read_text(encoding="utf-8").splitlines()[0].split("\t")[1]
    predicted = cli("predict", query, "--index", tmp_path / "index", "--json")
    assert predicted.exit_code == 0, predicted.stderr
    best = json.loads(predicted.stdout)["images"][0]["recognitions"][0]["matches"][0]
    assert best["label"] == label and best["score"] > 0.999  # the gallery image itself


def test_resume_rebuilds_the_onnx_backbone(fine_tuned, cli, home, tmp_path):
    import shutil

    run, _ = fine_tuned
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    resumed = cli("train-rec", "-o", copy, "--resume", "--epochs", "3", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_done"] == 3
    assert read_yaml(copy / "export" / "shitu.yaml")["arch"] == "RecModel/onnx"


# ---------------------------------------------------------------- refusals, before training


def _refused(cli, lists, out: Path, *args) -> str:
    result = cli("train-rec", lists, "-o", out, *TINY, "--epochs", "1", *args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and not out.exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return " ".join(lines)


def test_bad_onnx_files_are_refused_by_name(cli, lists, home, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model", encoding="utf-8")
    assert "notes.onnx" in (msg := _refused(cli, lists, tmp_path / "a", "--pretrained", text)) and "not a readable ONNX" in msg
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(tiny_cnn(tmp_path / "whole.onnx").read_bytes()[:300])
    assert "cut.onnx" in (msg := _refused(cli, lists, tmp_path / "b", "--pretrained", truncated)) and "ONNX" in msg
    missing = _refused(cli, lists, tmp_path / "c", "--pretrained", tmp_path / "nope.onnx")
    assert "nope.onnx" in missing and "not found" in missing
    gray = tiny_cnn(tmp_path / "gray.onnx", channels=1)
    assert "gray.onnx" in (msg := _refused(cli, lists, tmp_path / "d", "--pretrained", gray)) and "3-channel" in msg
    unconvertible = tiny_cnn(tmp_path / "nokernel.onnx", kernel_shape=False)
    msg = _refused(cli, lists, tmp_path / "e", "--pretrained", unconvertible)
    assert "nokernel.onnx" in msg and "x2paddle cannot convert" in msg


def test_outputs_unknown_or_ambiguous_are_refused_with_the_names(cli, lists, onnx_file, home, tmp_path):
    unknown = _refused(cli, lists, tmp_path / "a", "--pretrained", onnx_file, "--pretrained-output", "feats")
    assert "tiny.onnx" in unknown and "'feats'" in unknown and "embedding" in unknown and "logits" in unknown
    two = tiny_cnn(tmp_path / "two.onnx", outputs=("embedding", "second", "logits"))
    ambiguous = _refused(cli, lists, tmp_path / "b", "--pretrained", two)
    assert "two.onnx" in ambiguous and "--pretrained-output" in ambiguous and "second" in ambiguous
    bad_mean = _refused(cli, lists, tmp_path / "c", "--pretrained", onnx_file, "--pretrained-mean", "0.5,0.5")
    assert "--pretrained-mean" in bad_mean
    not_onnx = _refused(cli, lists, tmp_path / "d", "--pretrained-output", "embedding")
    assert "ONNX backbone only" in not_onnx


# ---------------------------------------------------------------- official weights by name


@pytest.fixture
def server(monkeypatch):
    from model_server import ModelServer
    from shitu_cli.models.registry import BASE_URL_ENV

    running = ModelServer().start()
    monkeypatch.setenv(BASE_URL_ENV, running.base_url)
    yield running
    running.stop()


def test_pretrained_by_model_name_fine_tunes_the_pulled_weights(cli, server, lists, tmp_path):
    """`--pretrained PPLCNet_x0_25` (an inference model's name) means its ImageNet training weights."""
    import paddle

    from shitu_cli.models.ppcls import build_arch
    from shitu_cli.models.registry import OFFICIAL_MODELS

    weights = OFFICIAL_MODELS["PPLCNet_x0_25-pretrained"]
    before = _refused(cli, lists, tmp_path / "a", "--pretrained", "PPLCNet_x0_25")
    assert "shitu models pull PPLCNet_x0_25-pretrained" in before
    backbone = build_arch({"name": "PPLCNet_x0_25", "pretrained": False, "class_num": 1000})
    saved = tmp_path / "imagenet.pdparams"
    paddle.save(backbone.state_dict(), str(saved))  # what the official file holds: a backbone's state dict
    server.files["/" + weights.url_path] = saved.read_bytes()
    assert cli("models", "pull", weights.name).exit_code == 0
    run = tmp_path / "run"
    result = cli("train-rec", lists, "-o", run, "--recipe", "tiny", "--epochs", "1", "--input-size", "32",
                 "--num-workers", "0", "--pretrained", "PPLCNet_x0_25", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)["pretrained"]
    assert info["loaded"] > 50 and info["path"].endswith("PPLCNet_x0_25_pretrained.pdparams")
    assert read_yaml(run / "recipe.yaml")["options"]["pretrained"] == "PPLCNet_x0_25"  # a name, so reproduce finds it


def test_imagenet_pplcnetv2_weights_fit_the_pp_shituv2_backbone(tmp_path):
    """PPLCNetV2_base-pretrained (ImageNet) loads into PPLCNetV2_base_ShiTu: all but its last conv and fc."""
    import paddle

    from shitu_cli.models.ppcls import build_arch
    from shitu_cli.models.registry import OFFICIAL_MODELS
    from shitu_cli.train.rec_model import build_rec_model, load_pretrained
    from shitu_cli.train.rec_settings import resolve_settings

    assert OFFICIAL_MODELS["PPLCNetV2_base-pretrained"].file_name == "PPLCNetV2_base_pretrained.pdparams"
    imagenet = build_arch({"name": "PPLCNetV2_base", "pretrained": False, "class_num": 1000})
    path = tmp_path / "PPLCNetV2_base_pretrained.pdparams"
    paddle.save(imagenet.state_dict(), str(path))
    model = build_rec_model(resolve_settings(None, {"input_size": 64}), 10)
    info = load_pretrained(model, path, "PPLCNetV2_base_ShiTu")
    assert info["loaded"] > 250 and 0 < info["reinitialised"] <= 16  # last conv, the extra branch, neck, head
    loaded = model.state_dict()["backbone.stem.0.conv.weight"].numpy()
    np.testing.assert_array_equal(loaded, imagenet.state_dict()["stem.0.conv.weight"].numpy())
