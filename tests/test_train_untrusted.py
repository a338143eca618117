"""Weights files are pickles: every path that reads one (train --pretrained, --resume checkpoints, compress
RUN_DIR) must refuse a file that holds code, without running it, and name the file with exit 2; a checkpoint
of the wrong model is an error, not a warning."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from synth import make_class_tree
from synth_scenes import make_coco_scenes

CLS_TINY = ("--recipe", "tiny", "--input-size", "32", "--batch-size", "16")
DET_TINY = ("--recipe", "tiny", "--epochs", "1", "--batch-size", "4")


class _Payload:
    """Unpickling this creates `marker` (builtins.open): proof that code in the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"conv.weight": _Payload(marker)}, protocol=4))
    return path


def _refused(result, name: str, marker: Path) -> None:
    assert result.exit_code == 2, result.stdout + result.stderr
    assert not marker.exists(), "the pickle payload ran"
    assert name in result.stderr and "refusing to load" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    root = tmp_path_factory.mktemp("cls")
    make_class_tree(root / "data", n_classes=3, per_class=10, size=36, seed=4)
    run = root / "run"
    result = CliRunner().invoke(app, ["train-cls", str(root / "data"), "-o", str(run), *CLS_TINY, "--epochs", "1"])
    assert result.exit_code == 0, result.stderr
    return run


def test_resume_with_a_swapped_last_checkpoint_refuses_it_without_running_it(cli, cls_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cls_run, run)
    marker = tmp_path / "pwned"
    write_payload(run / "checkpoints" / "last.pdparams", marker)
    result = cli("train-cls", "-o", run, "--resume", "--epochs", "2")
    _refused(result, "last.pdparams", marker)
    assert len((run / "metrics.csv").read_text(encoding="utf-8").splitlines()) == 2  # nothing trained on


def test_resume_with_another_models_checkpoint_is_an_error_not_a_warning(cli, cls_run, tmp_path):
    import paddle

    from shitu_cli.models.ppcls import build_arch

    run = tmp_path / "run"
    shutil.copytree(cls_run, run)
    paddle.save(build_arch({"name": "PPLCNet_x0_5", "class_num": 3}).state_dict(), str(run / "checkpoints" / "last.pdparams"))
    result = cli("train-cls", "-o", run, "--resume", "--epochs", "2")
    assert result.exit_code == 2
    assert "last.pdparams" in result.stderr and "does not fit" in result.stderr and "!=" in result.stderr


def test_compress_refuses_a_swapped_best_checkpoint(cli, cls_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cls_run, run)
    marker = tmp_path / "pwned"
    write_payload(run / "checkpoints" / "best.pdparams", marker)
    result = cli("compress", run, "--calib", run / "split" / "val_list.txt", "-o", tmp_path / "small")
    _refused(result, "best.pdparams", marker)


def test_cls_pretrained_payload_is_refused(cli, cls_run, tmp_path):
    marker = tmp_path / "pwned"
    evil = write_payload(tmp_path / "evil.pdparams", marker)
    data = cls_run.parent / "data"
    result = cli("train-cls", data, "-o", tmp_path / "run", *CLS_TINY, "--pretrained", evil)
    _refused(result, "evil.pdparams", marker)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "scenes"
    make_coco_scenes(root, n_train=8, n_val=4, n_classes=2, seed=5)
    return root


def test_det_pretrained_payload_is_refused(cli, scenes, tmp_path):
    marker = tmp_path / "pwned"
    evil = write_payload(tmp_path / "evil.pdparams", marker)
    result = cli("train-det", scenes, "-o", tmp_path / "run", *DET_TINY, "--pretrained", evil)
    _refused(result, "evil.pdparams", marker)


def test_det_resume_with_a_swapped_checkpoint_is_refused(cli, scenes, tmp_path):
    run = tmp_path / "run"
    first = cli("train-det", scenes, "-o", run, *DET_TINY, "--merge-classes")
    assert first.exit_code == 0, first.stderr
    marker = tmp_path / "pwned"
    for name in ("last.pdparams", "last.pdopt"):
        saved = (run / "checkpoints" / name).read_bytes()
        write_payload(run / "checkpoints" / name, marker)
        result = cli("train-det", "-o", run, "--resume", "--epochs", "2")
        _refused(result, name, marker)
        (run / "checkpoints" / name).write_bytes(saved)
