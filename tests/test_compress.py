"""`shitu compress --quant ptq` on a tiny trained classifier: INT8 that loads like any model, agrees with
the original, records its lineage and which PTQ algorithm --algo auto picked, and is refused (nothing
written) when quality drops past --max-drop."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.compress_runs import assert_auto_picked_the_best, train_cls_run

# A 64 px PPLCNet_x0_25 is fragile under INT8 (8-16 channel depthwise layers): measured, the best algorithm
# kept 0.69-0.97 top-1 agreement over all 64 images, depending on the CPU that trained it (Intel vs the
# AVX2 MKL path); real models agree ~1.0. Broken INT8 (e.g. float weights read as int8) lands near chance,
# 0.25 for four classes. The floor sits between the two.
MIN_AGREEMENT = 0.55


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A train-cls run dir, its class folders (64 images) and its val list (16 images, paths relative to data/)."""
    root = tmp_path_factory.mktemp("cls")
    run_dir = train_cls_run(root)
    return run_dir, root / "data", run_dir / "split" / "val_list.txt"


def _predict(model_dir, images, precision="fp32"):
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    return build_predictor(model_dir, PredictorOptions(precision=precision), task="cls").run(images)[0]


def _image_batch(model_dir, data_dir, paths=None):
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.models.manifest import read_model_manifest

    manifest = read_model_manifest(model_dir)
    paths = paths or sorted(data_dir.rglob("*.jpg"))
    return preprocess_batch([read_image(p) for p in paths], manifest.preprocess, manifest.input_size)


def test_ptq_writes_an_int8_model_that_agrees_with_the_original(cli, cls_run, tmp_path):
    run_dir, data_dir, list_file = cls_run
    out = tmp_path / "int8"
    # Calibrate on the train list (its paths resolve through split/recipe.yaml), evaluate on all 64 images.
    result = cli("compress", run_dir, "--calib", run_dir / "split" / "train_list.txt", "--eval", data_dir, "-o", out, "--runs", "3",
                 "--max-drop", "100", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    # the default --algo auto calibrated on 36 of the 48 train images and scored each algorithm on the other 12
    picked = assert_auto_picked_the_best(report, 36, 12)
    assert report["written"] and report["after"]["precision"] == "int8"
    assert report["after"]["size_bytes"] < 0.6 * report["before"]["size_bytes"]
    assert report["after"]["agreement"]["agreement"] >= MIN_AGREEMENT
    assert set(report["before"]["metric"]) == {"top1"} and set(report["after"]["metric"]) == {"top1"}
    assert (report["calib_images"], report["eval_images"]) == (36, 64)

    from shitu_cli.models.manifest import read_model_manifest
    from shitu_cli.recipes import read_recipe

    manifest, parent = read_model_manifest(out), read_model_manifest(run_dir / "export")
    assert (manifest.precision, manifest.method, manifest.task) == ("int8", report["method"], "cls")
    assert manifest.parent_model_hash == parent.model_hash and manifest.labels == parent.labels
    assert manifest.extra["compress"]["algo_choice"] == report["algo_choice"]
    recipe = read_recipe(out)
    assert recipe.options["algo"] == "auto" and recipe.metrics["algo_choice"] == report["algo_choice"]

    # Measured again here, independently of the report: the written model loads through
    # build_predictor with oneDNN INT8 and picks the same classes as the original.
    images = _image_batch(out, data_dir)
    original, compressed = _predict(run_dir / "export", images), _predict(out, images, "int8")
    assert compressed.shape == original.shape
    assert np.mean(original.argmax(1) == compressed.argmax(1)) >= MIN_AGREEMENT
    # ...and on the 12 held-out train images it is exactly the model auto scored (every 4th line of the list)
    lines = (run_dir / "split" / "train_list.txt").read_text(encoding="utf-8").splitlines()
    held_out = _image_batch(out, data_dir, [data_dir / line.rsplit(None, 1)[0] for line in lines[3::4]])
    before, after = _predict(run_dir / "export", held_out), _predict(out, held_out, "int8")
    assert round(float(np.mean(before.argmax(1) == after.argmax(1))), 4) == picked["agreement"]

    # paddle2onnx aborts on quantized ops; benchmark-cpu must show a failed row, not die with it.
    bench = cli("benchmark-cpu", "--cls", run_dir / "export", "--int8", out, "--images", data_dir, "--precision", "int8",
                "--backend", "paddle,onnxruntime", "--runs", "1", "--warmup", "0", "--json")
    assert bench.exit_code == 0, bench.stderr
    statuses = {r["backend"]: r["status"] for r in json.loads(bench.stdout)["results"]}
    assert statuses["paddle"] == "ok" and statuses["onnxruntime"].startswith("failed")


def test_qat_fine_tunes_then_calibrates_an_int8_model_that_agrees_with_the_original(cli, cls_run, tmp_path):
    run_dir, data_dir, _ = cls_run
    out = tmp_path / "qat"
    # an explicit --algo still works: abs_max, the range the fake quanters trained for
    result = cli("compress", run_dir, "--quant", "qat", "--algo", "abs_max", "--calib", run_dir / "split" / "train_list.txt",
                 "--eval", data_dir, "-o", out, "--epochs", "3", "--runs", "2", "--max-drop", "100", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] and report["method"] == "qat+ptq-abs_max" and report["after"]["precision"] == "int8"
    assert report["algo_choice"] is None and report["calib_images"] == 48
    assert report["after"]["agreement"]["agreement"] >= MIN_AGREEMENT

    from shitu_cli.models.manifest import read_model_manifest
    from shitu_cli.recipes import read_recipe

    manifest = read_model_manifest(out)
    assert (manifest.precision, manifest.method) == ("int8", "qat+ptq-abs_max")
    details = manifest.extra["compress"]
    assert details["quant"] == "qat+ptq" and details["finetune_epochs"] == 3 and details["finetune_images"] == 48
    assert details["distill"] == "KL T=4 + CE"  # the train list gave labels
    recipe = read_recipe(out)
    assert recipe.options["quant"] == "qat" and recipe.options["lr"] == 0.002  # the rate used, not null

    images = _image_batch(out, data_dir)
    original, compressed = _predict(run_dir / "export", images), _predict(out, images, "int8")
    assert np.mean(original.argmax(1) == compressed.argmax(1)) >= MIN_AGREEMENT

    # QAT fine-tunes the trainable model, which an export alone does not have.
    shutil.copytree(run_dir / "export", tmp_path / "lonely")
    lonely = cli("compress", tmp_path / "lonely", "--quant", "qat", "--calib", data_dir, "-o", tmp_path / "m")
    assert lonely.exit_code == 2 and "--quant qat needs the trainable model" in lonely.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow  # ~12 s: a third full PTQ run for the table's layout; `make test-slow` runs it
def test_the_report_table_shows_size_latency_and_quality(cli, cls_run, tmp_path):
    run_dir, data_dir, list_file = cls_run
    result = cli("compress", run_dir / "export", "--calib", list_file, "-o", tmp_path / "m", "--runs", "2",
                 "--max-drop", "100", "--calib-size", "16")
    assert result.exit_code == 0, result.stderr
    for words in ("size MB", "latency p50 ms (1 thread)", "agreement", "quality drop", "ptq-", "wrote"):
        assert words in result.stdout
    # the algorithms --algo auto tried, each with its score, the kept one marked
    assert "12 calibration image(s)" in result.stdout and "scored on 4 held-out calibration image(s)" in result.stdout
    from shitu_cli.compress.choose import AUTO_ALGOS

    trial_rows = [line for line in result.stdout.splitlines() if any(f"│ {algo} " in line for algo in AUTO_ALGOS)]
    assert len(trial_rows) == len(AUTO_ALGOS) and sum("picked" in row for row in trial_rows) == 1


def test_a_quality_drop_past_max_drop_is_refused_and_nothing_is_written(cli, cls_run, tmp_path):
    run_dir, data_dir, _ = cls_run
    out = tmp_path / "refused"
    # A negative limit demands a gain over the original, which agreement (at most 1.0) cannot give.
    result = cli("compress", run_dir, "--calib", data_dir, "-o", out, "--runs", "1", "--max-drop", "-1", "--calib-size", "8")
    assert result.exit_code == 1
    assert "not written: quality dropped" in result.stderr and "--max-drop -1" in result.stderr
    assert "--algo auto already tried hist, abs_max, avg, mse" in result.stderr  # the hint says what was tried
    assert "agreement" in result.stdout  # the table still shows what was measured
    assert not out.exists()

    forced = cli("compress", run_dir, "--calib", data_dir, "-o", out, "--runs", "1", "--max-drop", "-1",
                 "--calib-size", "8", "--algo", "abs_max", "--force", "--json")  # one algorithm: --force is the point
    assert forced.exit_code == 0, forced.stderr
    assert any("--force" in note for note in json.loads(forced.stdout)["notes"])
    assert (out / "shitu.yaml").is_file()


def test_bad_calibration_images_are_skipped_and_reported(cli, cls_run, tmp_path):
    run_dir, data_dir, _ = cls_run
    calib = tmp_path / "calib"
    shutil.copytree(data_dir, calib, ignore=shutil.ignore_patterns("*.txt"))
    (calib / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = cli("compress", run_dir, "--calib", calib, "-o", tmp_path / "m", "--runs", "1", "--max-drop", "100",
                 "--calib-size", "100", "--algo", "abs_max", "--json")  # one algorithm: the skipping is the point
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["path"].endswith("broken.jpg") for s in report["skipped"]] == [True]
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    assert report["calib_images"] == 64  # every readable image, the broken one left out


def test_bad_input_is_a_one_line_error(cli, cls_run, tmp_path):
    run_dir, data_dir, _ = cls_run
    missing = cli("compress", tmp_path / "nope", "--calib", data_dir, "-o", tmp_path / "m")
    assert missing.exit_code == 2 and "nope" in missing.stderr and "not found" in missing.stderr

    (tmp_path / "empty").mkdir()
    empty = cli("compress", run_dir, "--calib", tmp_path / "empty", "-o", tmp_path / "m")
    assert empty.exit_code == 2 and "holds no images" in empty.stderr

    # An export alone (no run dir beside it) cannot be re-traced for Paddle PTQ.
    shutil.copytree(run_dir / "export", tmp_path / "lonely")
    lonely = cli("compress", tmp_path / "lonely", "--calib", data_dir, "-o", tmp_path / "m")
    assert lonely.exit_code == 2 and "--onnx-int8" in lonely.stderr

    unknown = cli("compress", run_dir, "--calib", data_dir, "-o", tmp_path / "m", "--algo", "best")
    assert unknown.exit_code == 2 and "unknown PTQ algorithm 'best'" in unknown.stderr and "auto" in unknown.stderr

    clobber = cli("compress", run_dir, "--calib", data_dir, "-o", run_dir / "export")
    assert clobber.exit_code == 2 and "overwrite" in clobber.stderr
    assert not (tmp_path / "m").exists()


def test_onnx_int8_works_from_an_export_alone(cli, cls_run, tmp_path):
    run_dir, data_dir, _ = cls_run
    shutil.copytree(run_dir / "export", tmp_path / "export")  # no run dir beside it: ONNX needs none
    out = tmp_path / "onnx-int8"
    result = cli("compress", tmp_path / "export", "--onnx-int8", "--calib", data_dir, "-o", out, "--runs", "2",
                 "--max-drop", "100", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "onnx-int8-minmax" and report["after"]["backend"] == "onnxruntime"
    assert report["after"]["size_bytes"] < 0.6 * report["before"]["size_bytes"]  # weights really are int8
    assert report["after"]["agreement"]["agreement"] >= MIN_AGREEMENT
    assert any("backend" in note for note in report["notes"])

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    images = _image_batch(out, data_dir)
    original = _predict(run_dir / "export", images)
    compressed = build_predictor(out, PredictorOptions(backend="onnxruntime"), task="cls").run(images)[0]
    assert np.mean(original.argmax(1) == compressed.argmax(1)) >= MIN_AGREEMENT
    assert build_predictor(out, PredictorOptions(backend="auto"), task="cls").backend == "onnxruntime"
