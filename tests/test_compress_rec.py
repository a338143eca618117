"""`shitu compress` on a tiny train-rec run: INT8 embeddings that stay close to the original's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.compress_runs import assert_auto_picked_the_best, train_rec_run

# A 64 px, 128-d recogniser trained for seconds (20 steps). Its embeddings' norms differ 5-35x between
# classes, and which PTQ algorithm copes depends on the CPU that trained it: on Intel avg dropped the mean
# cosine to -0.1 where hist kept 0.84; on the AVX2 MKL path abs_max kept 0.92. --algo auto's pick kept
# 0.84-0.92 on the gallery's unseen classes. Broken INT8 (float weights read as int8) scatters them.
MIN_COSINE = 0.7


@pytest.fixture(scope="module")
def rec_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    return train_rec_run(root), root / "products"


def test_ptq_rec_keeps_embeddings_close(cli, rec_run, tmp_path):
    run_dir, products = rec_run
    out = tmp_path / "rec-int8"
    result = cli("compress", run_dir, "--calib", products / "train_list.txt", "--eval", products / "gallery_list.txt",
                 "-o", out, "--runs", "2", "--max-drop", "100", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "rec"
    # the default --algo auto: 64 of the 80 train images, 48 to calibrate, 16 to score each algorithm
    assert_auto_picked_the_best(report, 48, 16)
    assert report["after"]["agreement"]["cosine"] >= MIN_COSINE
    assert 0.0 <= report["after"]["agreement"]["agreement"] <= 1.0
    assert set(report["before"]["metric"]) == {"recall@1"}

    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.models.manifest import read_model_manifest

    manifest, parent = read_model_manifest(out), read_model_manifest(run_dir / "export")
    assert (manifest.task, manifest.precision, manifest.embedding_dim) == ("rec", "int8", parent.embedding_dim)

    # Independently of the report: the written INT8 model, loaded like any model, gives the gallery
    # embeddings the report measured.
    from shitu_cli.compress.images import iter_batches, load_image_set

    gallery = load_image_set(products / "gallery_list.txt", "gallery")
    images = np.concatenate([batch for batch, _ in iter_batches(gallery, manifest, 64)])
    original = build_predictor(run_dir / "export", task="rec").run(images)[0]
    compressed = build_predictor(out, PredictorOptions(precision="int8"), task="rec").run(images)[0]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    assert compressed.shape == (len(images), parent.embedding_dim)
    cosine = float(np.mean(np.sum(unit(original) * unit(compressed), axis=1)))
    assert cosine == pytest.approx(report["after"]["agreement"]["cosine"], abs=1e-3) and cosine >= MIN_COSINE


def test_prune_rec_backbone_with_feature_distillation(cli, rec_run, tmp_path):
    run_dir, products = rec_run
    result = cli("compress", run_dir, "--calib", products / "train_list.txt", "--prune", "0.25", "--epochs", "2",
                 "-o", tmp_path / "pruned", "--runs", "1", "--max-drop", "100", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "prune-l1-0.25+distill"
    assert report["after"]["size_bytes"] < report["before"]["size_bytes"]
    assert -1.0 <= report["after"]["agreement"]["cosine"] <= 1.0

    from shitu_cli.models.manifest import read_model_manifest

    assert read_model_manifest(tmp_path / "pruned").embedding_dim == read_model_manifest(run_dir / "export").embedding_dim


@pytest.mark.slow  # ~15 s: QAT is covered in the default run by the classifier's test; `make test-slow`
def test_qat_rec_runs_through_to_an_int8_recogniser(cli, rec_run, tmp_path):
    run_dir, products = rec_run
    common = ["--quant", "qat", "--calib", products / "train_list.txt", "--eval",
              products / "gallery_list.txt", "--epochs", "2", "--runs", "1", "--json"]
    result = cli("compress", run_dir, *common, "-o", tmp_path / "qat", "--max-drop", "100")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "rec" and report["after"]["precision"] == "int8"
    assert_auto_picked_the_best(report, 48, 16)  # after fine-tuning, --algo auto calibrates the tuned weights
    assert report["method"] == f"qat+ptq-{report['algo_choice']['picked']}"
    # Measured on this tiny recogniser: QAT moves the embeddings more than PTQ alone, and --max-drop is what
    # refuses such a loss by default; this is a sanity floor, not a quality claim.
    assert 0.5 <= report["after"]["agreement"]["cosine"] <= 1.0

    from shitu_cli.models.manifest import read_model_manifest

    manifest = read_model_manifest(tmp_path / "qat")
    assert (manifest.precision, manifest.embedding_dim) == ("int8", read_model_manifest(run_dir / "export").embedding_dim)
    assert manifest.extra["compress"]["distill"] == "KL T=4"  # rec lists carry no class index for CE


def test_rec_agreement_is_about_the_answer_a_search_gives():
    from shitu_cli.compress.measure import agreement

    def at(*degrees):
        radians = np.deg2rad(degrees)
        return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)

    # three views of a cup (0, 10, 25 degrees) and two of a cat (80, 90); the compressed model moves the
    # first cup view to 20 degrees, so its nearest image becomes another cup view
    before, after = at(0, 10, 25, 80, 90), at(20, 10, 25, 80, 90)
    labels = ["cup", "cup", "cup", "cat", "cat"]
    labelled, unlabelled = agreement("rec", before, after, labels), agreement("rec", before, after)
    assert labelled["agreement"] == 1.0  # every image still finds a cup / a cat
    assert unlabelled["agreement"] == pytest.approx(0.6)  # without labels, another nearest image is another answer
    assert labelled["cosine"] == unlabelled["cosine"] < 1.0
