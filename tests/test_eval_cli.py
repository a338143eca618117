"""`shitu eval` and `predict --eval` end to end, on small drawn images and a tiny untrained rec model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from synth import make_class_tree
from tiny_rec import export_tiny_rec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny rec model, a labelled gallery (4 classes x 3) and other shots of the same classes (4 x 2)."""
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    root = tmp_path_factory.mktemp("eval")
    rec = export_tiny_rec(root / "rec", embedding_dim=32)
    gallery, queries = root / "gallery", root / "queries"
    make_class_tree(gallery, n_classes=4, per_class=3, size=64, seed=2)
    make_class_tree(queries, n_classes=4, per_class=2, size=64, seed=9)
    done = CliRunner().invoke(app, ["build-index", str(gallery), "-o", str(root / "index"), "--rec", str(rec)])
    assert done.exit_code == 0, done.stderr
    return {"root": root, "rec": rec, "gallery": gallery, "queries": queries, "index": root / "index"}


def _eval(cli, *args):
    result = cli("eval", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_leave_one_out_scores_every_image_without_itself(cli, setup):
    doc = _eval(cli, setup["gallery"], "--rec", setup["rec"])
    assert doc["mode"] == "leave-one-out" and doc["queries"] == 12 and doc["gallery"] == 12 and doc["classes"] == 4
    assert all(q["nearest_path"] != q["path"] for q in doc["per_query"])  # a query never finds itself
    # recall@1 (train.metrics) and the per-query nearest labels (a separate argmax) tell the same story.
    right = sum(q["nearest_label"] == q["label"] for q in doc["per_query"]) / 12
    assert doc["metrics"]["recall1"] == pytest.approx(right)
    assert 0 <= doc["metrics"]["mAP"] <= 1 and doc["metrics"]["recall5"] >= doc["metrics"]["recall1"]
    # Passing the same folder as its own gallery is the same leave-one-out, and says so.
    same = cli("eval", setup["gallery"], "--gallery", setup["gallery"], "--rec", setup["rec"], "--json")
    assert json.loads(same.stdout)["metrics"] == doc["metrics"]
    assert "12 query image(s) are also in the gallery" in same.stderr


def test_an_exact_copy_in_the_gallery_is_found_first(cli, setup, tmp_path):
    copies = tmp_path / "copies"
    shutil.copytree(setup["gallery"], copies)
    doc = _eval(cli, setup["gallery"], "--gallery", copies, "--rec", setup["rec"], "--recall-at", "1")
    assert doc["mode"] == "gallery" and doc["metrics"]["recall1"] == 1.0 and set(doc["metrics"]) == {"recall1", "mAP"}
    for query in doc["per_query"]:
        same_file = Path(query["path"]).relative_to(setup["gallery"].resolve())
        assert Path(query["nearest_path"]).relative_to(copies.resolve()) == same_file
        assert query["score"] == pytest.approx(1.0, abs=1e-5)


def test_against_an_index_gives_what_the_gallery_folder_gives(cli, setup):
    by_index = _eval(cli, setup["queries"], "--index", setup["index"])
    by_folder = _eval(cli, setup["queries"], "--gallery", setup["gallery"], "--rec", setup["rec"])
    assert by_index["mode"] == "index" and by_index["gallery"] == 12 and by_index["queries"] == 8
    assert by_index["metrics"] == pytest.approx(by_folder["metrics"], abs=1e-5)
    assert [q["nearest_label"] for q in by_index["per_query"]] == [q["nearest_label"] for q in by_folder["per_query"]]


def test_rec_thresh_only_adds_what_predict_would_say(cli, setup):
    plain = _eval(cli, setup["queries"], "--index", setup["index"])
    assert plain["thresholded"] is None
    anything = _eval(cli, setup["queries"], "--index", setup["index"], "--rec-thresh", "-1")
    strict = _eval(cli, setup["queries"], "--index", setup["index"], "--rec-thresh", "0.999999")
    assert anything["metrics"] == plain["metrics"] == strict["metrics"]  # recall and mAP never use it
    # At -1 every query is answered: the right ones are exactly recall@1.
    assert anything["thresholded"].get("correct", 0) == round(plain["metrics"]["recall1"] * 8)
    assert "unknown" not in anything["thresholded"]
    assert strict["thresholded"] == {"unknown": 8}  # other shots never reach cosine 0.999999
    table = cli("eval", setup["queries"], "--index", setup["index"], "--rec-thresh", "0.999999")
    assert "what predict says at --rec-thresh 0.999999" in table.stdout and "recall@5" in table.stdout
    bad = cli("eval", setup["queries"], "--index", setup["index"], "--rec-thresh", "2")
    assert bad.exit_code == 2 and "--rec-thresh" in bad.stderr


def test_unreadable_queries_are_named_and_all_unreadable_fails(cli, setup, tmp_path):
    queries = tmp_path / "queries"
    shutil.copytree(setup["queries"], queries)
    label = sorted(p.name for p in queries.iterdir())[0]
    (queries / label / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = cli("eval", queries, "--index", setup["index"])
    assert result.exit_code == 0, result.stderr
    assert "broken.jpg" in result.stdout and "query:" in result.stdout
    assert "1 query image(s) could not be read" in result.stderr
    doc = _eval(cli, queries, "--index", setup["index"])
    assert doc["queries"] == 8 and [s["path"].split("/")[-1] for s in doc["skipped"]] == ["broken.jpg"]

    only_bad = tmp_path / "only_bad"
    (only_bad / label).mkdir(parents=True)
    (only_bad / label / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    failed = cli("eval", only_bad, "--index", setup["index"])
    assert failed.exit_code == 1 and "broken.jpg" in failed.stderr and "Traceback" not in failed.stderr


def test_bad_usage_is_exit_2_naming_the_input(cli, setup, tmp_path):
    both = cli("eval", setup["queries"], "--index", setup["index"], "--gallery", setup["gallery"])
    assert both.exit_code == 2 and "not both" in both.stderr
    missing = cli("eval", tmp_path / "nope", "--index", setup["index"])
    assert missing.exit_code == 2 and "nope" in missing.stderr


def test_out_writes_a_report_and_a_recipe_that_reproduces(cli, setup, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    _eval(cli, setup["queries"], "--index", setup["index"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out: nothing written, no recipe

    out = tmp_path / "ev"
    doc = _eval(cli, setup["queries"], "--index", setup["index"], "-o", out)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "recipe.yaml"]
    written = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert written["metrics"] == doc["metrics"] and len(written["per_query"]) == 8
    replay = cli("reproduce", out, "-o", tmp_path / "again", "--json")
    assert replay.exit_code == 0, replay.stderr
    assert json.loads(replay.stdout)["identical"] is True


def _eval_list(folder, lines):
    path = folder / "eval_list.txt"
    path.write_text("".join(f"{rel}\t{label}\n" for rel, label in lines), encoding="utf-8")
    return path


def test_predict_eval_names_unreadable_queries(cli, setup, tmp_path):
    queries = tmp_path / "q"
    shutil.copytree(setup["queries"], queries)
    images = sorted(queries.rglob("*.jpg"))
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows = [(p.relative_to(queries).as_posix(), p.parent.name) for p in images]
    listed = _eval_list(queries, rows + [("broken.jpg", images[0].parent.name), ("gone.jpg", images[0].parent.name)])

    result = cli("predict", "--index", setup["index"], "--eval", listed)
    assert result.exit_code == 0, result.stderr
    assert "could not read 2 query file(s)" in result.stdout
    assert "broken.jpg" in result.stdout and "gone.jpg" in result.stdout
    assert "2 of 10 queries could not be read" in result.stderr
    doc = json.loads(cli("predict", "--index", setup["index"], "--eval", listed, "--json").stdout)
    assert sorted(u["path"].split("/")[-1] for u in doc["unreadable"]) == ["broken.jpg", "gone.jpg"]
    assert all(u["reason"] for u in doc["unreadable"])


def test_predict_eval_fails_when_no_query_can_be_read(cli, setup, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    listed = _eval_list(tmp_path, [("broken.jpg", "x"), ("gone.jpg", "y")])
    result = cli("predict", "--index", setup["index"], "--eval", listed)
    assert result.exit_code == 1
    assert "none of the 2 queries could be read" in result.stderr and "broken.jpg" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_eval_reports_the_nearest_label_below_the_threshold(cli, setup, tmp_path):
    images = sorted(setup["queries"].rglob("*.jpg"))
    listed = _eval_list(tmp_path, [(p.as_posix(), p.parent.name) for p in images])
    strict = json.loads(cli("predict", "--index", setup["index"], "--eval", listed, "--rec-thresh", "0.999999", "--json").stdout)
    by_eval = _eval(cli, setup["queries"], "--index", setup["index"])
    assert strict["counts"]["unknown"] == 8 and strict["accuracy"] == 0.0
    # Ignoring the threshold, the nearest label is what `shitu eval` calls recall@1.
    assert strict["nearest_label_right"] == pytest.approx(by_eval["metrics"]["recall1"], abs=1e-4)
    text = cli("predict", "--index", setup["index"], "--eval", listed, "--rec-thresh", "0.999999")
    assert "nearest gallery label right, --rec-thresh ignored" in text.stdout and "shitu eval" in text.stdout


def test_split_dataset_rec_lists_written_elsewhere_are_read(cli, setup, tmp_path):
    dataset = tmp_path / "data"
    make_class_tree(dataset, n_classes=5, per_class=4, size=64, seed=4)
    split = cli("split-dataset", dataset, "--format", "rec", "--val", "0.4", "--test", "0.5", "--out", tmp_path / "lists")
    assert split.exit_code == 0, split.stderr
    lists = tmp_path / "lists"
    doc = _eval(cli, lists / "query_list.txt", "--gallery", lists / "gallery_list.txt", "--rec", setup["rec"])
    queries = len((lists / "query_list.txt").read_text(encoding="utf-8").splitlines())
    assert doc["skipped"] == [] and doc["queries"] == queries > 0
    predicted = cli("predict", "--index", setup["index"], "--eval", lists / "query_list.txt", "--json")
    assert predicted.exit_code == 0, predicted.stderr
    assert json.loads(predicted.stdout)["counts"]["unreadable"] == 0
