"""`--backend auto` on a model not measured yet: a short interleaved timing of the backends that agree with
Paddle decides, and the record (by model hash and CPU) answers every later call."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shitu_cli.bench.record import FASTEST_FILE, bench_dir
from shitu_cli.infer import autobackend
from shitu_cli.infer.predictor import PredictorOptions, build_predictor, installed_backends
from tests.test_predictor_backends import export_tiny

OTHER_BACKENDS = [b for b in installed_backends() if b != "paddle"]


def _record() -> dict:
    path = bench_dir() / FASTEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@pytest.mark.skipif(not OTHER_BACKENDS, reason="needs an ONNX backend")
def test_first_auto_call_measures_the_backends_and_later_calls_read_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv(autobackend.ENV_SWITCH, "1")
    model = export_tiny(tmp_path / "rec", "rec")

    chosen = build_predictor(model, PredictorOptions(backend="auto"), task="rec").backend

    (machine,) = _record().values()
    (entry,) = machine.values()
    assert set(entry["backends"]) == {"paddle", *OTHER_BACKENDS}  # every one agreed with Paddle
    assert all(len(timing["rounds"]) == autobackend.ROUNDS for timing in entry["backends"].values())
    assert chosen == entry["fastest"]
    stamp = entry["backends"]["paddle"]["measured"]
    assert build_predictor(model, PredictorOptions(backend="auto"), task="rec").backend == chosen
    (machine,) = _record().values()
    assert machine[next(iter(machine))]["backends"]["paddle"]["measured"] == stamp  # not measured again


def test_switched_off_auto_is_paddle_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(autobackend.ENV_SWITCH, "0")
    model = export_tiny(tmp_path / "cls", "cls")
    assert build_predictor(model, PredictorOptions(backend="auto")).backend == "paddle"
    assert _record() == {}


def test_bf16_and_int8_runs_are_not_measured(tmp_path, monkeypatch):
    monkeypatch.setenv(autobackend.ENV_SWITCH, "1")
    model = export_tiny(tmp_path / "cls", "cls")
    assert build_predictor(model, PredictorOptions(backend="auto", precision="bf16")).backend == "paddle"
    assert _record() == {}


def test_agreement_refuses_other_features_and_other_boxes():
    features = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    assert autobackend.agreement("rec", [features], [features * 3 + 1e-7]) == "ok"  # scale does not matter
    assert autobackend.agreement("rec", [features], [features[::-1]]).startswith("disagrees: cosine")
    logits = np.array([[1.0, 2.0, 1.999]])
    assert autobackend.agreement("cls", [logits], [logits[:, [0, 2, 1]]]) != "ok"
    boxes = np.array([[0, 0.9, 10, 10, 50, 50], [0, 0.5, 60, 60, 90, 90], [0, 0.05, 0, 0, 5, 5]], np.float32)
    assert autobackend.agreement("det", [boxes, np.array([3])], [boxes[:2], np.array([2])]) == "ok"  # the tail is ignored
    moved = boxes.copy()
    moved[1, 2:] += 8
    assert autobackend.agreement("det", [boxes, np.array([3])], [moved, np.array([3])]).startswith("disagrees: 1 of 2")


def test_interleaved_timing_gives_each_round_its_median():
    calls = []
    timings = autobackend.interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, calls=2)
    assert calls == ["a", "b", "a", "a", "b", "b", "a", "a", "b", "b"]  # warm-up, then turns
    assert {name: len(rounds) for name, (_, rounds) in timings.items()} == {"a": 2, "b": 2}
