"""Distillation: the KL-at-temperature loss behaves, and --teacher / --unlabeled runs work end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from synth import make_class_tree

TINY = ("--recipe", "recipes/cls/tiny.yml", "--input-size", "32", "--batch-size", "16")


def _tensor(values):
    import paddle

    return paddle.to_tensor(np.asarray(values, dtype="float32"))


def test_kl_is_zero_when_student_equals_teacher_and_positive_otherwise():
    from shitu_cli.train.distill import kl_at_temperature

    logits = _tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    for temperature in (1.0, 4.0):
        assert float(kl_at_temperature(logits, logits, temperature)) == pytest.approx(0.0, abs=1e-6)
        # Shifting every logit of a row by a constant leaves its softmax, so the KL, unchanged.
        assert float(kl_at_temperature(logits + 5.0, logits, temperature)) == pytest.approx(0.0, abs=1e-5)
    other = _tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(kl_at_temperature(other, logits, 4.0)) > 0.01


def test_kl_matches_a_direct_computation_and_pulls_the_student_toward_the_teacher():
    from shitu_cli.train.distill import kl_at_temperature

    student, teacher, t = np.array([[1.0, 0.0, -1.0]]), np.array([[0.0, 1.0, 0.5]]), 2.0
    p = np.exp(teacher / t) / np.exp(teacher / t).sum()
    q = np.exp(student / t) / np.exp(student / t).sum()
    expected = (p * np.log(p / q)).sum() * t * t
    student_tensor = _tensor(student)
    student_tensor.stop_gradient = False
    loss = kl_at_temperature(student_tensor, _tensor(teacher), t)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # Gradient descent moves the student's logits toward the teacher's ranking.
    step = -student_tensor.grad.numpy()[0]
    assert step[1] > 0 > step[0]


def test_unlabelled_rows_feed_only_the_kl_term():
    from shitu_cli.train.distill import distillation_loss, kl_at_temperature, soft_cross_entropy

    student = _tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.2]])
    teacher = _tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    targets = _tensor([[1.0, 0.0], [0.0, 1.0]])  # two labelled rows, one unlabelled
    loss, logs = distillation_loss(student, teacher, targets, 4.0, 0.5)
    ce = float(soft_cross_entropy(student[:2], targets))
    kl = float(kl_at_temperature(student, teacher, 4.0))
    assert float(loss) == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-5)
    assert set(logs) == {"ce", "kl"}


def _invoke(*args):
    from shitu_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    make_class_tree(root / "data", n_classes=3, per_class=12, size=40, seed=5)
    make_class_tree(root / "extra", n_classes=3, per_class=4, size=40, seed=9)
    result = _invoke("train-cls", root / "data", "-o", root / "teacher", *TINY, "--epochs", "2", "--json")
    assert result.exit_code == 0, result.stderr
    return root


@pytest.mark.parametrize("teacher_path", ["teacher", "teacher/export", "teacher/checkpoints/best.pdparams"])
def test_teacher_in_each_form_and_unlabelled_images_train(teacher_run, teacher_path, tmp_path):
    result = _invoke("train-cls", teacher_run / "data", "-o", tmp_path / "student", *TINY, "--epochs", "1",
                     "--teacher", teacher_run / teacher_path, "--unlabeled", teacher_run / "extra", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["teacher"].endswith(teacher_path.split("/")[-1])
    assert summary["unlabeled_images"] == 12
    assert (tmp_path / "student" / "export" / "shitu.yaml").is_file()


def test_teacher_trained_on_other_classes_exits_2(teacher_run, tmp_path, cli):
    make_class_tree(tmp_path / "four", n_classes=4, per_class=6, size=40)
    result = cli("train-cls", tmp_path / "four", "-o", tmp_path / "run", *TINY, "--teacher", teacher_run / "teacher" / "export")
    assert result.exit_code == 2
    assert "teacher" in result.stderr and "export" in result.stderr


def test_unlabelled_images_without_a_teacher_exit_2(teacher_run, tmp_path, cli):
    result = cli("train-cls", teacher_run / "data", "-o", tmp_path / "run", *TINY, "--unlabeled", teacher_run / "extra")
    assert result.exit_code == 2
    assert "--teacher" in result.stderr
