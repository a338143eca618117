"""Shared steps of the gallery-index tests: build-index and predict run through the CLI and read as JSON."""

from __future__ import annotations

import json


def gallery_labels(gallery):
    """The class folders of a drawn gallery, sorted: the labels an index built from it should hold."""
    return sorted(p.name for p in gallery.iterdir() if p.is_dir())


def build_index_json(cli, *args):
    """`shitu build-index ARGS --json`, which must succeed; its JSON document."""
    result = cli("build-index", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def predicted_labels(cli, index, target):
    """`shitu predict TARGET --index INDEX --json`: each image's top recognised label, by path."""
    result = cli("predict", target, "--index", index, "--json")
    assert result.exit_code == 0, result.stderr
    return {img["path"]: img["recognitions"][0]["label"] for img in json.loads(result.stdout)["images"]}
