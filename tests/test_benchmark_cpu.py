"""`shitu benchmark-cpu` on tiny exported models and real image files: table, JSON, sweep, log, failures."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from shitu_cli.infer.predictor import installed_backends
from tests.synth import make_class_tree
from tests.test_predictor_backends import export_tiny

BACKENDS = installed_backends()
FAST = ("--warmup", "1", "--runs", "1")


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_class_tree(root / "images", n_classes=2, per_class=2, size=48)
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    models = {task: export_tiny(root / task, task) for task in ("cls", "rec")}
    return {"images": root / "images", **models}


def _bench(cli, inputs, *extra):
    return cli("benchmark-cpu", "--cls", inputs["cls"], "--rec", inputs["rec"], "--images", inputs["images"], *FAST, *extra)


def test_json_has_every_setting_of_the_sweep(cli, bench_inputs):
    result = _bench(cli, bench_inputs, "--threads", "1,2", "--backend", ",".join(BACKENDS), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["results"]
    assert [(r["backend"], r["threads"]) for r in rows] == [(b, t) for b in BACKENDS for t in (1, 2)]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert sum(r["fastest"] for r in rows) == 1
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert report["images"] == 4 and len(report["skipped_images"]) == 1  # the broken file is reported, not timed
    assert {m["task"] for m in report["models"]} == {"cls", "rec"}
    assert set(report["system"]["simd"]) == {"avx2", "avx512", "vnni", "bf16", "amx"}
    assert report["system"]["versions"]["paddlepaddle"] == "3.3.1"
    stages = [s["stage"] for s in rows[0]["stages"]]
    assert stages == ["decode", "crop + rec preprocess", "rec inference", "cls preprocess", "cls inference", "end to end"]
    for stage in rows[0]["stages"]:
        assert stage["p50"] <= stage["p90"] <= stage["p99"]
        assert stage["samples"] == 4
    for row in rows:  # every backend computes the same function: fp32 outputs agree with the reference
        assert row["agreement"]["rec cosine"] > 0.999
        assert row["agreement"]["cls top-1"] == 1.0
        assert row["size_mb"] > 0 and row["fps"] > 0


def test_table_header_and_csv_log(cli, bench_inputs):
    result = _bench(cli, bench_inputs, "--mkldnn-both")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in ("CPU:", "SIMD:", "paddlepaddle 3.3.1", "images: 4", "1 unreadable skipped",
                 "setting", "status", "size MB", "ms/img p50", "p99", "FPS", "vs first", "fastest",
                 "paddle fp32 1t onednn", "paddle fp32 1t no-onednn", "per stage", "rec inference", "end to end"):
        assert text in out, text
    log_path = os.path.join(os.environ["SHITU_HOME"], "bench", "benchmark-cpu.csv")
    assert "logged to" in out and "benchmark-cpu.csv" in out
    _bench(cli, bench_inputs, "--threads", "2")
    with open(log_path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["setting"] for r in rows] == ["paddle fp32 1t onednn", "paddle fp32 1t no-onednn", "paddle fp32 2t onednn"]
    assert all(r["status"] == "ok" and float(r["ms_p50"]) > 0 for r in rows)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs an ONNX backend")
def test_a_backend_that_cannot_load_the_model_is_a_failed_row(cli, bench_inputs, tmp_path):
    model = tmp_path / "cls"
    shutil.copytree(bench_inputs["cls"], model)
    other = BACKENDS[1]
    first = cli("benchmark-cpu", "--cls", model, "--images", bench_inputs["images"], "--backend", f"paddle,{other}", *FAST, "--json")
    assert [r["status"] for r in json.loads(first.stdout)["results"]] == ["ok", "ok"]
    from shitu_cli.infer.predictor import onnx_cache_dir
    from shitu_cli.models.manifest import read_model_manifest

    (onnx_cache_dir(model, read_model_manifest(model)) / "model.onnx").write_bytes(b"this is not an onnx protobuf")
    result = cli("benchmark-cpu", "--cls", model, "--images", bench_inputs["images"], "--backend", f"paddle,{other}", *FAST)
    assert result.exit_code == 0
    assert "failed:" in result.stdout and "model.onnx" in result.stdout
    report = json.loads(cli("benchmark-cpu", "--cls", model, "--images", bench_inputs["images"],
                            "--backend", f"paddle,{other}", *FAST, "--json").stdout)
    paddle_row, broken_row = report["results"]
    assert paddle_row["status"] == "ok" and paddle_row["fastest"]
    assert broken_row["status"].startswith("failed: ") and broken_row["ms_p50"] is None


def test_precision_rows_report_what_they_cannot_do(cli, bench_inputs):
    result = _bench(cli, bench_inputs, "--precision", "all", "--backend", ",".join(BACKENDS), "--json")
    assert result.exit_code == 0, result.stderr
    rows = {(r["backend"], r["precision"]): r for r in json.loads(result.stdout)["results"]}
    assert rows[("paddle", "fp32")]["status"] == "ok"
    assert rows[("paddle", "bf16")]["status"] == "ok"
    assert "cls top-1" in rows[("paddle", "bf16")]["agreement"]
    assert rows[("paddle", "int8")]["status"].startswith("skipped: no int8 model")
    if "onnxruntime" in BACKENDS:
        assert rows[("onnxruntime", "bf16")]["status"].startswith("failed: ") and "bf16" in rows[("onnxruntime", "bf16")]["status"]


def test_benchmark_records_the_fastest_backend_for_auto(cli, bench_inputs):
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    result = cli("benchmark-cpu", "--cls", bench_inputs["cls"], "--images", bench_inputs["images"],
                 "--backend", ",".join(BACKENDS), *FAST, "--json")
    report = json.loads(result.stdout)
    record = json.loads(open(report["record_path"], encoding="utf-8").read())
    (entry,) = [machine[h] for machine in record.values() for h in machine]
    assert set(entry["backends"]) == set(BACKENDS)
    chosen = build_predictor(bench_inputs["cls"], PredictorOptions(backend="auto")).backend
    assert chosen == entry["fastest"]


def test_bad_usage_is_one_line_exit_2(cli, bench_inputs, tmp_path):
    for args, needle in [
        (("--rec", tmp_path / "missing", "--images", bench_inputs["images"]), "missing"),
        (("--cls", bench_inputs["cls"], "--images", bench_inputs["images"], "--backend", "tensorrt"), "tensorrt"),
        (("--cls", bench_inputs["cls"], "--images", bench_inputs["images"], "--threads", "0"), "--threads"),
        (("--cls", bench_inputs["cls"], "--images", tmp_path), "no readable images"),
        (("--cls", bench_inputs["cls"], "--images", bench_inputs["images"], "--int8", bench_inputs["rec"]), "expects an int8 model"),
    ]:
        result = cli("benchmark-cpu", *args)
        assert result.exit_code == 2, args
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_mkldnn_is_a_flag_like_predicts(cli, bench_inputs):
    on = json.loads(_bench(cli, bench_inputs, "--mkldnn", "--json").stdout)["results"]
    off = json.loads(_bench(cli, bench_inputs, "--no-mkldnn", "--json").stdout)["results"]

    assert [r["setting"] for r in on] == ["paddle fp32 1t onednn"]
    assert [r["setting"] for r in off] == ["paddle fp32 1t no-onednn"]


def test_more_threads_than_usable_cores_is_warned_not_refused(cli, bench_inputs):
    usable = len(os.sched_getaffinity(0))

    result = _bench(cli, bench_inputs, "--threads", f"1,{usable + 1}", "--json")

    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert len(notes) == 1 and f"--threads {usable + 1} exceeds the {usable} CPU core(s)" in notes[0]
    assert "warning:" in result.stderr and f"exceeds the {usable} CPU core(s)" in result.stderr
    quiet = _bench(cli, bench_inputs, "--threads", "1", "--json")
    assert json.loads(quiet.stdout)["notes"] == [] and "exceeds" not in quiet.stderr


def test_default_run_without_demo_models_names_what_to_pass(cli, tmp_path, monkeypatch):
    from shitu_cli import demo

    monkeypatch.setattr(demo, "DEMO_MODELS", tmp_path / "demo" / "models")
    result = cli("benchmark-cpu")
    assert result.exit_code == 2
    assert "--rec DIR" in result.stderr and "--images DIR" in result.stderr


def test_index_adds_the_search_stage_with_the_index_model(cli, bench_inputs, tmp_path):
    gallery = tmp_path / "gallery"
    make_class_tree(gallery, n_classes=2, per_class=2, size=48, seed=5)
    built = cli("build-index", gallery, "--rec", bench_inputs["rec"], "-o", tmp_path / "index")
    assert built.exit_code == 0, built.stderr
    result = cli("benchmark-cpu", "--index", tmp_path / "index", "--images", bench_inputs["images"], *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [m["task"] for m in report["models"]] == ["rec"]  # the index's own model
    assert [s["stage"] for s in report["results"][0]["stages"]] == [
        "decode", "crop + rec preprocess", "rec inference", "search", "end to end"]


@pytest.mark.slow
def test_full_pipeline_with_a_trained_detector(cli, bench_inputs, tmp_path):
    from tests.synth_scenes import make_coco_scenes

    make_coco_scenes(tmp_path / "scenes", n_train=8, n_val=4, n_classes=2, seed=3)
    trained = cli("train-det", tmp_path / "scenes", "-o", tmp_path / "det", "--recipe", "tiny", "--epochs", "1",
                  "--batch-size", "4", "--merge-classes")
    assert trained.exit_code == 0, trained.stderr
    result = cli("benchmark-cpu", "--det", tmp_path / "det" / "export", "--rec", bench_inputs["rec"],
                 "--images", tmp_path / "scenes" / "images", "--backend", ",".join(BACKENDS), *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert sum(report["boxes_per_image"].values()) == report["images"] == 12
    stages = [s["stage"] for s in report["results"][0]["stages"]]
    assert stages[:4] == ["decode", "det preprocess", "det inference", "det postprocess"]
    # train-det exports convert to ONNX (their upsampling is written so paddle2onnx 2.1 reads it)
    assert [row["status"] for row in report["results"]] == ["ok"] * len(report["results"])


def test_settings_take_turns_and_report_a_spread(cli, bench_inputs):
    """Two settings, three passes each, loaded first and then timed in rounds (A B A B A B)."""
    from shitu_cli.bench.runner import BenchOptions, benchmark

    steps = []
    report = benchmark({"rec": bench_inputs["rec"]}, bench_inputs["images"],
                       BenchOptions(threads=(1, 2), warmup=1, runs=3), progress=lambda n, **info: steps.append(info["setting"]),
                       record=False)
    assert steps == ["loading paddle fp32 1t onednn", "loading paddle fp32 2t onednn",
                     "round 1 of 3", "round 2 of 3", "round 3 of 3"]
    from shitu_cli.infer.options import DEFAULTS

    assert report.pipeline == {"topk": DEFAULTS.topk, "det_thresh": DEFAULTS.det_thresh, "max_boxes": DEFAULTS.max_boxes,
                               "whole_image": DEFAULTS.whole_image}  # predict's, so boxes per image are predict's
    for row in report.results:
        assert row.ms_spread is not None and row.ms_spread >= 0
        for stage in row.stages:
            assert stage.passes == 3 and stage.samples == 3 * report.images
    result = _bench(cli, bench_inputs, "--runs", "3")
    assert "±" in result.stdout and "taking turns" in result.stdout


def test_the_spread_is_half_the_range_of_the_pass_medians():
    from shitu_cli.bench.timing import StageTimer

    timer = StageTimer()
    for pass_values in ([1.0, 2.0, 30.0], [4.0, 5.0, 6.0]):  # medians 2 and 5
        for value in pass_values:
            timer.samples["rec inference"].append(value)
        timer.close_pass()
    (stats,) = timer.stats(["rec inference"])
    assert (stats.p50, stats.spread, stats.passes, stats.samples) == (4.5, 1.5, 2, 6)


def test_auto_keeps_paddle_unless_another_backend_wins_by_more_than_the_noise():
    from shitu_cli.bench.record import clear_winner

    def timing(ms, spread):
        return {"ms_p50": ms, "ms_spread": spread}

    assert clear_winner({"paddle": timing(10.0, 0.5), "onnxruntime": timing(4.0, 0.5)}) == "onnxruntime"
    assert clear_winner({"paddle": timing(10.0, 2.0), "onnxruntime": timing(9.0, 2.0)}) == "paddle"  # within the noise
    assert clear_winner({"paddle": timing(10.0, 0.0), "onnxruntime": timing(9.0, 0.0)}) == "onnxruntime"
    assert clear_winner({"onnxruntime": timing(4.0, 1.0), "openvino": timing(3.9, 1.0)}) == "openvino"  # no default measured
    assert clear_winner({"paddle": timing(3.0, 1.0), "openvino": timing(5.0, 0.1)}) == "paddle"


def test_auto_pairs_the_rounds_of_one_measurement():
    from shitu_cli.bench.record import clear_winner

    def timing(rounds, stamp="t1"):
        return {"ms_p50": float(np.median(rounds)), "ms_spread": (max(rounds) - min(rounds)) / 2, "rounds": rounds, "measured": stamp}

    # load swung both 3x, but onnxruntime was faster in every round: a clear win despite the wide spreads
    assert clear_winner({"paddle": timing([10, 30, 12]), "onnxruntime": timing([8, 25, 9])}) == "onnxruntime"
    assert clear_winner({"paddle": timing([10, 30, 12]), "onnxruntime": timing([8, 31, 9])}) == "paddle"
    # measured apart: medians and spreads decide
    assert clear_winner({"paddle": timing([10, 30, 12]), "onnxruntime": timing([8, 25, 9], "t2")}) == "paddle"
