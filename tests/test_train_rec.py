"""`shitu train-rec` end to end on drawn classes: outputs, learning, export match, resume, bad input."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from shitu_cli.artifacts import read_yaml, sha256_file
from synth import make_class_tree
from training_runs import epochs_done, signal_when

TINY = ("--recipe", "tiny", "--epochs", "4", "--num-workers", "0")


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """Twelve drawn classes split by split-dataset: four held out for gallery/query, eight to train."""
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    root = tmp_path_factory.mktemp("rec") / "products"
    make_class_tree(root, n_classes=12, per_class=10, size=64, seed=5)
    done = CliRunner().invoke(app, ["split-dataset", str(root), "--format", "rec", "--val", "0.34", "--test", "0.3"])
    assert done.exit_code == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def trained(lists, tmp_path_factory):
    """One tiny run shared by the tests that only read its outputs."""
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = CliRunner().invoke(app, ["train-rec", str(lists), "-o", str(run), *TINY, "--json"])
    assert result.exit_code == 0, result.stderr
    (run.parent / "stderr.txt").write_text(result.stderr, encoding="utf-8")
    return run, json.loads(result.stdout)


def test_a_line_per_epoch_off_a_terminal(trained):
    """Off a terminal (a log, CI) each epoch prints loss, the eval metrics, img/s and the time left."""
    run, summary = trained
    lines = [line for line in (run.parent / "stderr.txt").read_text(encoding="utf-8").splitlines() if line.startswith("epoch ")]
    assert len(lines) == summary["epochs"], lines
    assert re.match(r"epoch 1/\d+  loss \d+\.\d{4}  recall1 [01]\.\d{4}  recall5 [01]\.\d{4}  mAP [01]\.\d{4}  "
                    r"\d+\.\d img/s  \d+\.\d s  eta \d+(s|m\d\ds)$", lines[0]), lines[0]
    assert lines[-1].endswith("eta 0s")


def test_run_dir_holds_every_output(trained):
    run, summary = trained
    for name in ("metrics.csv", "curves.png", "recipe.yaml", "checkpoints/best.pdparams", "export/inference.json",
                 "export/inference.pdiparams", "export/shitu.yaml"):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "epoch,lr,loss,recall1,recall5,mAP"
    assert summary["train_classes"] == 8
    assert summary["query_images"] > 0 and summary["gallery_images"] > 0
    for key in ("recall1", "recall5", "mAP", "best_recall1"):
        assert 0.0 <= summary[key] <= 1.0


def test_manifest_and_recipe_describe_the_model(trained):
    run, summary = trained
    manifest = read_yaml(run / "export" / "shitu.yaml")
    assert manifest["task"] == "rec"
    assert manifest["arch"] == "RecModel/PPLCNet_x0_25"
    assert manifest["input_size"] == [64, 64]
    assert manifest["embedding_dim"] == 128
    assert manifest["recipe_hash"]
    recipe = read_yaml(run / "recipe.yaml")
    assert recipe["command"] == "train-rec"
    assert recipe["options"]["backbone"] == "PPLCNet_x0_25" and recipe["options"]["epochs"] == 4
    assert recipe["seed"] == 42
    assert recipe["metrics"]["best_recall1"] == summary["best_recall1"]
    assert set(recipe["inputs"]["lists"]) >= {"train_list.txt", "gallery_list.txt", "query_list.txt"}
    assert recipe["outputs"]["export/inference.pdiparams"] == sha256_file(run / "export" / "inference.pdiparams")


def test_training_reaches_a_sane_retrieval_level(trained):
    _, summary = trained
    # Four held-out classes, 7 gallery images each: chance recall@1 is about 1/4, chance mAP about 0.3.
    assert summary["best_recall1"] >= 0.5
    assert summary["recall5"] >= 0.75
    assert summary["mAP"] >= 0.45


def test_exported_model_matches_the_dygraph_model(trained, lists):
    """Rebuild the net from best.pdparams, embed real images in dygraph, compare with Paddle Inference."""
    import paddle

    from shitu_cli.data.images import read_image
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.models.manifest import Preprocess
    from shitu_cli.train.rec import RecSettings, build_rec_model

    run, summary = trained
    model = build_rec_model(RecSettings(backbone="PPLCNet_x0_25", embedding_size=128, input_size=64), summary["train_classes"])
    model.set_state_dict(paddle.load(str(run / "checkpoints" / "best.pdparams")))
    model.eval()
    images = [read_image(p) for p in sorted(lists.rglob("*.jpg"))[:5]]
    batch = preprocess_batch(images, Preprocess(resize="direct"), (64, 64))
    with paddle.no_grad():
        expected = model(paddle.to_tensor(batch))["features"].numpy()
    for mkldnn in (False, True):
        got = build_predictor(run / "export", PredictorOptions(mkldnn=mkldnn), task="rec").run(batch)[0]
        assert got.shape == (5, 128)
        # Raw BNNeck features reach tens: float32 rounding is relative, so compare relatively there
        # and absolutely on the unit vectors the index compares.
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        np.testing.assert_allclose(_unit(got), _unit(expected), atol=1e-4)
    assert np.linalg.norm(expected, axis=1).std() > 0  # not L2-normalised: the index does that


def _unit(features):
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_exported_embeddings_tell_classes_apart(trained, lists):
    """Regression: short runs once exported a net that mapped every image to one vector (cosine 1.0)."""
    from shitu_cli.data.images import read_image
    from shitu_cli.infer.predictor import build_predictor
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.models.manifest import Preprocess

    run, _ = trained
    paths = sorted(lists.rglob("*.jpg"))
    labels = np.array([p.parent.name for p in paths])
    batch = preprocess_batch([read_image(p) for p in paths], Preprocess(resize="direct"), (64, 64))
    unit = _unit(build_predictor(run / "export", task="rec").run(batch)[0])
    cosine = unit @ unit.T
    same = (labels[:, None] == labels[None]) & ~np.eye(len(paths), dtype=bool)
    assert cosine[~same & ~np.eye(len(paths), dtype=bool)].min() < 0.9
    # Properties of any trained embedder, on any CPU, read from rankings rather than raw cosines: MKL's AVX2
    # path trains other weights than AVX-512's, and the best epoch by mAP can be one whose vectors share a
    # large common component (every cosine ~0.99 on the AVX2 path) yet rank same-class images first.
    # For most images, same-class images score above other classes on average (0.93 AVX-512, 0.83 AVX2) ...
    other = labels[:, None] != labels[None]
    same_first = [cosine[row][same[row]].mean() > cosine[row][other[row]].mean() for row in range(len(paths))]
    assert np.mean(same_first) > 0.7
    # ... and the nearest other image is of the same class well above chance (0.32 / 0.38, chance 1/12).
    np.fill_diagonal(cosine, -np.inf)
    nearest_same = labels[cosine.argmax(axis=1)] == labels
    assert nearest_same.mean() > 3 / len(set(labels))


def test_pplcnetv2_export_is_re_parameterised_and_matches(tmp_path, lists):
    """The real PP-ShiTuV2 backbone at a small input: rep blocks folded, output still within 1e-4."""
    import paddle

    from shitu_cli.infer.predictor import build_predictor
    from shitu_cli.train.rec import RecSettings, embedding_layer, build_rec_model, export_rec, read_rec_lists

    settings = RecSettings(input_size=64, eval_batch_size=4)
    data = read_rec_lists(lists)
    paddle.seed(0)
    model = build_rec_model(settings, len(data.train_classes))
    _scramble_batch_norm_statistics(model)
    model.eval()
    export_dir, check = export_rec(model, tmp_path / "export", settings, data)
    assert check.max_normalised_diff < 1e-4
    assert check.max_abs_diff < 1e-4 * max(1.0, check.feature_scale)
    manifest = read_yaml(export_dir / "shitu.yaml")
    assert manifest["extra"]["re_parameterized_blocks"] > 0
    assert manifest["embedding_dim"] == 512
    probe = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype("float32")
    fresh = build_rec_model(settings, len(data.train_classes))
    fresh.set_state_dict(model.state_dict())
    fresh.eval()
    with paddle.no_grad():
        expected = embedding_layer(fresh)(paddle.to_tensor(probe)).numpy()
    got = build_predictor(export_dir).run(probe)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))
    np.testing.assert_allclose(_unit(got), _unit(expected), atol=1e-4)


def _scramble_batch_norm_statistics(model) -> None:
    # Fresh BN stats (mean 0, var 1) make re-parameterisation trivially right; random ones do not.
    import paddle

    rng = np.random.default_rng(1)
    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm1D, paddle.nn.BatchNorm)):
            shape = layer._mean.shape
            layer._mean.set_value(rng.normal(0, 0.1, shape).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, shape).astype("float32"))


def test_class_folders_are_split_into_the_run_dir_and_summarised_in_a_table(cli, tmp_path):
    root = tmp_path / "folders"
    make_class_tree(root, n_classes=6, per_class=6, size=48, seed=2)
    run = tmp_path / "run"
    result = cli("train-rec", root, "-o", run, "--recipe", "tiny", "--epochs", "1", "--input-size", "48")
    assert result.exit_code == 0, result.stderr
    assert "recall1" in result.stdout and "untrained" in result.stdout and "export check" in result.stdout
    assert (run / "split" / "train_list.txt").is_file()
    recipe = read_yaml(run / "recipe.yaml")
    split = recipe["inputs"]["split"]
    assert split["seed"] == 42 and split["holdout"] == 0.2
    assert split["counts"]["train"] == recipe["inputs"]["train_images"]
    assert recipe["inputs"]["query_images"] > 0
    assert "split/train_list.txt" in recipe["outputs"]
    assert not (root / "train_list.txt").exists()  # the dataset folder is left alone


def test_resume_after_a_killed_process_reaches_the_same_result(trained, lists, tmp_path):
    straight_run, straight = trained
    run = tmp_path / "killed"
    state = run / "checkpoints" / "last_state.yaml"
    code, _ = signal_when(["train-rec", lists, "-o", run, *TINY, "--json"], lambda: epochs_done(state) >= 2,
                          signal.SIGKILL, timeout=90)
    assert code == -signal.SIGKILL
    assert not (run / "export").exists()

    from typer.testing import CliRunner

    from shitu_cli.cli import app

    resumed = CliRunner().invoke(app, ["train-rec", str(lists), "-o", str(run), "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_epoch"] >= 2
    for key in ("best_epoch", "best_recall1", "recall1", "recall5", "mAP"):
        assert summary[key] == pytest.approx(straight[key], abs=1e-6), key
    assert (run / "metrics.csv").read_text(encoding="utf-8") == (straight_run / "metrics.csv").read_text(encoding="utf-8")
    import paddle

    a = paddle.load(str(run / "checkpoints" / "best.pdparams"))
    b = paddle.load(str(straight_run / "checkpoints" / "best.pdparams"))
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), atol=1e-6, err_msg=name)


def test_ctrl_c_stops_the_run_and_exports_the_best_epoch_so_far(lists, tmp_path):
    run = tmp_path / "stopped"
    state = run / "checkpoints" / "last_state.yaml"
    code, stderr = signal_when(["train-rec", lists, "-o", run, "--recipe", "tiny", "--epochs", "400", "--num-workers", "0"],
                               state.is_file, signal.SIGINT)
    assert code == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "stopped by SIGINT" in stderr
    assert (run / "checkpoints" / "last.pdparams").is_file() and (run / "export" / "shitu.yaml").is_file()
    recipe = read_yaml(run / "recipe.yaml")
    assert recipe["metrics"]["stopped_by"] == "SIGINT" and recipe["options"]["epochs"] == 400


def test_resume_refuses_changed_settings_and_an_empty_run_dir(cli, trained, lists, tmp_path):
    run, _ = trained
    changed = cli("train-rec", lists, "-o", run, "--resume", "--lr", "0.5")
    assert changed.exit_code == 2
    assert "lr" in changed.stderr and "0.5" in changed.stderr
    nothing = cli("train-rec", lists, "-o", tmp_path / "new", "--resume")
    assert nothing.exit_code == 2
    assert "nothing to resume" in nothing.stderr


def test_pretrained_weights_load_and_mismatches_are_named(cli, trained, lists, tmp_path):
    run, _ = trained
    ok = cli("train-rec", lists, "-o", tmp_path / "ft", *TINY[:2], "--epochs", "1",
             "--pretrained", run / "checkpoints" / "best.pdparams", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["pretrained"]["loaded"] > 100

    missing = cli("train-rec", lists, "-o", tmp_path / "x", *TINY, "--pretrained", tmp_path / "nope.pdparams")
    assert missing.exit_code == 2
    assert "nope.pdparams" in missing.stderr and "not found" in missing.stderr

    wrong = cli("train-rec", lists, "-o", tmp_path / "y", *TINY, "--backbone", "PPLCNet_x0_5",
                "--pretrained", run / "checkpoints" / "best.pdparams")
    assert wrong.exit_code == 2
    assert "best.pdparams" in wrong.stderr and "PPLCNet_x0_5" in wrong.stderr
    assert "backbone." in wrong.stderr and "!=" in wrong.stderr  # a key and its two shapes
    assert "Traceback" not in wrong.stderr
    assert not (tmp_path / "y").exists()  # refused before anything was written


def _copy_lists(lists: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("train_list.txt", "gallery_list.txt", "query_list.txt", "labels.txt"):
        text = (lists / name).read_text(encoding="utf-8")
        # Paths stay relative to the images, so point them back at the original folder.
        (target / name).write_text(text if name == "labels.txt" else _absolute(text, lists), encoding="utf-8")
    return target


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + line, encoding="utf-8")


def _first_label(lists_dir: Path) -> str:
    return (lists_dir / "labels.txt").read_text(encoding="utf-8").splitlines()[0]


def _absolute(text: str, root: Path) -> str:
    return "".join(f"{root / rel}\t{label}\n" for rel, label in (line.split("\t") for line in text.splitlines()))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "train_list.txt").write_text("", encoding="utf-8"), "training list is empty"),
        (lambda d: (d / "labels.txt").write_text("only one\n", encoding="utf-8"), "labels.txt does not name"),
        (lambda d: (d / "query_list.txt").write_text((d / "gallery_list.txt").read_text(encoding="utf-8"), encoding="utf-8"),
         "both query_list.txt and gallery_list.txt"),
        (lambda d: (d / "query_list.txt").write_text("", encoding="utf-8"), "evaluation needs both"),
        (lambda d: (d / "train_list.txt").write_text(f"missing.jpg\t{_first_label(d)}\n", encoding="utf-8"),
         "none of the images in train_list.txt can be read (e.g. missing.jpg: file not found)"),
    ],
    ids=["empty-train", "labels-mismatch", "query-is-gallery", "no-query", "no-readable-image"],
)
def test_bad_lists_are_refused_with_one_line(cli, lists, tmp_path, edit, message):
    bad = _copy_lists(lists, tmp_path / "bad")
    edit(bad)
    result = cli("train-rec", bad, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "export").exists()


def test_unreadable_listed_images_are_skipped_and_named(cli, lists, tmp_path):
    data = _copy_lists(lists, tmp_path / "lists")
    _append(data / "train_list.txt", f"missing.jpg\t{_first_label(data)}\n")
    (data / "truncated.jpg").write_bytes((lists / (data / "train_list.txt").read_text(encoding="utf-8").split("\t")[0]).read_bytes()[:150])
    _append(data / "train_list.txt", f"{data / 'truncated.jpg'}\t{_first_label(data)}\n")
    result = cli("train-rec", data, "-o", tmp_path / "run", *TINY[:2], "--epochs", "1", "--num-workers", "0", "--json")
    assert result.exit_code == 0, result.stderr
    skipped = {s["path"]: s["reason"] for s in json.loads(result.stdout)["skipped"]}
    assert skipped.keys() == {"missing.jpg", "truncated.jpg"}  # as paths under the dataset folder
    assert skipped["missing.jpg"] == "file not found"


def test_relative_out_from_another_cwd_trains_and_records_the_split(cli, tmp_path, monkeypatch):
    """`train-rec -o runs/x` (relative) used to train, then fail in recipes.py: 'is not in the subpath'."""
    root = tmp_path / "products"
    make_class_tree(root, n_classes=6, per_class=6, size=48, seed=2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = cli("train-rec", root, "-o", "runs/x", "--recipe", "tiny", "--epochs", "1", "--input-size", "48",
                 "--num-workers", "0", "--json")
    assert result.exit_code == 0, result.stderr
    recipe = read_yaml(work / "runs" / "x" / "recipe.yaml")
    assert "split/train_list.txt" in recipe["outputs"] and "export/inference.pdiparams" in recipe["outputs"]


def test_resume_takes_more_epochs_and_needs_no_dataset(cli, trained, tmp_path):
    import shutil

    straight_run, _ = trained
    run = tmp_path / "more"
    shutil.copytree(straight_run, run)
    result = cli("train-rec", "-o", run, "--resume", "--epochs", "5", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_from_epoch"] == 4 and summary["epochs_done"] == 5 and summary["epochs"] == 5
    rows = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert rows[:5] == (straight_run / "metrics.csv").read_text(encoding="utf-8").splitlines() and rows[5].startswith("5,")


def test_bad_backbone_suggests_the_closest(cli, lists, tmp_path):
    result = cli("train-rec", lists, "-o", tmp_path / "run", "--backbone", "PPLCNet_x0_52")
    assert result.exit_code == 2
    assert "did you mean PPLCNet_x0_5" in result.stderr


def test_missing_dataset_and_bad_recipe(cli, tmp_path):
    missing = cli("train-rec", tmp_path / "nowhere", "-o", tmp_path / "run")
    assert missing.exit_code == 2 and "nowhere" in missing.stderr
    recipe = cli("train-rec", tmp_path, "-o", tmp_path / "run", "--recipe", "tinny")
    assert recipe.exit_code == 2 and "tiny" in recipe.stderr


def test_single_image_classes_are_warned_about(cli, tmp_path):
    root = tmp_path / "lists"
    make_class_tree(root, n_classes=3, per_class=4, size=48, seed=1)
    rows = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    train = [r for r in rows if not r.endswith(("001.jpg", "002.jpg", "003.jpg"))] + [rows[1], rows[2]]
    (root / "train_list.txt").write_text("".join(f"{r}\t{r.split('/')[0]}\n" for r in train), encoding="utf-8")
    result = cli("train-rec", root, "-o", tmp_path / "run", "--recipe", "tiny", "--epochs", "1", "--input-size", "48", "--json")
    assert result.exit_code == 0, result.stderr
    assert "single image" in result.stderr
    assert "without evaluation" in result.stderr
    assert json.loads(result.stdout)["recall1"] is None


@pytest.mark.slow
def test_pplcnetv2_trains_end_to_end(cli, lists, tmp_path):
    result = cli("train-rec", lists, "-o", tmp_path / "v2", "--epochs", "2", "--input-size", "64", "--batch-size", "16", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["backbone"] == "PPLCNetV2_base_ShiTu" and summary["export_normalised_diff"] < 1e-4


def test_shipped_recipes_resolve_and_flags_win(tmp_path):
    from shitu_cli.errors import BadInput
    from shitu_cli.train.rec import RECIPE_DIR, resolve_settings

    for path in sorted(RECIPE_DIR.glob("*.yml")):
        assert resolve_settings(path.stem, {}).backbone, path
    assert resolve_settings("pp-shituv2", {}).backbone == "PPLCNetV2_base_ShiTu"
    assert resolve_settings("tiny", {"epochs": 2}).epochs == 2
    typo = tmp_path / "mine.yml"
    typo.write_text("backbone: PPLCNet_x0_25\nembeding_size: 64\n", encoding="utf-8")
    with pytest.raises(BadInput, match="embedding_size"):
        resolve_settings(typo, {})
