"""Shared test fixtures: an isolated environment and a CLI runner that keeps stdout and stderr apart."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """Temp HOME and cache, no colour, fixed width: rendered output is stable and nothing leaks."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("SHITU_HOME", str(home / ".shitu"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERM", "dumb")
    # --backend auto measures the backends of each new model once (seconds); tests that want it turn it on.
    monkeypatch.setenv("SHITU_AUTO_MEASURE", "0")
    return home


@pytest.fixture(scope="session")
def rec(tmp_path_factory):
    """A tiny untrained 64-d rec model exported like `shitu train-rec` exports one (tests/tiny_rec.py): the
    index tests' embedder. A test module that needs another shape defines its own `rec`."""
    from tiny_rec import export_tiny_rec

    return export_tiny_rec(tmp_path_factory.mktemp("models") / "rec64", embedding_dim=64)


@pytest.fixture
def gallery(tmp_path):
    """A small drawn gallery: 4 class folders of 3 images each (the index tests' default; a module that needs
    another defines its own `gallery`)."""
    from synth import make_class_tree

    root = tmp_path / "gallery"
    make_class_tree(root, n_classes=4, per_class=3, size=64, seed=1)
    return root


@pytest.fixture
def cli():
    """Invoke `shitu ...` in-process; returns click's Result with .stdout, .stderr and .exit_code."""
    from shitu_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str | os.PathLike, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (48, 64), color: tuple[int, int, int] | None = None) -> Path:
    """A small real image file written by OpenCV (BGR on disk, like any camera JPEG)."""
    import cv2

    rng = np.random.default_rng(seed)
    height, width = size
    if color is None:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        pixels = np.full((height, width, 3), color, np.uint8)
        pixels = np.clip(pixels.astype(int) + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix or ".jpg", pixels)
    assert ok
    path.write_bytes(encoded.tobytes())
    return path
