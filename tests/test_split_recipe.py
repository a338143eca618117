"""A split's recipe.yaml replays to byte-identical lists, and `shitu reproduce` names what no longer matches."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import write_image
from shitu_cli.artifacts import sha256_file


def make_tree(root, sizes):
    for c, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            write_image(root / name / f"{i}.jpg", seed=10 * c + i, size=(8, 8))
    return root


@pytest.mark.parametrize("fmt, lists", [
    ("imagenet", ["train_list.txt", "val_list.txt", "test_list.txt", "labels.txt"]),
    ("rec", ["train_list.txt", "gallery_list.txt", "query_list.txt", "labels.txt"]),
])
def test_reproduce_gives_identical_lists(cli, tmp_path, fmt, lists):
    root = make_tree(tmp_path / "data", {"一": 6, "two words": 7, "three": 5})
    out = tmp_path / "split"
    assert cli("split-dataset", root, "--format", fmt, "--out", out, "--seed", "5").exit_code == 0

    result = cli("reproduce", out / "recipe.yaml", "--out", tmp_path / "again", "--json")

    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["identical"] is True
    assert sorted(f["path"] for f in report["files"]) == sorted(lists)
    for name in lists:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_reproduce_into_a_temp_dir_says_identical(cli, tmp_path):
    root = make_tree(tmp_path / "data", {"a": 5, "b": 5})
    cli("split-dataset", root)

    result = cli("reproduce", root / "recipe.yaml")

    assert result.exit_code == 0
    assert "byte-identical" in result.stdout


def test_changed_dataset_makes_reproduce_name_the_differing_lists(cli, tmp_path):
    root = make_tree(tmp_path / "data", {"a": 10, "b": 10})
    cli("split-dataset", root, "--out", tmp_path / "split")
    write_image(root / "b" / "new.jpg", seed=77)  # the data moved on since the split

    result = cli("reproduce", tmp_path / "split" / "recipe.yaml", "--json")

    assert result.exit_code == 1
    status = {f["path"]: f["status"] for f in json.loads(result.stdout)["files"]}
    assert status["labels.txt"] == "identical"
    assert "differs" in {status[name] for name in ("train_list.txt", "val_list.txt", "test_list.txt")}


def test_tampered_list_is_reported_by_name(cli, tmp_path):
    root = make_tree(tmp_path / "data", {"a": 10, "b": 10})
    out = tmp_path / "split"
    cli("split-dataset", root, "--out", out)
    # Hand-edit a list and re-record its hash, as someone "fixing" a split by hand would:
    # the recipe no longer describes what its own options produce.
    val_list = out / "val_list.txt"
    val_list.write_text(val_list.read_text(encoding="utf-8").replace(" 1\n", " 0\n"), encoding="utf-8")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["outputs"]["val_list.txt"] = sha256_file(val_list)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")

    result = cli("reproduce", out / "recipe.yaml")

    assert result.exit_code == 1
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 3}
    assert "differs" in rows["val_list.txt"]
    assert "identical" in rows["train_list.txt"]
    assert "some outputs differ" in result.stdout


def test_list_edited_in_place_is_reported_by_name(cli, tmp_path):
    root = make_tree(tmp_path / "data", {"a": 10, "b": 10})
    out = tmp_path / "split"
    cli("split-dataset", root, "--out", out)
    train_list = out / "train_list.txt"
    train_list.write_text(train_list.read_text(encoding="utf-8") + "a/extra.jpg 0\n", encoding="utf-8")

    result = cli("reproduce", out / "recipe.yaml", "--json")

    assert result.exit_code == 1
    status = {f["path"]: f["status"] for f in json.loads(result.stdout)["files"]}
    assert status["train_list.txt"] == "edited on disk"
    assert status["val_list.txt"] == "identical"
