"""Model names wherever a path is accepted: resolve_model_dir / resolve_weights, the cache location, `models list`."""

from __future__ import annotations

import json

import pytest

from shitu_cli.errors import BadInput
from shitu_cli.models.registry import OFFICIAL_MODELS, cache_root, resolve_model_dir, resolve_weights
from tests.model_server import fake_model_files, tar_bytes, write_bytes


def _add_rec(cli, tmp_path):
    archive = write_bytes(tmp_path / "general_PPLCNetV2_base_pretrained_v1.0_infer.tar", tar_bytes(fake_model_files()))
    assert cli("models", "add", archive).exit_code == 0


def test_official_list_covers_shitu_and_every_lcnet_scale():
    tasks = {(m.task, m.kind) for m in OFFICIAL_MODELS.values()}
    assert ("det", "inference model") in tasks and ("rec", "training weights") in tasks
    for scale in ("x0_25", "x0_35", "x0_5", "x0_75", "x1_0", "x1_5", "x2_0", "x2_5"):
        assert OFFICIAL_MODELS[f"PPLCNet_{scale}"].file_name == f"PPLCNet_{scale}_infer.tar"
        assert OFFICIAL_MODELS[f"PPLCNet_{scale}-pretrained"].file_name == f"PPLCNet_{scale}_pretrained.pdparams"
    assert OFFICIAL_MODELS["PP-ShiTuV2-det"].url.startswith("https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/rec/")


def test_base_url_override(monkeypatch):
    monkeypatch.setenv("SHITU_MODEL_BASE_URL", "http://127.0.0.1:9/mirror/")
    assert OFFICIAL_MODELS["PPLCNet_x1_0"].url == "http://127.0.0.1:9/mirror/dygraph/inference/PPLCNet_x1_0_infer.tar"


def test_cache_root_follows_shitu_home_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("SHITU_HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / "models"
    monkeypatch.delenv("SHITU_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "shitu" / "models"


def test_unpulled_name_says_how_to_pull():
    with pytest.raises(BadInput) as caught:
        resolve_model_dir("PP-ShiTuV2-rec")
    assert "shitu models pull PP-ShiTuV2-rec" in caught.value.one_line()


def test_pulled_name_resolves_to_the_cached_dir(cli, tmp_path):
    _add_rec(cli, tmp_path)
    model_dir = resolve_model_dir("PP-ShiTuV2-rec")
    assert model_dir == cache_root() / "PP-ShiTuV2-rec" and (model_dir / "shitu.yaml").is_file()


def test_paths_are_returned_as_given(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    weights = write_bytes(tmp_path / "w.pdparams", b"x")
    assert resolve_weights(weights) == weights
    with pytest.raises(BadInput, match="model folder not found"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(BadInput, match="expected a model folder"):
        resolve_model_dir(weights)
    with pytest.raises(BadInput, match="expected a .pdparams"):
        resolve_weights(tmp_path)


def test_names_of_the_wrong_kind_and_typos_are_explained():
    with pytest.raises(BadInput, match="training weights, not inference model"):
        resolve_model_dir("PPLCNet_x1_0-pretrained")
    with pytest.raises(BadInput, match="inference model, not training weights"):
        resolve_weights("PPLCNet_x1_0")
    with pytest.raises(BadInput) as caught:
        resolve_model_dir("PP-ShiTuV2-recc")
    assert "did you mean 'PP-ShiTuV2-rec'" in caught.value.one_line()


def test_weights_names_resolve_after_add(cli, tmp_path):
    file = write_bytes(tmp_path / "PPLCNet_x0_25_pretrained.pdparams", b"weights")
    with pytest.raises(BadInput, match="shitu models pull PPLCNet_x0_25-pretrained"):
        resolve_weights("PPLCNet_x0_25-pretrained")
    assert cli("models", "add", file).exit_code == 0
    resolved = resolve_weights("PPLCNet_x0_25-pretrained")
    assert resolved.name == "PPLCNet_x0_25_pretrained.pdparams" and resolved.read_bytes() == b"weights"


def test_list_json_shows_cached_state(cli, tmp_path):
    before = json.loads(cli("models", "list", "--json").stdout)
    assert not any(m["cached"] for m in before["models"])
    _add_rec(cli, tmp_path)
    result = cli("models", "list", "--json")
    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert models["PP-ShiTuV2-rec"]["cached"] and models["PP-ShiTuV2-rec"]["path"].endswith("models/PP-ShiTuV2-rec")
    assert not models["PP-ShiTuV2-det"]["cached"]
    assert {"name", "task", "kind", "approx_mb", "cached", "url"} <= set(models["PPLCNet_x1_0"])


def test_list_table_names_every_model(cli):
    result = cli("models", "list")
    assert result.exit_code == 0
    for name in OFFICIAL_MODELS:
        assert name in result.stdout
