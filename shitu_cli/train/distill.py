"""Knowledge distillation, SSLD style: the student matches the teacher's softened outputs (KL at a
temperature) plus plain cross-entropy on labels; and loading a teacher from an export or a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shitu_cli.errors import BadInput
from shitu_cli.models.manifest import MODEL_MANIFEST, Preprocess

# Probabilities are turned back into logits as log(p); this floor keeps log finite for p == 0.
MIN_PROBABILITY = 1e-12


# ----------------------------------------------------------------------------- losses (paddle tensors)


def soft_cross_entropy(logits, targets):
    """Mean over the batch of -sum(targets * log_softmax(logits)); targets are per-row distributions."""
    import paddle.nn.functional as F

    return -(targets * F.log_softmax(logits, axis=-1)).sum(axis=-1).mean()


def kl_at_temperature(student_logits, teacher_logits, temperature: float):
    """KL(teacher_T || student_T) * T^2, averaged over the batch.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al.), so the
    KL and CE terms can be weighted against each other whatever temperature is chosen.
    """
    import paddle.nn.functional as F

    teacher_logits = teacher_logits.detach()
    log_student = F.log_softmax(student_logits / temperature, axis=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, axis=-1)
    per_row = (log_teacher.exp() * (log_teacher - log_student)).sum(axis=-1)
    return per_row.mean() * (temperature**2)


def distillation_loss(student_logits, teacher_logits, targets, temperature: float, weight: float):
    """(1 - weight) * CE on the first len(targets) rows + weight * KL on every row.

    Rows past len(targets) are unlabelled images: they only feed the KL term.
    Returns (loss, {"ce": float, "kl": float}) for logging.
    """
    labelled = targets.shape[0]
    kl = kl_at_temperature(student_logits, teacher_logits, temperature)
    if labelled == 0:
        return kl, {"kl": round(float(kl), 4)}
    ce = soft_cross_entropy(student_logits[:labelled], targets)
    loss = (1.0 - weight) * ce + weight * kl
    return loss, {"ce": round(float(ce), 4), "kl": round(float(kl), 4)}


# ----------------------------------------------------------------------------- teachers


class Teacher(Protocol):
    """Anything that maps the student's normalised NCHW batch to per-class logits."""

    source: Path
    labels: list[str] | None
    num_classes: int

    def logits(self, images: np.ndarray, student: Preprocess) -> np.ndarray: ...


def renormalise(images: np.ndarray, source: Preprocess, target: Preprocess) -> np.ndarray:
    """Re-express a batch normalised with `source` mean/std in `target`'s (no-op when they agree)."""
    if tuple(source.mean) == tuple(target.mean) and tuple(source.std) == tuple(target.std):
        return images
    s_mean, s_std = np.array(source.mean, np.float32)[:, None, None], np.array(source.std, np.float32)[:, None, None]
    t_mean, t_std = np.array(target.mean, np.float32)[:, None, None], np.array(target.std, np.float32)[:, None, None]
    return ((images * s_std + s_mean - t_mean) / t_std).astype(np.float32)


def resize_batch(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an NCHW float batch to (h, w); the teacher may expect another input size."""
    if tuple(images.shape[2:]) == tuple(size):
        return images
    import paddle
    import paddle.nn.functional as F

    with paddle.no_grad():
        out = F.interpolate(paddle.to_tensor(images), size=list(size), mode="bilinear", align_corners=False)
    return out.numpy()


@dataclass
class ExportedTeacher:
    """An exported cls model dir run through Paddle Inference; its softmax output turned back into logits."""

    source: Path
    predictor: Any
    preprocess: Preprocess
    input_size: tuple[int, int]
    labels: list[str] | None
    num_classes: int

    def logits(self, images: np.ndarray, student: Preprocess) -> np.ndarray:
        batch = resize_batch(renormalise(images, student, self.preprocess), self.input_size)
        scores = self.predictor.run(batch)[0].astype(np.float32)
        if _looks_like_probabilities(scores):
            # softmax(log p / T) is the teacher's distribution at temperature T: exact, up to the floor.
            return np.log(np.maximum(scores, MIN_PROBABILITY))
        return scores


@dataclass
class CheckpointTeacher:
    """A trained dygraph model (a run dir or its .pdparams), used in eval mode without gradients."""

    source: Path
    model: Any
    input_size: tuple[int, int] | None
    labels: list[str] | None
    num_classes: int

    def logits(self, images: np.ndarray, student: Preprocess) -> np.ndarray:
        import paddle

        batch = resize_batch(images, self.input_size) if self.input_size else images
        self.model.eval()
        with paddle.no_grad():
            return self.model(paddle.to_tensor(batch)).numpy()


@dataclass
class OnnxTeacher:
    """An ONNX model run on onnxruntime (teachers.py); its output taken as logits over the dataset's classes."""

    source: Path
    model: Any  # teachers.LoadedTeacher
    labels: list[str] | None
    num_classes: int

    @classmethod
    def of(cls, model, source: Path) -> "OnnxTeacher":
        return cls(Path(source), model, None, int(model.info.dim))

    def logits(self, images: np.ndarray, student: Preprocess) -> np.ndarray:
        batch = resize_batch(renormalise(images, student, self.model.preprocess), self.model.info.input_size)
        scores = self.model.run_normalised(batch)
        if _looks_like_probabilities(scores):
            return np.log(np.maximum(scores, MIN_PROBABILITY))
        return scores


def _looks_like_probabilities(scores: np.ndarray) -> bool:
    return bool(scores.min() >= 0 and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))


def load_teacher(source: Path | str, threads: int = 1, onnx_options: dict[str, Any] | None = None) -> Teacher:
    """A teacher from an .onnx model (its first 2-D output as logits), an exported model dir (has shitu.yaml),
    a train-cls run dir, or a .pdparams checkpoint whose run dir holds recipe.yaml (to know the architecture)."""
    source = Path(source)
    if not source.exists():
        raise BadInput("teacher not found", hint="pass an .onnx model, an exported model dir, a train-cls run dir or "
                       "its .pdparams", path=source)
    if source.suffix.lower() == ".onnx":
        from shitu_cli.train.teachers import TeacherOptions, load_teacher_model

        given = {k: v for k, v in (onnx_options or {}).items() if v is not None}
        for key in ("mean", "std"):
            if key in given:
                given[key] = tuple(given[key])
        return OnnxTeacher.of(load_teacher_model(source, TeacherOptions(threads=threads, **given)), source)
    if source.is_dir() and (source / MODEL_MANIFEST).is_file():
        return _exported_teacher(source, threads)
    if source.is_dir():
        checkpoint = source / "checkpoints" / "best.pdparams"
        if not checkpoint.is_file():
            raise BadInput(
                "not an exported model dir (no shitu.yaml) nor a train-cls run dir (no checkpoints/best.pdparams)",
                hint="pass RUN_DIR, RUN_DIR/export or RUN_DIR/checkpoints/best.pdparams of a train-cls run",
                path=source,
            )
        return _checkpoint_teacher(checkpoint, source)
    if source.suffix != ".pdparams":
        raise BadInput("a teacher file must be a .pdparams checkpoint", path=source)
    run_dir = next((d for d in (source.parent, source.parent.parent) if (d / "recipe.yaml").is_file()), None)
    if run_dir is None:
        raise BadInput("no recipe.yaml beside this checkpoint or one folder up, so its architecture is unknown",
                       hint="pass the train-cls run dir, or its export/ dir", path=source)
    return _checkpoint_teacher(source, run_dir)


def _exported_teacher(model_dir: Path, threads: int) -> ExportedTeacher:
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor

    predictor = build_predictor(model_dir, PredictorOptions(threads=threads), task="cls")
    manifest = predictor.manifest
    labels = list(manifest.labels) or None
    probe = predictor.run(np.zeros((1, 3, *manifest.input_size), np.float32))[0]
    return ExportedTeacher(model_dir, predictor, manifest.preprocess, tuple(manifest.input_size), labels, int(probe.shape[1]))


def _checkpoint_teacher(checkpoint: Path, run_dir: Path) -> CheckpointTeacher:
    from shitu_cli.models.manifest import read_model_manifest
    from shitu_cli.models.cls_families import head_key
    from shitu_cli.models.ppcls import CLS_ARCHS, build_arch
    from shitu_cli.recipes import read_recipe
    from shitu_cli.train.checkpoints import weights_that_fit

    recipe = read_recipe(run_dir)
    arch = recipe.options.get("model")
    if arch not in CLS_ARCHS:
        raise BadInput(f"the recipe names model {arch!r}, not a classifier architecture", path=run_dir / "recipe.yaml")
    state = _load_state(checkpoint)
    head = head_key(arch)  # fc.weight for most families, fc3 / classifier / head for VGG, MobileNetV4, Swin
    if head not in state:
        raise BadInput(f"not a {arch} classifier checkpoint (no {head})", path=checkpoint)
    num_classes = int(state[head].shape[1])
    model = build_arch({"name": arch, "class_num": num_classes})
    model.set_state_dict(weights_that_fit(model, state, checkpoint))  # paddle would only warn about a misfit
    model.eval()
    labels, size = None, recipe.options.get("input_size")
    if (run_dir / "export" / MODEL_MANIFEST).is_file():
        labels = list(read_model_manifest(run_dir / "export").labels) or None
    input_size = (int(size), int(size)) if size else None
    return CheckpointTeacher(checkpoint, model, input_size, labels, num_classes)


def _load_state(path: Path) -> dict[str, Any]:
    from shitu_cli.models.legacy import load_weights

    state = load_weights(path)  # arrays only: a checkpoint from elsewhere never runs code
    if not isinstance(state, dict) or not state:
        raise BadInput("not a paddle state dict", path=path)
    return state
