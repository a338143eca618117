"""`shitu demo` end to end on the shipped photos and models, and its scoring rule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from shitu_cli import demo

# The built-in models find most demo objects; the margin below the measured recall
# (see CHANGELOG / README) absorbs CPU-to-CPU float differences, not regressions.
MIN_RECALL = 0.8  # measured: 16 of 17 objects (0.94)
# Boxes that cover no object: measured 0 with predict's defaults (6 before the cover rule; PaddleClas 0, benchmarks/vs_paddleclas.md).
MAX_EXTRA_BOXES = 1


def test_demo_recognises_the_shipped_queries(cli, tmp_path):
    result = cli("demo", "--work", tmp_path, "--json")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["models"]["source"] == "built-in"
    assert report["objects"] >= 12
    assert report["recall"] >= MIN_RECALL
    assert report["extra_results"] <= MAX_EXTRA_BOXES
    assert report["precision"] == pytest.approx(report["right_boxes"] / report["boxes"], abs=1e-4)
    assert report["precision"] >= report["found"] / (report["found"] + MAX_EXTRA_BOXES + 1)
    drawn = sorted(p.name for p in (tmp_path / "vis").iterdir())
    assert drawn == sorted(f"scene_{i:03d}.jpg" for i in range(len(report["results"])))


def test_demo_table_and_second_run_reuses_the_index(cli, tmp_path):
    first = cli("demo", "--work", tmp_path, "--no-vis")
    second = cli("demo", "--work", tmp_path, "--no-vis", "--json")

    assert first.exit_code == 0, first.stderr
    assert "recall on the demo queries" in first.stdout and "precision:" in first.stdout
    assert "models: built-in" in first.stdout
    index = json.loads(second.stdout)["index"]
    assert (index["added"], index["unchanged"]) == (0, index["count"])
    assert not (tmp_path / "vis").exists()


def test_missing_demo_models_exit_2_with_the_fix(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_MODELS", tmp_path / "nothing")
    result = cli("demo", "--work", tmp_path)
    assert result.exit_code == 2
    assert "shitu demo --rebuild" in result.stderr


def _result(path, *recognitions):
    return SimpleNamespace(path=path, recognitions=[SimpleNamespace(box=b, label=l, score=s) for b, l, s in recognitions])


def test_score_needs_the_right_label_and_overlap():
    truth = {"a.jpg": [{"label": "cat", "box": [0, 0, 10, 10]}, {"label": "cup", "box": [20, 20, 30, 30]}],
             "b.jpg": [{"label": "cat", "box": [0, 0, 10, 10]}]}
    results = [
        _result("a.jpg", ([0, 0, 10, 9], "cat", 0.9), ([20, 20, 30, 30], "cat", 0.8), ([50, 50, 60, 60], "cup", 0.7)),
        _result("b.jpg", ([0, 0, 3, 3], "cat", 0.9)),  # right label, too small an overlap
    ]
    scoring = demo.score(results, truth)
    assert [c.correct for c in scoring.checks] == [True, False, False]
    assert scoring.checks[1].found_label == "cat"
    assert scoring.extra == 2  # the far-away cup in a.jpg, and the tiny box in b.jpg
    assert (scoring.right, scoring.boxes) == (1, 4)  # the mislabelled cat on the cup covers an object, but wrongly
