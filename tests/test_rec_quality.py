"""What train-rec may claim about a run: better than untrained or not, best epoch told apart from noise."""

from __future__ import annotations

import json

import pytest

from shitu_cli.train.rec_quality import quality_notes, standard_error


def test_standard_error_is_the_binomial_one_and_infinite_without_queries():
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(0.0, 100) == 0.0
    assert standard_error(0.3, 0) == float("inf")


def _history(values):
    return [{"epoch": i + 1, "loss": 1.0, "mAP": v} for i, v in enumerate(values)]


def test_a_model_no_better_than_untrained_is_named():
    # 400 queries, mAP 0.30 vs 0.29 untrained: 2 standard errors are ~0.046, so this is nothing.
    notes = quality_notes({"mAP": 0.29}, {"mAP": 0.30}, _history([0.28, 0.30, 0.29]), "mAP", 2, 400)
    assert any("no better than the untrained net" in n and "400 held-out queries" in n for n in notes), notes


def test_a_clear_gain_with_enough_queries_says_nothing():
    notes = quality_notes({"mAP": 0.20}, {"mAP": 0.45}, _history([0.30, 0.40, 0.45]), "mAP", 3, 400)
    assert notes == []


def test_a_flat_curve_makes_the_best_epoch_an_arbitrary_pick():
    notes = quality_notes({"mAP": 0.10}, {"mAP": 0.41}, _history([0.40, 0.41, 0.40]), "mAP", 2, 400)
    assert len(notes) == 1 and "within noise over all 3 evaluated epochs" in notes[0], notes


def test_few_queries_are_called_noisy():
    notes = quality_notes({"recall1": 0.1}, {"recall1": 0.9}, [{"epoch": 1, "recall1": 0.9}], "recall1", 1, 12)
    assert len(notes) == 1 and notes[0].startswith("only 12 held-out queries"), notes


def test_train_rec_warns_when_it_learned_nothing(cli, tmp_path):
    """A run whose learning rate is too small to move the weights exports an untrained-level model: say so."""
    from synth import make_class_tree

    root = tmp_path / "data"
    make_class_tree(root, n_classes=6, per_class=8, size=48, seed=11)
    result = cli("train-rec", root, "-o", tmp_path / "run", "--recipe", "tiny", "--epochs", "1", "--input-size", "48",
                 "--lr", "1e-9", "--num-workers", "0", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["best_metric"] == "mAP"
    assert any("no better than the untrained net" in w for w in summary["warnings"]), summary["warnings"]
    assert "no better than the untrained net" in " ".join(result.stderr.split())
