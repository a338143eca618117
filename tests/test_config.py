"""`shitu config`: a default index for predict, env overrides, unknown keys refused with a suggestion."""

from __future__ import annotations

import json

from shitu_cli.settings import config_path, default_index


def test_set_get_show_round_trip(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gallery_index").mkdir()
    result = cli("config", "set", "index", "gallery_index")
    assert result.exit_code == 0 and result.stderr == ""
    assert config_path().is_file() and config_path().parent.name == ".shitu"  # $SHITU_HOME from the test fixture
    assert cli("config", "get", "index").stdout.strip() == str(tmp_path / "gallery_index")
    assert default_index() == tmp_path / "gallery_index"

    shown = json.loads(cli("config", "show", "--json").stdout)
    index = next(s for s in shown["settings"] if s["key"] == "index")
    assert index["source"] == "config" and index["value"] == str(tmp_path / "gallery_index")

    assert cli("config", "unset", "index").exit_code == 0
    assert default_index() is None and cli("config", "get", "index").stdout.strip() == ""


def test_env_overrides_the_file(cli, tmp_path, monkeypatch):
    cli("config", "set", "index", tmp_path / "from_file")
    monkeypatch.setenv("SHITU_INDEX", str(tmp_path / "from_env"))
    assert default_index() == tmp_path / "from_env"
    got = json.loads(cli("config", "get", "index", "--json").stdout)
    assert got["source"] == "env SHITU_INDEX"
    again = cli("config", "set", "index", tmp_path / "other")
    assert again.exit_code == 0 and "SHITU_INDEX overrides it" in again.stderr


def test_missing_path_is_stored_with_a_warning(cli, tmp_path):
    result = cli("config", "set", "index", tmp_path / "not_built_yet")
    assert result.exit_code == 0 and "does not exist yet" in result.stderr


def test_unknown_key_suggests_the_closest(cli):
    for args in (("set", "indx", "x"), ("get", "indx"), ("unset", "indx")):
        result = cli("config", *args)
        assert result.exit_code == 2
        assert "unknown setting 'indx'" in result.stderr and "did you mean 'index'" in result.stderr


def test_broken_config_file_is_named(cli):
    config_path().parent.mkdir(parents=True, exist_ok=True)
    config_path().write_text("index: [unclosed\n", encoding="utf-8")
    result = cli("config", "show")
    assert result.exit_code == 2 and str(config_path()) in result.stderr
    config_path().write_text("indexx: /x\n", encoding="utf-8")
    result = cli("config", "get", "index")
    assert result.exit_code == 2 and "did you mean 'index'" in result.stderr and str(config_path()) in result.stderr


def test_model_base_url_setting_points_pulls_at_a_mirror(cli, monkeypatch):
    from shitu_cli.models.registry import OFFICIAL_MODELS

    monkeypatch.delenv("SHITU_MODEL_BASE_URL", raising=False)
    assert cli("config", "set", "model_base_url", "http://127.0.0.1:9/mirror").exit_code == 0
    assert OFFICIAL_MODELS["PPLCNet_x1_0"].url == "http://127.0.0.1:9/mirror/dygraph/inference/PPLCNet_x1_0_infer.tar"
    refused = cli("config", "set", "model_base_url", "ftp://example")
    assert refused.exit_code == 2 and "http(s) URL" in refused.stderr


def test_xdg_config_dir_without_shitu_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SHITU_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_path() == tmp_path / "xdg" / "shitu" / "config.yaml"
