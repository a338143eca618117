"""Output the OS refuses (read-only folder, full disk, a file in the way): one line naming the path, no traceback,
nothing half-written. Root ignores permission bits, so read-only means `chattr +i`; a full disk is a filled tmpfs."""

from __future__ import annotations

import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import write_image
from synth import make_class_tree
from tiny_rec import export_tiny_rec


def _run(*command: str) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


@contextmanager
def read_only(folder: Path):
    """`folder` (created) made immutable; skips the test where that is not possible or not enforced."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _run("chattr", "+i", str(folder)):
        pytest.skip("chattr +i is not available here")
    try:
        probe = folder / f"probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("an immutable folder still took a write here")
        yield folder
    finally:
        _run("chattr", "-i", str(folder))


@contextmanager
def full_disk(mount_point: Path):
    """A small tmpfs at `mount_point`, filled up; skips where mounting is not allowed."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if not _run("mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        _run("umount", "-l", str(mount_point))


def fill(mount_point: Path) -> None:
    with open(mount_point / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def one_line_error(result, needle: str, path: Path, code: int) -> None:
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and needle in lines[-1] and str(path) in lines[-1], result.stderr


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return export_tiny_rec(tmp_path_factory.mktemp("models") / "rec16", embedding_dim=16)


@pytest.fixture
def dataset(tmp_path):
    for c, name in enumerate(("cola", "tea")):
        for i in range(5):
            write_image(tmp_path / "data" / name / f"{i}.jpg", seed=10 * c + i, size=(16, 16))
    return tmp_path / "data"


# --- split-dataset


def test_split_into_a_read_only_folder(cli, dataset, tmp_path):
    with read_only(tmp_path / "lists") as out:
        result = cli("split-dataset", dataset, "--out", out)
    one_line_error(result, "cannot write here", out, 2)
    assert list(out.iterdir()) == []


def test_split_of_a_read_only_dataset_in_place(cli, dataset):
    with read_only(dataset):
        result = cli("split-dataset", dataset)
    one_line_error(result, "cannot write here", dataset, 2)


def test_split_onto_a_full_disk_writes_nothing(cli, dataset, tmp_path):
    with full_disk(tmp_path / "disk") as disk:
        out = disk / "lists"
        out.mkdir()
        fill(disk)
        result = cli("split-dataset", dataset, "--out", out)
        left = sorted(p.name for p in out.iterdir())
    one_line_error(result, "no space left", out, 1)
    assert left == []  # no list, no temp file


# --- build-index


def test_build_index_into_a_read_only_folder_leaves_nothing(cli, rec, tmp_path):
    make_class_tree(tmp_path / "gallery", n_classes=2, per_class=2, size=32)
    with read_only(tmp_path / "ro") as parent:
        new_inside = cli("build-index", tmp_path / "gallery", "-o", parent / "index", "--rec", rec)
        existing = cli("build-index", tmp_path / "gallery", "-o", parent, "--rec", rec)
    one_line_error(new_inside, "cannot write here", parent / "index", 2)
    one_line_error(existing, "cannot write here", parent, 2)
    assert list(parent.iterdir()) == []


def test_a_first_build_on_a_full_disk_leaves_no_folder_lock_or_generation(cli, rec, tmp_path):
    make_class_tree(tmp_path / "gallery", n_classes=2, per_class=2, size=32)
    with full_disk(tmp_path / "disk") as disk:
        fill(disk)
        result = cli("build-index", tmp_path / "gallery", "-o", disk / "index", "--rec", rec)
        left = sorted(p.name for p in disk.iterdir())
    one_line_error(result, "no space left", disk / "index", 1)
    assert left == ["filler"]


def test_an_update_on_a_full_disk_keeps_the_committed_index(cli, rec, tmp_path):
    from shitu_cli.index import load_index

    make_class_tree(tmp_path / "gallery", n_classes=2, per_class=2, size=32)
    with full_disk(tmp_path / "disk") as disk:
        index = disk / "index"
        assert cli("build-index", tmp_path / "gallery", "-o", index, "--rec", rec).exit_code == 0
        before = sorted(p.name for p in index.iterdir())
        make_class_tree(tmp_path / "gallery", n_classes=3, per_class=3, size=32, seed=9)
        fill(disk)
        result = cli("build-index", tmp_path / "gallery", "-o", index, "--rec", rec)
        after = sorted(p.name for p in index.iterdir())
        (disk / "filler").unlink()
        count = load_index(index).manifest.count
    assert result.exit_code == 1 and "no space left" in result.stderr and "Traceback" not in result.stderr
    assert after == before and count == 4


# --- predict --save-vis


def test_save_vis_refuses_a_file_and_a_read_only_folder_before_any_work(cli, rec, tmp_path):
    make_class_tree(tmp_path / "gallery", n_classes=2, per_class=2, size=32)
    assert cli("build-index", tmp_path / "gallery", "-o", tmp_path / "index", "--rec", rec).exit_code == 0
    image = next((tmp_path / "gallery").rglob("*.jpg"))
    in_the_way = tmp_path / "vis.png"
    in_the_way.write_bytes(b"an earlier picture")

    on_a_file = cli("predict", image, "--index", tmp_path / "index", "--save-vis", in_the_way)

    one_line_error(on_a_file, "names a file, not a folder", in_the_way, 2)
    assert in_the_way.read_bytes() == b"an earlier picture"
    with read_only(tmp_path / "vis") as folder:
        result = cli("predict", image, "--index", tmp_path / "index", "--save-vis", folder)
    one_line_error(result, "cannot write here", folder, 2)
    assert "label" not in result.stdout  # refused before predicting
