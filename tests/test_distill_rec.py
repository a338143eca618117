"""train-rec --teacher / --unlabeled and train-cls --teacher model.onnx, with an ONNX teacher built here
(a fixed random conv net written with onnx.helper) on small drawn images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shitu_cli.artifacts import read_yaml
from synth import make_class_tree

TEACHER_SIZE = 32
# No held-out classes (--holdout 0): the last weights are exported, not an epoch picked on a handful of queries.
TINY = ("--recipe", "tiny", "--num-workers", "0", "--batch-size", "8", "--seed", "3", "--holdout", "0")


def write_teacher(path: Path, channels: int = 3, size: int | None = TEACHER_SIZE, classes: int = 3) -> Path:
    """conv 5x5/2 -> relu -> [global mean ; global max] = `embedding` (32-d) -> matmul = `logits`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array((rng.standard_normal((16, channels, 5, 5)) * 0.2).astype(np.float32), "w")
    head = numpy_helper.from_array(rng.standard_normal((32, classes)).astype(np.float32), "head")
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["conv"], strides=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["mean"]),
        helper.make_node("GlobalMaxPool", ["relu"], ["max"]),
        helper.make_node("Concat", ["mean", "max"], ["pooled"], axis=1),
        helper.make_node("Flatten", ["pooled"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "head"], ["logits"]),
    ]
    side = size if size is not None else "H"
    graph = helper.make_graph(
        nodes, "teacher",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, side, side if size else "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 32])],
        [weights, head],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Drawn class folders to train on, an unlabelled pool of more drawn images, and the ONNX teacher."""
    root = tmp_path_factory.mktemp("distill")
    make_class_tree(root / "products", n_classes=6, per_class=12, size=48, seed=5)
    make_class_tree(root / "pool", n_classes=6, per_class=8, size=48, seed=9)
    return {"root": root, "data": root / "products", "pool": root / "pool", "teacher": write_teacher(root / "t.onnx")}


def train_rec(cli, world, out: Path, *extra: str):
    result = cli("train-rec", world["data"], "-o", out, *TINY, "--teacher", world["teacher"], "--teacher-output",
                 "embedding", "--teacher-cache", world["root"] / "cache", "--unlabeled", world["pool"],
                 "--unlabeled-per-batch", "24", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def distilled(world, tmp_path_factory):
    from typer.testing import CliRunner

    from shitu_cli.cli import app

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    run = tmp_path_factory.mktemp("runs") / "distilled"
    summary = train_rec(cli, world, run, "--epochs", "5", "--lr", "0.05", "--label-weight", "0")
    return run, summary, cli


def _similarity(features: np.ndarray) -> np.ndarray:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return unit @ unit.T


def _agreement(student: np.ndarray, teacher: np.ndarray) -> float:
    """Pearson correlation of the pairwise cosine similarities (off the diagonal) of two embeddings."""
    upper = np.triu_indices(len(student), 1)
    return float(np.corrcoef(_similarity(student)[upper], _similarity(teacher)[upper])[0, 1])


def _teacher_features(world, images: list[Path]) -> np.ndarray:
    from shitu_cli.data.images import read_image
    from shitu_cli.train.teachers import TeacherOptions, load_teacher_model

    teacher = load_teacher_model(world["teacher"], TeacherOptions(output="embedding"))
    features = teacher.run([read_image(p) for p in images])
    return features - features.mean(axis=0)  # what the student is taught: centred teacher features


def test_distillation_moves_the_student_toward_the_teacher(distilled, world):
    from shitu_cli.data.images import read_image
    from shitu_cli.data.loader import LabeledImage
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.infer.preprocess import preprocess_batch
    from shitu_cli.train.loop import seed_everything
    from shitu_cli.train.rec import Embedder, build_rec_model, calibrate_batch_norm, resolve_settings

    run, summary, _ = distilled
    images = sorted(world["data"].rglob("*.jpg"))
    teacher = _teacher_features(world, images)
    predictor = build_predictor(run / "export", PredictorOptions(), task="rec")
    student = predictor.run(preprocess_batch([read_image(p) for p in images], predictor.manifest.preprocess,
                                             predictor.manifest.input_size))[0]
    # The same student before training: same seed, same init, BN statistics from the same images.
    settings = resolve_settings("tiny", {"seed": 3, "batch_size": 8, "num_workers": 0, "holdout": 0.0})
    seed_everything(settings.seed)
    untrained = build_rec_model(settings, summary["train_classes"])
    embed = Embedder([LabeledImage(p, 0) for p in images], settings)
    calibrate_batch_norm(untrained, embed)
    before = embed(untrained)[0]
    assert student.shape[1] == 128 and teacher.shape[1] == 32  # the projection head did not reach the export
    gained = _agreement(student, teacher) - _agreement(before, teacher)
    assert gained > 0.2, (_agreement(student, teacher), _agreement(before, teacher))


def test_teacher_outputs_are_cached_and_reused(distilled, world):
    from shitu_cli.data.loader import LabeledImage
    from shitu_cli.train.rec_distill import distill_settings, teacher_targets
    from shitu_cli.train.teachers import TeacherOptions, load_teacher_model

    run, summary, _ = distilled
    first = summary["distillation"]
    pool = len(list(world["data"].rglob("*.jpg"))) + len(list(world["pool"].rglob("*.jpg")))
    assert first["pool_images"] == pool and first["cache_misses"] == pool and first["cache_hits"] == 0
    assert first["teacher_images_run"] == pool * first["views"]
    recipe = (run / "recipe.yaml").read_text(encoding="utf-8")
    assert first["teacher"]["sha256"] in recipe and "label_weight: 0.0" in recipe and first["cache_dir"] in recipe
    # A second run with the same teacher, views and images: every output read back, the teacher never run.
    teacher = load_teacher_model(world["teacher"], TeacherOptions(output="embedding"))
    train = [LabeledImage(p, 0) for p in sorted(world["data"].rglob("*.jpg"))]
    settings = distill_settings({"teacher_output": "embedding", "cache_dir": str(world["root"] / "cache")})
    pool_images = sorted(world["pool"].rglob("*.jpg"))
    again = teacher_targets(teacher, train, pool_images, settings, seed=3, num_workers=0)
    assert again.record["cache_dir"] == first["cache_dir"]
    assert (again.record["cache_hits"], again.record["cache_misses"], teacher.calls) == (pool, 0, 0)
    # Another view recipe is another key: nothing is read from the first one's entries.
    other = teacher_targets(teacher, train, [], distill_settings({**settings.__dict__, "teacher_views": 1}), 3, 0)
    assert other.record["cache_dir"] != first["cache_dir"] and other.record["cache_misses"] == len(train)


def test_a_teacher_that_cannot_be_fed_is_refused_by_name(cli, world, tmp_path):
    gray = write_teacher(tmp_path / "gray.onnx", channels=1)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    dynamic = write_teacher(tmp_path / "dynamic.onnx", size=None)
    cases = [(gray, "expects 1 channel"), (broken, "not a readable ONNX model"), (dynamic, "no fixed size"),
             (tmp_path / "missing.onnx", "teacher not found")]
    for teacher, problem in cases:
        result = cli("train-rec", world["data"], "-o", tmp_path / f"run-{teacher.stem}", *TINY, "--teacher", teacher)
        assert result.exit_code == 2, result.stderr
        assert str(teacher.name) in result.stderr and problem in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    refused = cli("train-rec", world["data"], "-o", tmp_path / "nope", *TINY, "--unlabeled", world["pool"])
    assert refused.exit_code == 2 and "--unlabeled needs --teacher" in refused.stderr


def test_train_cls_distils_from_an_onnx_teacher(cli, world, tmp_path):
    data = tmp_path / "cls"
    make_class_tree(data, n_classes=3, per_class=6, size=48, seed=2)
    assert cli("split-dataset", data, "--val", "0.34").exit_code == 0
    teacher = write_teacher(tmp_path / "cls-teacher.onnx", classes=3)
    result = cli("train-cls", data, "-o", tmp_path / "run", "--recipe", "tiny", "--epochs", "1", "--num-workers", "0",
                 "--teacher", teacher, "--teacher-mean", "0.5,0.5,0.5", "--teacher-std", "0.5,0.5,0.5", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["teacher"].endswith("cls-teacher.onnx")
    options = read_yaml(tmp_path / "run" / "recipe.yaml")["options"]
    assert options["teacher_mean"] == [0.5, 0.5, 0.5] and options["teacher_std"] == [0.5, 0.5, 0.5]

    common = ("train-cls", data, "-o", tmp_path / "refused", "--recipe", "tiny", "--epochs", "1")
    bad_mean = cli(*common, "--teacher", teacher, "--teacher-mean", "0.5,0.5")
    assert bad_mean.exit_code == 2 and "--teacher-mean must be three numbers" in bad_mean.stderr
    not_onnx = cli(*common, "--teacher", tmp_path / "run", "--teacher-std", "0.5,0.5,0.5")
    assert not_onnx.exit_code == 2 and "describes an ONNX teacher" in not_onnx.stderr
    assert not (tmp_path / "refused").exists()


def test_an_unnamed_output_is_the_features_for_train_rec_and_the_logits_for_train_cls(world):
    """The teacher lists logits first; an embedder distils from its features unless told otherwise."""
    from shitu_cli.train.teachers import TeacherOptions, load_teacher_model

    assert load_teacher_model(world["teacher"], TeacherOptions(wants="features")).info.output == "embedding"
    assert load_teacher_model(world["teacher"], TeacherOptions()).info.output == "logits"
