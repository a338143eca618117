"""`shitu compress --prune`: L1 filter pruning of PP-LCNet plus distillation fine-tuning, and the refusal
of a model pruned past usefulness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.compress_runs import train_cls_run


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    run_dir = train_cls_run(root)
    return run_dir, root / "data"


def test_kept_channels_are_multiples_of_eight():
    from shitu_cli.compress.prune import kept_channels

    assert [kept_channels(n, 0.3) for n in (8, 16, 24, 64, 512)] == [8, 8, 16, 48, 360]
    assert kept_channels(64, 0.0) == 64 and kept_channels(64, 0.99) == 8


def test_pruning_nothing_changes_nothing_and_pruning_keeps_the_net_runnable():
    import paddle

    from shitu_cli.compress.prune import prune_pplcnet
    from shitu_cli.train.cls import build_classifier

    paddle.seed(0)
    model = build_classifier("PPLCNet_x0_5", 3)
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    with paddle.no_grad():
        before = model(x).numpy()
        same = prune_pplcnet(model, 0.0)
        np.testing.assert_allclose(model(x).numpy(), before, atol=1e-5)
        summary = prune_pplcnet(model, 0.5)
        assert model(x).shape == [2, 3]
    assert same.params_after == same.params_before
    assert summary.params_after < 0.75 * summary.params_before


@pytest.mark.slow  # ~45 s: prune, fine-tune with distillation, and prune alone; `make test-slow` runs it
def test_prune_and_distill_writes_a_smaller_model_closer_to_the_teacher_than_pruning_alone(cli, cls_run, tmp_path):
    run_dir, data_dir = cls_run
    common = ["--calib", data_dir, "--prune", "0.3", "--runs", "2", "--max-drop", "100", "--json"]
    raw = json.loads(cli("compress", run_dir, "-o", tmp_path / "raw", *common, "--epochs", "0").stdout)
    tuned = cli("compress", run_dir, "-o", tmp_path / "tuned", *common, "--epochs", "8")
    assert tuned.exit_code == 0, tuned.stderr
    report = json.loads(tuned.stdout)
    assert report["method"] == "prune-l1-0.3+distill" and report["after"]["precision"] == "fp32"
    assert report["after"]["size_bytes"] < 0.85 * report["before"]["size_bytes"]
    # Distillation from the unpruned model is what brings the pruned one back towards it.
    assert report["after"]["agreement"]["agreement"] > raw["after"]["agreement"]["agreement"]

    from shitu_cli.infer.predictor import build_predictor
    from shitu_cli.models.manifest import read_model_manifest

    manifest = read_model_manifest(tmp_path / "tuned")
    assert manifest.method == "prune-l1-0.3+distill"
    assert manifest.extra["compress"]["params_after"] < manifest.extra["compress"]["params_before"]
    assert manifest.extra["compress"]["distill"] == "KL T=4 + CE"  # class folders gave labels
    scores = build_predictor(tmp_path / "tuned", task="cls").run(np.zeros((1, 3, 64, 64), np.float32))[0]
    assert scores.shape == (1, 4) and abs(float(scores.sum()) - 1.0) < 1e-4  # still the softmax export


def test_an_absurd_prune_ratio_is_refused_and_nothing_is_written(cli, cls_run, tmp_path):
    run_dir, data_dir = cls_run
    out = tmp_path / "gutted"
    result = cli("compress", run_dir, "--calib", data_dir, "--prune", "0.95", "--epochs", "0", "-o", out, "--runs", "1")
    assert result.exit_code == 1
    assert "not written: quality dropped" in result.stderr
    assert not out.exists()


def test_unsupported_combinations_are_refused_before_any_work(cli, cls_run, tmp_path):
    run_dir, data_dir = cls_run
    for extra, words in ((["--quant", "qat", "--prune", "0.3"], "cannot follow --prune"), (["--onnx-int8", "--prune", "0.3"], "method of its own"),
                         (["--prune", "1.5"], "ratio in (0, 1)"), (["--quant", "none"], "nothing to do")):
        result = cli("compress", run_dir, "--calib", data_dir, "-o", tmp_path / "m", *extra)
        assert result.exit_code == 2, extra
        assert words in result.stderr
    assert not (tmp_path / "m").exists()
