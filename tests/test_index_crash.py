"""A build-index process SIGKILLed mid-write leaves the previous index loadable and searchable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from shitu_cli.index.store import STALL_ENV, STALL_MARKER_ENV, load_index
from synth import draw_object, make_class_tree, write_rgb


def _build_in_subprocess(gallery, index, rec, env):
    cmd = [sys.executable, "-m", "shitu_cli", "build-index", str(gallery), "-o", str(index), "--rec", str(rec)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when_stalled(process, marker, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"writer exited before stalling: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("writer never reached the stall point")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _search_finds(index_dir, image_count):
    stored = load_index(index_dir)
    assert stored.manifest.count == image_count == stored.index.ntotal == len(stored.items)
    _, vectors = __import__("shitu_cli.index.backend", fromlist=["x"]).stored(stored.index)
    scores, ids = stored.index.search(vectors, 1)
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
    return stored


@pytest.mark.parametrize("stage", ["vector.index", "id_map.json", "before-commit", "after-commit"])
def test_killed_writer_leaves_a_consistent_index(cli, rec, tmp_path, stage):
    gallery, index = tmp_path / "gallery", tmp_path / "index"
    names = make_class_tree(gallery, n_classes=3, per_class=3, size=64, seed=4)
    assert cli("build-index", gallery, "-o", index, "--rec", rec).exit_code == 0
    old = load_index(index)
    write_rgb(gallery / names[0] / "added.jpg", draw_object(names[0], 64, np.random.default_rng(11)))

    marker = tmp_path / "stalled"
    env = {**os.environ, STALL_ENV: stage, STALL_MARKER_ENV: str(marker)}
    _kill_when_stalled(_build_in_subprocess(gallery, index, rec, env), marker)

    committed = stage == "after-commit"
    stored = _search_finds(index, 10 if committed else 9)
    assert (stored.manifest.generation > old.manifest.generation) == committed
    predicted = cli("predict", gallery, "--index", index, "--json")
    assert predicted.exit_code == 0, predicted.stderr

    # The next writer cleans up what the killed one left and carries on.
    report = cli("build-index", gallery, "-o", index, "--json")
    assert report.exit_code == 0, report.stderr
    assert load_index(index).manifest.count == 10
    leftovers = sorted(p.name for p in index.iterdir() if p.name.startswith(("gen-", ".manifest")))
    assert len(leftovers) <= 2 and all(p.startswith("gen-") for p in leftovers)


def test_a_damaged_index_file_is_refused_not_misread(cli, rec, tmp_path):
    gallery, index = tmp_path / "gallery", tmp_path / "index"
    make_class_tree(gallery, n_classes=2, per_class=2, size=64, seed=4)
    assert cli("build-index", gallery, "-o", index, "--rec", rec).exit_code == 0
    stored = load_index(index)
    id_map = index / stored.manifest.files["id_map.json"]["path"]
    id_map.write_text(id_map.read_text(encoding="utf-8").replace('"label": "', '"label": "x'), encoding="utf-8")
    result = cli("predict", gallery, "--index", index)
    assert result.exit_code == 2
    assert "does not match the sha256 in manifest.yaml" in result.stderr
