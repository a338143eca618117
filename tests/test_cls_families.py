"""train-cls beyond PP-LCNet: ResNet-vd (and the other legendary_models families) train, export, predict and
agree with their dygraph model; ResNet teaches PP-LCNet and learns from it; ImageNet weights by name from a
loopback server, checked by sha256; sizes and names a family cannot take are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from synth import make_class_tree

# ResNet18_vd at 32 px (the smallest multiple of 32): a few seconds of CPU per epoch on 51 images.
RESNET = ("--model", "ResNet18_vd", "--input-size", "32", "--batch-size", "16", "--lr", "0.05", "--warmup-epochs", "0.5")
LCNET = ("--recipe", "tiny", "--input-size", "32", "--batch-size", "16")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families") / "data"
    make_class_tree(root, n_classes=4, per_class=16, size=40, seed=3)
    return root


@pytest.fixture(scope="module")
def resnet_run(shapes, tmp_path_factory):
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    run_dir = tmp_path_factory.mktemp("runs") / "resnet"
    args = ["train-cls", str(shapes), "-o", str(run_dir), *RESNET, "--epochs", "2", "--json"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return run_dir, json.loads(result.stdout)


def _val_batch(run_dir: Path, dataset: Path, count: int = 6) -> tuple[np.ndarray, list[str]]:
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.models.manifest import read_model_manifest

    manifest = read_model_manifest(run_dir / "export")
    lines = (run_dir / "split" / "val_list.txt").read_text(encoding="utf-8").splitlines()[:count]
    paths = [str(dataset / line.split("\t")[0]) for line in lines]  # the lists name files under the dataset
    images = [read_image(p) for p in paths]
    return preprocess_batch(images, manifest.preprocess, tuple(manifest.input_size)), paths


def test_resnet_trains_exports_and_records_its_family(resnet_run):
    run_dir, summary = resnet_run
    assert summary["model"] == "ResNet18_vd" and summary["classes"] == 4 and summary["epochs_done"] == 2
    assert summary["export_max_abs_diff"] <= 1e-4
    manifest = yaml.safe_load((run_dir / "export" / "shitu.yaml").read_text(encoding="utf-8"))
    assert manifest["arch"] == "ResNet18_vd" and manifest["input_size"] == [32, 32] and len(manifest["labels"]) == 4
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["options"]["model"] == "ResNet18_vd" and recipe["options"]["input_size"] == 32


def test_resnet_export_agrees_with_its_checkpoint_under_onednn(resnet_run, shapes):
    """The exported graph (Paddle Inference, oneDNN on as `shitu predict` runs it) against the dygraph
    ResNet rebuilt from checkpoints/best.pdparams, on real val images."""
    from shitu_cli.train.distill import CheckpointTeacher, load_teacher

    run_dir, _ = resnet_run
    teacher = load_teacher(run_dir)
    assert isinstance(teacher, CheckpointTeacher) and type(teacher.model).__name__ == "ResNet"
    _export_matches_checkpoint(run_dir, shapes, 4)


def test_predict_with_a_resnet_classifier(resnet_run, shapes, cli):
    run_dir, _ = resnet_run
    _, paths = _val_batch(run_dir, shapes, 2)
    result = cli("predict", *paths, "--model", run_dir / "export", "--json")
    assert result.exit_code == 0, result.stderr
    labels = set((run_dir / "split" / "labels.txt").read_text(encoding="utf-8").splitlines())
    images = json.loads(result.stdout)["images"]
    assert len(images) == 2
    for image in images:
        assert image["error"] is None and {t["label"] for t in image["top"]} <= labels
        assert sum(t["score"] for t in image["top"]) == pytest.approx(1.0, abs=1e-3)


def test_resnet_teaches_pplcnet_and_learns_from_it(resnet_run, shapes, tmp_path, cli):
    """The SSLD pairing (a ResNet-vd teacher, a PP-LCNet student), then the other way round from the student's export."""
    run_dir, _ = resnet_run
    student = tmp_path / "lcnet"
    result = cli("train-cls", shapes, "-o", student, *LCNET, "--model", "PPLCNet_x0_25", "--epochs", "1",
                 "--teacher", run_dir, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["teacher"] == str(run_dir) and summary["model"] == "PPLCNet_x0_25"
    assert yaml.safe_load((student / "recipe.yaml").read_text(encoding="utf-8"))["options"]["teacher"] == str(run_dir)

    back = cli("train-cls", shapes, "-o", tmp_path / "resnet-student", *RESNET, "--epochs", "1",
               "--teacher", student / "export", "--json")
    assert back.exit_code == 0, back.stderr
    assert json.loads(back.stdout)["teacher"] == str(student / "export")


def _export_matches_checkpoint(run_dir: Path, dataset: Path, classes: int) -> None:
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.train.distill import load_teacher

    batch, _ = _val_batch(run_dir, dataset)
    logits = load_teacher(run_dir).logits(batch, None)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    got = build_predictor(run_dir / "export", PredictorOptions(mkldnn=True, threads=1), task="cls").run(batch)[0]
    assert got.shape == (len(batch), classes)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("model, size", [
    ("MobileNetV3_small_x0_35", 32),
    pytest.param("HRNet_W18_C", 64, marks=pytest.mark.slow),  # its export runs without oneDNN's placement pass
    pytest.param("InceptionV3", 75, marks=pytest.mark.slow),  # the smallest size it takes
    pytest.param("PPHGNetV2_B0", 32, marks=pytest.mark.slow),
    pytest.param("MobileNetV4_conv_small", 32, marks=pytest.mark.slow),  # head named "classifier"
    pytest.param("ResNet50_vd", 64, marks=pytest.mark.slow),
])
def test_other_families_train_export_and_agree(shapes, tmp_path, cli, model, size):
    run_dir = tmp_path / "run"
    result = cli("train-cls", shapes, "-o", run_dir, "--model", model, "--input-size", size, "--batch-size", "16",
                 "--lr", "0.05", "--epochs", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == model and summary["export_max_abs_diff"] <= 1e-4
    _export_matches_checkpoint(run_dir, shapes, 4)


@pytest.mark.slow
def test_resnet50_vd_teaches_pplcnet(shapes, tmp_path, cli):
    teacher = tmp_path / "r50"
    result = cli("train-cls", shapes, "-o", teacher, "--model", "ResNet50_vd", "--input-size", "64", "--batch-size", "16",
                 "--lr", "0.05", "--epochs", "1", "--json")
    assert result.exit_code == 0, result.stderr
    student = cli("train-cls", shapes, "-o", tmp_path / "lcnet", *LCNET, "--model", "PPLCNet_x1_0", "--epochs", "1",
                  "--teacher", teacher / "export", "--json")
    assert student.exit_code == 0, student.stderr
    assert json.loads(student.stdout)["teacher"] == str(teacher / "export")


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("model, size, expected", [
    ("ResNet50-vd", 32, ["unknown model 'ResNet50-vd'", "did you mean ResNet50_vd?", "ResNet-vd: ResNet18_vd ... ResNet200_vd",
                         "PP-LCNet: PPLCNet_x0_25", "shitu models families"]),
    ("ResNet18_vd", 48, ["multiple of 32, got 48", "--input-size 32 or 64"]),
    ("VGG11", 64, ["takes 224 px inputs only", "--input-size 224"]),
    ("InceptionV3", 64, ["--input-size >= 75"]),
])
def test_models_and_sizes_a_family_cannot_take_exit_2(shapes, tmp_path, cli, model, size, expected):
    result = cli("train-cls", shapes, "-o", tmp_path / "run", "--model", model, "--input-size", size)
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_listed_architecture_is_in_the_wheel_and_hrnet_export_skips_the_broken_pass():
    from shitu_cli.models.cls_families import FAMILIES, all_archs, export_extra, head_key
    from shitu_cli.models.ppcls import CLS_ARCHS, REC_BACKBONES, import_ppcls

    import_ppcls()
    import ppcls.arch

    assert [a for a in all_archs() if not hasattr(ppcls.arch, a)] == []
    assert {"ResNet50_vd", "ResNet200_vd", "MobileNetV3_large_x1_0", "HRNet_W18_C", "PPLCNet_x1_0"} <= set(CLS_ARCHS)
    assert REC_BACKBONES[0] == "PPLCNetV2_base_ShiTu" and "ResNet50_vd" not in REC_BACKBONES
    assert [f.name for f in FAMILIES if "ResNet50_vd" in f.archs] == ["ResNet-vd"]
    assert head_key("VGG16") == "fc3.weight" and head_key("MobileNetV4_conv_small") == "classifier.weight"
    assert export_extra("HRNet_W18_C") == {"onednn_skip_passes": ["onednn_placement_pass"]} and export_extra("ResNet50_vd") == {}


def test_models_families_lists_recipes_and_weights(cli):
    result = cli("models", "families", "--json")
    assert result.exit_code == 0, result.stderr
    families = {f["family"]: f for f in json.loads(result.stdout)["families"]}
    resnet = families["ResNet-vd"]
    assert "ResNet50_vd" in resnet["models"] and resnet["input_size"] == "multiple of 32"
    assert {"resnet-cpu", "resnet50_vd-imagenet"} <= set(resnet["recipes"])
    assert {"ResNet50_vd-pretrained", "ResNet50_vd_ssld-pretrained"} <= set(resnet["pretrained"])
    assert "MobileNetV3_large_x1_0_ssld-pretrained" in families["MobileNetV3"]["pretrained"]
    for name in resnet["recipes"]:
        assert (Path("recipes/cls") / f"{name}.yml").is_file()


def test_shipped_resnet_recipes_resolve():
    from shitu_cli.train.cls_settings import check_settings, complete_settings, resolve_settings

    imagenet = complete_settings(resolve_settings("resnet50_vd-imagenet", {}))
    check_settings(imagenet)
    # PaddleClas's published ResNet50_vd.yaml: lr 0.1 per 256 images, 200 epochs, L2 7e-5, mixup 0.2, smoothing 0.1.
    assert (imagenet["model"], imagenet["epochs"], imagenet["batch_size"], imagenet["lr"]) == ("ResNet50_vd", 200, 256, 0.1)
    assert (imagenet["weight_decay"], imagenet["mixup"], imagenet["label_smoothing"]) == (7e-5, 0.2, 0.1)
    cpu = complete_settings(resolve_settings("resnet-cpu", {"model": "ResNet50_vd"}))
    check_settings(cpu)
    assert cpu["model"] == "ResNet50_vd" and cpu["input_size"] % 32 == 0


# ----------------------------------------------------------------------------- ImageNet weights by name


@pytest.fixture
def server(monkeypatch):
    from shitu_cli.models.registry import BASE_URL_ENV
    from model_server import ModelServer

    running = ModelServer().start()
    monkeypatch.setenv(BASE_URL_ENV, running.base_url)
    yield running
    running.stop()


def _state_bytes(arch: str, seed: int) -> tuple[bytes, dict]:
    """A real ImageNet-shaped (1000-class) state dict of `arch`, as paddle.save writes the official files."""
    import io

    import paddle

    from shitu_cli.models.ppcls import build_arch

    paddle.seed(seed)
    state = build_arch({"name": arch, "class_num": 1000}).state_dict()
    buffer = io.BytesIO()
    paddle.save(state, buffer)
    return buffer.getvalue(), {k: v.numpy() for k, v in state.items()}


def test_pretrained_resnet_weights_by_name_are_pulled_checked_and_loaded(cli, server):
    from shitu_cli.errors import BadInput
    from shitu_cli.models.ppcls import build_arch
    from shitu_cli.models.registry import OFFICIAL_MODELS, cache_root
    from shitu_cli.train.cls_model import load_pretrained

    official = OFFICIAL_MODELS["ResNet18_vd-pretrained"]
    assert official.url.endswith("/dygraph/legendary_models/ResNet18_vd_pretrained.pdparams")
    served, arrays = _state_bytes("ResNet18_vd", seed=1)
    server.files["/" + official.url_path] = served
    result = cli("models", "pull", "ResNet18_vd-pretrained", "--json")
    assert result.exit_code == 0, result.stderr
    import hashlib

    assert json.loads(result.stdout)["sha256"] == hashlib.sha256(served).hexdigest()

    # `--pretrained ResNet18_vd` is short for the -pretrained weights: the body loads, the 1000-class head does not.
    model = build_arch({"name": "ResNet18_vd", "class_num": 4})
    note = load_pretrained(model, Path("ResNet18_vd"), "ResNet18_vd")
    assert "classifier head (1000 classes there) starts fresh" in note
    key = "stem.0.conv.weight"
    np.testing.assert_array_equal(model.state_dict()[key].numpy(), arrays[key])

    # Upstream swaps the file: the recorded sum refuses it; a changed cache file is refused at use.
    server.files["/" + official.url_path] = served[:100] + bytes([served[100] ^ 1]) + served[101:]
    refused = cli("models", "pull", "ResNet18_vd-pretrained", "--force")
    assert refused.exit_code == 2 and "sha256" in refused.stderr
    cached = cache_root() / "ResNet18_vd-pretrained" / official.file_name
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BadInput, match="changed since they were installed"):
        load_pretrained(build_arch({"name": "ResNet18_vd", "class_num": 4}), Path("ResNet18_vd"), "ResNet18_vd")


def test_resnet50_vd_ssld_entry_downloads_over_loopback_and_refuses_a_tampered_copy(cli, server):
    from shitu_cli.models.registry import OFFICIAL_MODELS, cache_root
    from model_server import fake_model_files

    official = OFFICIAL_MODELS["ResNet50_vd_ssld-pretrained"]
    assert official.url.endswith("/dygraph/legendary_models/ResNet50_vd_ssld_pretrained.pdparams")
    assert official.arch == "ResNet50_vd" and official.kind == "training weights"
    first = fake_model_files(seed=4)["inference.pdiparams"]  # bytes stand-in: only the transfer is under test here
    server.files["/" + official.url_path] = first
    assert cli("models", "pull", "ResNet50_vd_ssld-pretrained").exit_code == 0
    assert (cache_root() / "ResNet50_vd_ssld-pretrained" / official.file_name).read_bytes() == first
    server.files["/" + official.url_path] = first[:-1] + b"\x01"
    result = cli("models", "pull", "ResNet50_vd_ssld-pretrained", "--force")
    assert result.exit_code == 2 and "sha256" in result.stderr and "--trust-new" in result.stderr
    assert (cache_root() / "ResNet50_vd_ssld-pretrained" / official.file_name).read_bytes() == first
