"""The design card's four usages, typed exactly as written there, in a folder laid out as a user would have it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image

DEMO_GALLERY = Path(__file__).resolve().parent.parent / "assets" / "demo" / "gallery"
CLASSES = ("astronaut", "cat", "coffee cup")


def shell(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `line` through /bin/sh as typed, with the venv's `shitu` first on PATH."""
    return subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """products/ (a dataset to split), gallery/ (real photos in label folders) and img.jpg (another photo)."""
    root = tmp_path_factory.mktemp("project")
    for c, name in enumerate(("cola", "green tea")):
        for i in range(5):
            write_image(root / "products" / name / f"{i}.jpg", seed=10 * c + i, size=(24, 24))
    for name in CLASSES:
        (root / "gallery" / name).mkdir(parents=True)
        for i in (0, 1):
            shutil.copy(DEMO_GALLERY / name / f"{i}.jpg", root / "gallery" / name / f"{i}.jpg")
    shutil.copy(DEMO_GALLERY / "coffee cup" / "2.jpg", root / "img.jpg")
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "SHITU_HOME": str(home / ".shitu"),
           "NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("SHITU_INDEX", "SHITU_REC"):
        env.pop(key, None)
    return root, env


def test_the_four_lines_run_as_typed(project):
    root, env = project

    split = shell("shitu split-dataset --val 0.2 --test 0.1", root / "products", env)
    assert split.returncode == 0, split.stderr
    assert all((root / "products" / f"{p}_list.txt").is_file() for p in ("train", "val", "test"))
    assert (root / "products" / "labels.txt").read_text(encoding="utf-8") == "cola\ngreen tea\n"

    build = shell("shitu build-index gallery/", root, env)
    assert build.returncode == 0, build.stderr
    assert f"the index is {root / 'index'}" in build.stderr
    assert "built-in demo recogniser" in build.stderr
    assert (root / "index" / "manifest.yaml").is_file()

    bench = shell("shitu benchmark-cpu --threads 10 --mkldnn", root, env)
    assert bench.returncode == 0, bench.stderr
    assert "paddle fp32 10t onednn" in bench.stdout
    assert ("exceeds the" in bench.stderr) == (len(os.sched_getaffinity(0)) < 10)

    predict = shell("shitu predict img.jpg", root, env)
    assert predict.returncode == 0, predict.stderr
    assert f"using {root / 'index'}" in predict.stderr
    assert "coffee cup" in predict.stdout

    for result in (split, build, bench, predict):
        assert "Traceback" not in result.stderr


def test_an_unquoted_glob_predicts_every_file_it_expands_to(project):
    root, env = project
    shots = root / "shots"
    shots.mkdir(exist_ok=True)
    for name in CLASSES:
        shutil.copy(DEMO_GALLERY / name / "2.jpg", shots / f"{name.replace(' ', '_')}.jpg")
    if not (root / "index" / "manifest.yaml").is_file():
        assert shell("shitu build-index gallery/", root, env).returncode == 0

    result = shell("shitu predict shots/*.jpg --json", root, env)

    assert result.returncode == 0, result.stderr
    images = json.loads(result.stdout)["images"]
    assert sorted(Path(i["path"]).name for i in images) == ["astronaut.jpg", "cat.jpg", "coffee_cup.jpg"]
