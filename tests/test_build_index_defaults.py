"""`shitu build-index` with what it is not told: ./index and the default rec model; lists from split-dataset --out."""

from __future__ import annotations

import json

import pytest

from synth import make_class_tree
from tiny_rec import export_tiny_rec


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return export_tiny_rec(tmp_path_factory.mktemp("models") / "rec32", embedding_dim=32)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's folder: gallery/ with label folders, the shell standing in it."""
    make_class_tree(tmp_path / "gallery", n_classes=3, per_class=2, size=48, seed=3)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _manifest(index):
    from shitu_cli.index.store import read_index_manifest

    return read_index_manifest(index)


def test_bare_build_index_writes_index_here_with_the_built_in_recogniser(cli, project):
    from shitu_cli.demo import DEMO_MODELS

    result = cli("build-index", "gallery/")

    assert result.exit_code == 0, result.stderr
    assert f"the index is {project / 'index'}" in result.stderr
    assert "built-in demo recogniser" in result.stderr
    manifest = _manifest(project / "index")
    assert manifest.count == 6
    assert manifest.model.dir == (DEMO_MODELS / "rec").resolve().as_posix()


def test_the_configured_rec_model_is_the_default(cli, project, rec):
    assert cli("config", "set", "rec", rec).exit_code == 0

    result = cli("build-index", "gallery", "-o", project / "idx")

    assert result.exit_code == 0, result.stderr
    assert "configured rec model (config)" in result.stderr
    assert _manifest(project / "idx").model.dir == rec.resolve().as_posix()


def test_a_default_index_of_another_gallery_is_not_resynced_silently(cli, project, rec):
    make_class_tree(project / "other", n_classes=2, per_class=2, size=48, seed=4)
    assert cli("build-index", "gallery", "--rec", rec).exit_code == 0

    result = cli("build-index", "other", "--rec", rec)

    assert result.exit_code == 2
    assert "already holds the index of another gallery" in result.stderr
    assert _manifest(project / "index").count == 6


@pytest.mark.parametrize("fmt, list_name", [("rec", "gallery_list.txt"), ("imagenet", "train_list.txt")])
def test_lists_from_split_dataset_out_build_an_index_with_label_names(cli, tmp_path, rec, fmt, list_name):
    names = make_class_tree(tmp_path / "data", n_classes=4, per_class=4, size=48, seed=5)
    split = cli("split-dataset", tmp_path / "data", "--out", tmp_path / "lists", "--format", fmt, "--val", "0.5")
    assert split.exit_code == 0, split.stderr

    result = cli("build-index", tmp_path / "lists" / list_name, "-o", tmp_path / "idx", "--rec", rec, "--json")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    listed = (tmp_path / "lists" / list_name).read_text(encoding="utf-8").splitlines()
    assert report["count"] == len(listed) > 0 and not report["skipped"]
    from shitu_cli.index import load_index

    labels = {item.label for item in load_index(tmp_path / "idx").items.values()}
    assert labels <= set(names) and labels  # class names (with spaces), not ids


def test_a_file_called_index_here_is_named_not_overwritten(cli, project):
    (project / "index").write_text("my notes", encoding="utf-8")

    result = cli("build-index", "gallery")

    assert result.exit_code == 2 and "./index, where the index would go, is a file" in result.stderr
    assert (project / "index").read_text(encoding="utf-8") == "my notes"
