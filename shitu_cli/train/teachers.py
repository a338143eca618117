"""Teachers for distillation: an ONNX model (onnxruntime), a Paddle export (shitu.yaml) or a shitu run,
loaded once, checked on a probe batch, and run on RGB views at the teacher's own size and normalisation.

Every problem with the teacher (missing, unreadable, wrong input, no usable output) is a BadInput
naming the file, raised before any training starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shitu_cli.errors import BadInput
from shitu_cli.models.manifest import IMAGENET_MEAN, IMAGENET_STD, MODEL_MANIFEST, Preprocess

TEACHER_HINT = "pass an .onnx model, an exported model dir (with shitu.yaml) or a shitu run dir (with export/)"
# ONNX files rarely say how to normalise; a model may carry it as metadata (e.g. "mean": "0.5,0.5,0.5").
MEAN_KEYS, STD_KEYS, SIZE_KEYS = ("shitu.mean", "mean"), ("shitu.std", "std"), ("shitu.input_size", "input_size")


@dataclass(frozen=True)
class TeacherOptions:
    """What the user said about the teacher; None: read it from the file."""

    output: str | None = None  # output name; default: see _pick_output
    wants: str = "logits"  # what the student learns from when no output is named: logits (cls) or features (rec)
    size: int | None = None  # square input size
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    threads: int = 1


@dataclass(frozen=True)
class TeacherInfo:
    """Everything that decides the teacher's outputs: recorded in recipe.yaml and the cache key."""

    path: str
    kind: str  # onnx | paddle-export
    sha256: str
    output: str
    input_size: tuple[int, int]  # (h, w)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str
    dim: int
    preprocessing_from: str  # "file", "flags", or "default (ImageNet)"

    def record(self) -> dict[str, Any]:
        info = asdict(self)
        info.update(input_size=list(self.input_size), mean=list(self.mean), std=list(self.std))
        return info


class LoadedTeacher:
    """A teacher ready to run: `run(views)` maps RGB uint8 views (H, W, 3) to an [N, dim] float32 array."""

    def __init__(self, info: TeacherInfo, runner: Any):
        self.info = info
        self._runner = runner
        self.calls = 0  # how many images the teacher actually ran on (the cache's misses)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(resize="direct", mean=self.info.mean, std=self.info.std, channel_order=self.info.channel_order)

    def run(self, views: Sequence[np.ndarray]) -> np.ndarray:
        from shitu_cli.infer.preprocess import preprocess_batch

        batch = preprocess_batch(list(views), self.preprocess, self.info.input_size)
        self.calls += len(views)
        return np.asarray(self._runner(batch), np.float32).reshape(len(views), -1)

    def run_normalised(self, batch: np.ndarray) -> np.ndarray:
        """The teacher on an already normalised NCHW batch at its own size (train-cls's on-the-fly path)."""
        self.calls += len(batch)
        return np.asarray(self._runner(batch.astype(np.float32)), np.float32).reshape(len(batch), -1)


def load_teacher_model(source: Path | str, options: TeacherOptions | None = None) -> LoadedTeacher:
    """An ONNX file, a Paddle export dir, or a run dir (its export/), checked on a probe batch."""
    options = options or TeacherOptions()
    source = Path(source)
    if not source.exists():
        raise BadInput("teacher not found", hint=TEACHER_HINT, path=source)
    if source.is_file() and source.suffix.lower() == ".onnx":
        teacher = _onnx_teacher(source, options)
    elif source.is_dir() and (source / MODEL_MANIFEST).is_file():
        teacher = _export_teacher(source, options)
    elif source.is_dir() and (source / "export" / MODEL_MANIFEST).is_file():
        teacher = _export_teacher(source / "export", options)
    else:
        raise BadInput("not a teacher this version can run", hint=TEACHER_HINT, path=source)
    _probe(teacher, source)
    return teacher


# ----------------------------------------------------------------------------- ONNX


def _onnx_teacher(path: Path, options: TeacherOptions) -> LoadedTeacher:
    import onnxruntime as ort

    from shitu_cli.artifacts import sha256_file

    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = max(1, options.threads)
    session_options.inter_op_num_threads = 1
    # A spinning ORT pool next to Paddle's threads slows both many times over on a small CPU.
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BadInput(f"not a readable ONNX model ({_first_line(exc)})", hint=TEACHER_HINT, path=path) from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BadInput(f"the ONNX teacher takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                       "a teacher takes one image batch", path=path)
    size = _onnx_input_size(inputs[0], options, path)
    output = _pick_output(session.get_outputs(), options.output, path, options.wants)
    metadata = session.get_modelmeta().custom_metadata_map or {}
    mean, std, source = _normalisation(options, metadata, path)
    name = inputs[0].name

    def runner(batch: np.ndarray) -> np.ndarray:
        return session.run([output], {name: batch})[0]

    info = TeacherInfo(path=path.resolve().as_posix(), kind="onnx", sha256=sha256_file(path), output=output,
                       input_size=size, mean=mean, std=std, channel_order="RGB", dim=0, preprocessing_from=source)
    return LoadedTeacher(info, runner)


def _onnx_input_size(node, options: TeacherOptions, path: Path) -> tuple[int, int]:
    shape = list(node.shape)
    if len(shape) != 4:
        raise BadInput(f"the ONNX teacher's input {node.name!r} has shape {shape}; a teacher takes an NCHW image batch",
                       path=path)
    channels, height, width = shape[1:]
    if isinstance(channels, int) and channels != 3:
        raise BadInput(f"the ONNX teacher's input {node.name!r} expects {channels} channel(s); shitu feeds RGB (3)",
                       hint="export the teacher for 3-channel RGB input", path=path)
    fixed = [d for d in (height, width) if isinstance(d, int) and d > 0]
    if options.size is not None:
        if len(fixed) == 2 and (height, width) != (options.size, options.size):
            raise BadInput(f"--teacher-size {options.size} does not fit the ONNX teacher's fixed input {height}x{width}",
                           hint=f"leave --teacher-size out, or pass {height}", path=path)
        return (options.size, options.size)
    if len(fixed) == 2:
        return (int(height), int(width))
    raise BadInput(f"the ONNX teacher's input {node.name!r} has no fixed size ({shape})",
                   hint="pass --teacher-size (e.g. 224)", path=path)


def _pick_output(outputs, wanted: str | None, path: Path, wants: str = "logits") -> str:
    """`wanted`, else the only output, else among the 2-D ones the first whose name says class scores (a
    classifier's teacher) or the first whose name does not (an embedder's), else the first 2-D one."""
    from shitu_cli.models.onnx_import import SCORE_WORDS

    names = [o.name for o in outputs]
    if wanted is not None:
        if wanted not in names:
            raise BadInput(f"the teacher has no output {wanted!r}", hint=f"choose one of: {', '.join(names)}", path=path)
        return wanted
    two_d = [o.name for o in outputs if len(o.shape or []) == 2]
    if len(outputs) == 1 or not two_d:
        return names[0]  # the probe run checks what it really gives
    scores = [n for n in two_d if any(word in n.lower() for word in SCORE_WORDS)]
    preferred = scores if wants == "logits" else [n for n in two_d if n not in scores]
    return (preferred or two_d)[0]


def _normalisation(options: TeacherOptions, metadata: dict[str, str], path: Path):
    from_file = {"mean": _metadata_triple(metadata, MEAN_KEYS, path), "std": _metadata_triple(metadata, STD_KEYS, path)}
    mean = options.mean or from_file["mean"]
    std = options.std or from_file["std"]
    if options.mean or options.std:
        source = "flags"
    elif mean and std:
        source = "file"
    else:
        source = "default (ImageNet)"
    return tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD), source


def _metadata_triple(metadata: dict[str, str], keys: tuple[str, ...], path: Path):
    for key in keys:
        if key in metadata:
            try:
                values = tuple(float(v) for v in metadata[key].replace(" ", "").split(","))
            except ValueError:
                values = ()
            if len(values) != 3:
                raise BadInput(f"the ONNX metadata {key!r} = {metadata[key]!r} is not three numbers", path=path)
            return values
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# ----------------------------------------------------------------------------- Paddle export / run dir


def _export_teacher(model_dir: Path, options: TeacherOptions) -> LoadedTeacher:
    from shitu_cli.artifacts import sha256_bytes, sha256_file
    from shitu_cli.infer.predictor import PredictorOptions, build_predictor
    from shitu_cli.models.manifest import read_model_manifest

    manifest = read_model_manifest(model_dir)
    if manifest.task not in ("rec", "cls"):
        raise BadInput(f"a {manifest.task} model cannot teach; pass a rec or cls export", path=model_dir)
    if options.output is not None:
        raise BadInput("--teacher-output only applies to ONNX teachers; a Paddle export has one output", path=model_dir)
    predictor = build_predictor(model_dir, PredictorOptions(threads=max(1, options.threads)), task=manifest.task)
    size = tuple(manifest.input_size) if options.size is None else (options.size, options.size)
    pre = manifest.preprocess
    mean, std = options.mean or tuple(pre.mean), options.std or tuple(pre.std)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    digest = sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode("utf-8"))

    def runner(batch: np.ndarray) -> np.ndarray:
        return predictor.run(batch)[0]

    info = TeacherInfo(path=model_dir.resolve().as_posix(), kind=f"paddle-export ({manifest.task})", sha256=digest,
                       output="features" if manifest.task == "rec" else "scores", input_size=(int(size[0]), int(size[1])),
                       mean=tuple(mean), std=tuple(std), channel_order=pre.channel_order, dim=0,
                       preprocessing_from="flags" if (options.mean or options.std) else "file")
    return LoadedTeacher(info, runner)


# ----------------------------------------------------------------------------- the probe


def _probe(teacher: LoadedTeacher, source: Path) -> None:
    """Run the teacher once on two grey images: an input it cannot take fails here, by name."""
    from dataclasses import replace

    height, width = teacher.info.input_size
    views = [np.full((height, width, 3), 128, np.uint8)] * 2
    try:
        out = np.asarray(teacher._runner(_normalised(views, teacher)))
    except Exception as exc:
        raise BadInput(f"the teacher cannot run on a [2, 3, {height}, {width}] RGB batch ({_first_line(exc)})",
                       hint="check --teacher-size, or that the model takes 3-channel images", path=source) from None
    if out.ndim < 2 or out.shape[0] != 2 or out.reshape(2, -1).shape[1] < 2:
        raise BadInput(f"the teacher's output {teacher.info.output!r} has shape {list(out.shape)}, "
                       "not one vector per image", hint="choose another output with --teacher-output", path=source)
    if not np.isfinite(out).all():
        raise BadInput("the teacher gives non-finite outputs on a plain grey image", path=source)
    teacher.info = replace(teacher.info, dim=int(out.reshape(2, -1).shape[1]))


def _normalised(views: list[np.ndarray], teacher: LoadedTeacher) -> np.ndarray:
    from shitu_cli.infer.preprocess import preprocess_batch

    return preprocess_batch(views, teacher.preprocess, teacher.info.input_size)
