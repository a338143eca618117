"""The public Python API: the README's five lines run as written, and importing shitu_cli stays light."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shitu_cli.demo import GALLERY, QUERIES

# The README's "Python API" block, verbatim: the test runs exactly these lines.
README_LINES = """\
from shitu_cli import Index, Pipeline
index = Index.build("gallery/", "index/")
pipe = Pipeline(index)
print(pipe("shelf.jpg").recognitions[0].label)
index.add(["my_cat.jpg"], label="cat"); index.remove("horse"); index.sync()
"""
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The demo gallery less one cat photo (kept aside as my_cat.jpg), and a demo query as shelf.jpg."""
    shutil.copytree(GALLERY, tmp_path / "gallery")
    cat = sorted((tmp_path / "gallery" / "cat").iterdir())[0]
    shutil.move(cat, tmp_path / "my_cat.jpg")
    shutil.copy(sorted((QUERIES / "images").glob("*.jpg"))[0], tmp_path / "shelf.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_lines_run_as_written(workdir, capsys):
    namespace: dict = {}
    exec(compile(README_LINES, "README", "exec"), namespace)  # noqa: S102 - the lines under test
    printed = capsys.readouterr().out.strip()
    index, pipe = namespace["index"], namespace["pipe"]
    labels = index.labels()
    assert printed in labels or printed == "unknown"
    assert "horse" not in labels and labels["cat"] == 3
    # the gallery mirrors the index: my_cat.jpg was copied in, horse's files set aside where sync skips them
    assert (workdir / "gallery" / "cat" / "my_cat.jpg").is_file()
    assert not (workdir / "gallery" / "horse").exists()
    assert len(list((workdir / "gallery" / ".removed").rglob("*.jpg"))) == 3
    # the pipeline made before the edits serves the generation they committed
    result = pipe("my_cat.jpg")
    top = result.recognitions[0]
    assert top.label == "cat" and top.score == pytest.approx(1.0, abs=1e-4)
    assert top.matches[0].gallery_path == (workdir / "gallery" / "cat" / "my_cat.jpg").as_posix()
    assert "horse" not in {m.label for r in pipe("shelf.jpg").recognitions for m in r.matches}


def test_the_readme_shows_these_lines_when_it_has_the_block():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(from shitu_cli import .*?)```", readme, flags=re.S)
    if not blocks:
        pytest.skip("README.md has no Python API block yet")
    assert blocks[0] == README_LINES


def test_add_refuses_a_bad_label_and_a_non_image_and_leaves_the_gallery_alone(workdir):
    from shitu_cli import Index
    from shitu_cli.errors import BadInput

    index = Index.build("gallery/", "index/")
    before = sorted(p.relative_to(workdir).as_posix() for p in (workdir / "gallery").rglob("*"))
    generation = index.manifest.generation
    for label in ("", "../escape", ".hidden", "a/b"):
        with pytest.raises(BadInput):
            index.add(["my_cat.jpg"], label=label)
    (workdir / "notes.jpg").write_text("not a photo", encoding="utf-8")
    with pytest.raises(BadInput, match="notes.jpg"):
        index.add(["my_cat.jpg", "notes.jpg"], label="cat")
    with pytest.raises(BadInput, match="no label 'hors'.*did you mean 'horse'"):
        index.remove("hors")
    assert sorted(p.relative_to(workdir).as_posix() for p in (workdir / "gallery").rglob("*")) == before
    assert index.manifest.generation == generation


def test_add_of_content_already_indexed_copies_nothing(workdir):
    from shitu_cli import Index

    index = Index.build("gallery/", "index/")
    again = sorted((workdir / "gallery" / "rocket").iterdir())[0]
    report = index.add([again], label="rocket")
    assert report.added == 0 and report.added_items == [] and len(report.duplicates) == 1
    assert len(list((workdir / "gallery" / "rocket").iterdir())) == 3


def test_importing_shitu_cli_loads_no_heavy_library():
    code = ("import sys, shitu_cli; assert shitu_cli.__version__;"
            "print(json.dumps(sorted(m for m in ('paddle', 'faiss', 'cv2', 'ppdet', 'fastapi') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert "Pipeline" in dir(__import__("shitu_cli"))


def test_add_indexes_only_its_own_images_and_sync_catches_up(workdir):
    from shitu_cli import Index

    index = Index.build("gallery/", "index/")
    stray = workdir / "gallery" / "rocket" / "dropped-in.jpg"
    shutil.copy(workdir / "shelf.jpg", stray)  # put there by hand, not through the API
    report = index.add(["my_cat.jpg"], label="cat")
    assert [path for _, path in report.added_items] == [(workdir / "gallery" / "cat" / "my_cat.jpg").as_posix()]
    indexed = {item.path for item in index.load().items.values()}
    assert stray.as_posix() not in indexed  # an add hashes and embeds its own files only
    assert index.sync().added == 1 and stray.as_posix() in {item.path for item in index.load().items.values()}
