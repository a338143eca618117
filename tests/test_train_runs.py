"""Run folders of `shitu train-cls` as a user meets them: an earlier run is never overwritten, --resume goes on
with the run's own settings (and a new --epochs), a signal stops a run cleanly, split-dataset --out lists and
lists with unreadable images train."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import write_image
from synth import make_class_tree
from training_runs import signal_when

# A shipped recipe by name (item: `--recipe tiny` used to say "file not found" in train-cls).
TINY = ("--recipe", "tiny", "--input-size", "32", "--batch-size", "16")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    make_class_tree(root, n_classes=4, per_class=12, size=40, seed=3)
    return root


def _rows(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()[1:]


def test_a_run_is_not_overwritten_and_resume_keeps_its_own_model_and_takes_more_epochs(cli, shapes, tmp_path):
    run = tmp_path / "runs" / "cls"
    first = cli("train-cls", shapes, "-o", run, *TINY, "--epochs", "1", "--json")
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["model"] == "PPLCNet_x0_25"  # the tiny recipe's model, not the default x1_0
    rows = _rows(run)

    again = cli("train-cls", shapes, "-o", run, *TINY, "--epochs", "1")
    assert again.exit_code == 2
    assert "already holds a training run" in again.stderr and "--resume" in again.stderr
    assert str(tmp_path / "runs" / "cls2") in again.stderr
    assert _rows(run) == rows

    # No recipe, no model flag, no dataset: everything comes from the run's recipe.yaml.
    more = cli("train-cls", "-o", run, "--resume", "--epochs", "2", "--json")
    assert more.exit_code == 0, more.stderr
    summary = json.loads(more.stdout)
    assert summary["model"] == "PPLCNet_x0_25" and summary["epochs"] == 2 and summary["epochs_done"] == 2
    assert [r.split(",")[0] for r in _rows(run)] == ["1", "2"] and _rows(run)[0] == rows[0]

    changed = cli("train-cls", shapes, "-o", run, "--resume", "--lr", "0.5", "--model", "PPLCNet_x0_5")
    assert changed.exit_code == 2
    assert "lr" in changed.stderr and "0.5" in changed.stderr and "model" in changed.stderr
    assert "Traceback" not in changed.stderr

    fewer = cli("train-cls", "-o", run, "--resume", "--epochs", "1", "--json")  # fewer than done: export as is
    assert fewer.exit_code == 0, fewer.stderr
    assert json.loads(fewer.stdout)["epochs_done"] == 2 and len(_rows(run)) == 2

    nothing = cli("train-cls", shapes, "-o", tmp_path / "fresh", "--resume")
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.stderr


@pytest.mark.slow  # the same stop path runs in CI through train-rec (SIGINT) and train-det (SIGTERM)
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_keeps_the_checkpoint_and_exports_the_best_epoch(shapes, tmp_path, signal_number):
    run = tmp_path / "run"
    state = run / "checkpoints" / "last_state.yaml"
    code, stderr = signal_when(["train-cls", shapes, "-o", run, *TINY, "--epochs", "500"], state.is_file, signal_number)
    assert code == 128 + signal_number
    assert "Traceback" not in stderr and "FatalError" not in stderr
    name = signal.Signals(signal_number).name
    assert f"stopped by {name}" in stderr and "--resume" in stderr
    assert (run / "checkpoints" / "last.pdparams").is_file()
    assert (run / "export" / "inference.pdiparams").is_file() and (run / "export" / "shitu.yaml").is_file()
    rows = _rows(run)
    assert 1 <= len(rows) < 500


def test_lists_written_by_split_dataset_out_train(cli, shapes, tmp_path):
    lists = tmp_path / "lists"
    split = cli("split-dataset", shapes, "--val", "0.25", "--test", "0", "--out", lists)
    assert split.exit_code == 0, split.stderr
    result = cli("train-cls", lists, "-o", tmp_path / "run", *TINY, "--epochs", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["train_images"] + summary["val_images"] == 48 and summary["skipped"] == []


def test_unreadable_images_in_lists_are_skipped_and_named(cli, shapes, tmp_path):
    data = tmp_path / "data"
    lists = tmp_path / "lists"
    for folder in shapes.iterdir():
        for image in folder.iterdir():
            (data / folder.name).mkdir(parents=True, exist_ok=True)
            (data / folder.name / image.name).write_bytes(image.read_bytes())
    assert cli("split-dataset", data, "--val", "0.25", "--test", "0", "--out", lists).exit_code == 0
    broken = sorted(data.glob("*/*.jpg"))[0]
    rel = broken.relative_to(data).as_posix()
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG, listed in train or val

    result = cli("train-cls", lists, "-o", tmp_path / "run", *TINY, "--epochs", "1", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [s["path"] for s in summary["skipped"]] == [rel]
    assert "truncated" in summary["skipped"][0]["reason"] or "corrupt" in summary["skipped"][0]["reason"]
    assert summary["train_images"] + summary["val_images"] == 47

    table = cli("train-cls", lists, "-o", tmp_path / "run2", *TINY, "--epochs", "1")
    assert table.exit_code == 0, table.stderr
    assert "skipped images" in table.stdout and rel in table.stdout


def test_unreadable_files_in_class_folders_are_named(cli, shapes, tmp_path):
    data = tmp_path / "data"
    for folder in shapes.iterdir():
        (data / folder.name).mkdir(parents=True)
        for image in folder.iterdir():
            (data / folder.name / image.name).write_bytes(image.read_bytes())
    first_class = sorted(p.name for p in data.iterdir())[0]
    (data / first_class / "notes.jpg").write_text("not an image", encoding="utf-8")
    write_image(data / first_class / "extra.jpg", seed=9, size=(40, 40))

    result = cli("train-cls", data, "-o", tmp_path / "run", *TINY, "--epochs", "1", "--json")
    assert result.exit_code == 0, result.stderr
    skipped = json.loads(result.stdout)["skipped"]
    assert [s["path"] for s in skipped] == [f"{first_class}/notes.jpg"]


def test_only_a_folder_with_a_finished_epoch_counts_as_a_run(tmp_path):
    from shitu_cli.train.run_dir import holds_run, next_free

    run = tmp_path / "cls"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("kind: shitu-recipe\n", encoding="utf-8")  # stopped before epoch 1 ended
    assert not holds_run(run)
    (run / "metrics.csv").write_text("epoch,loss\n1,0.5\n", encoding="utf-8")
    assert holds_run(run) and next_free(run) == tmp_path / "cls2"
    (tmp_path / "cls2" / "export").mkdir(parents=True)
    (tmp_path / "cls2" / "export" / "shitu.yaml").write_text("task: cls\n", encoding="utf-8")
    assert next_free(run) == tmp_path / "cls3" and next_free(tmp_path / "cls2") == tmp_path / "cls3"
