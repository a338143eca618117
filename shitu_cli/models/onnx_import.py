"""ONNX image models as trainable Paddle layers: x2paddle converts a graph once into dygraph code and
weights, cached under $SHITU_HOME/onnx-import/<sha256 of the .onnx>, checked against onnxruntime.

The generated code is Python built from names in the ONNX file, so names are made plain identifiers
before conversion and the code is read (ast) before it is imported. Weights are read as arrays only.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu_cli.errors import BadInput, WorkFailed

CACHE_DIR = "onnx-import"
CODE_FILE = "x2paddle_code.py"
WEIGHTS_FILE = "model.pdparams"
STAMP_FILE = "converted.json"
CONVERTER = "x2paddle"
# Relative to the output's own scale: x2paddle layers matched onnxruntime to ~4e-6 on a real net.
MATCH_TOLERANCE = 1e-3
# Names of outputs that hold class scores, not features: never the default output to fine-tune from.
SCORE_WORDS = ("logit", "prob", "softmax", "score", "class", "pred")
SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class OnnxImage:
    """What an ONNX image model takes and gives, read from its graph."""

    path: Path
    sha256: str
    input_name: str
    input_hw: tuple[int | None, int | None]  # None where the graph leaves a side dynamic
    outputs: dict[str, list[int | None]]  # name -> shape, in the graph's order

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)


@dataclass
class ImportedNet:
    """A converted ONNX model: the Paddle layer and how it was checked."""

    net: Any  # paddle.nn.Layer whose forward returns the graph's outputs in order
    image: OnnxImage
    cache_dir: Path
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # vs onnxruntime, per output
    check_size: tuple[int, int] = (0, 0)


def is_onnx_file(path: Path | str | None) -> bool:
    return path is not None and str(path).lower().endswith(".onnx")


# ---------------------------------------------------------------- reading the graph


def read_onnx_image(path: Path | str) -> OnnxImage:
    """The graph's one image input [N, 3, H, W] and its outputs; anything else is refused by name."""
    from shitu_cli.artifacts import sha256_file

    path = Path(path)
    model = _load_onnx(path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise BadInput(f"an image model has one input; this ONNX model has {len(inputs)} ({names})", path=path,
                       hint="export the backbone with a single [N, 3, H, W] image input")
    shape = _shape(inputs[0])
    if len(shape) != 4 or shape[1] != 3:
        raise BadInput(f"input {inputs[0].name!r} is {_shape_text(shape)}, not a 3-channel image batch [N, 3, H, W]",
                       path=path, hint="pass an image model (RGB, NCHW)")
    outputs = {o.name: _shape(o) for o in model.graph.output}
    return OnnxImage(path=path, sha256=sha256_file(path), input_name=inputs[0].name, input_hw=(shape[2], shape[3]),
                     outputs=outputs)


def _load_onnx(path: Path):
    import onnx

    if not path.is_file():
        raise BadInput("ONNX file not found", path=path, hint="pass the path of a .onnx image model")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise many kinds
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise BadInput(f"not a readable ONNX model ({reason})", path=path,
                       hint="a truncated download? export or fetch it again") from None
    return model


def _shape(value_info) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _shape_text(shape: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def choose_output(image: OnnxImage, wanted: str | None) -> str:
    """The output to fine-tune from: `wanted`, else the only one, else the only 2-D output whose name
    does not say class scores. Ambiguity is refused with the names to choose from."""
    names = image.output_names
    listed = ", ".join(f"{n} {_shape_text(s)}" for n, s in image.outputs.items())
    if wanted is not None:
        if wanted not in image.outputs:
            raise BadInput(f"has no output named {wanted!r}", path=image.path, hint=f"its outputs: {listed}")
        return wanted
    if len(names) == 1:
        return names[0]
    features = [n for n, s in image.outputs.items() if len(s) == 2 and not any(w in n.lower() for w in SCORE_WORDS)]
    if len(features) == 1:
        return features[0]
    raise BadInput(f"cannot tell which of {len(names)} outputs holds the features", path=image.path,
                   hint=f"choose one with --pretrained-output NAME; its outputs: {listed}")


# ---------------------------------------------------------------- conversion, cached


def import_onnx(path: Path | str, run_size: int | None = None) -> ImportedNet:
    """Convert (or reuse the cached conversion of) an ONNX image model and load it as a Paddle layer,
    checked against onnxruntime; with `run_size`, also checked to run on square inputs of that size."""
    image = read_onnx_image(path)
    cache = converted_dir(image)
    net = _load_net(cache, image)
    size = (image.input_hw[0] or run_size or 224, image.input_hw[1] or run_size or 224)
    diffs = _compare_with_onnxruntime(net, image, size)
    if run_size and (run_size, run_size) != size:
        _check_runs_at(net, image, run_size)
    return ImportedNet(net=net, image=image, cache_dir=cache, max_abs_diff=diffs, check_size=size)


def cache_dir_for(image: OnnxImage) -> Path:
    from shitu_cli.bench.record import shitu_home

    return shitu_home() / CACHE_DIR / image.sha256[:24]


def converted_dir(image: OnnxImage) -> Path:
    """The cached conversion's folder, converting first when it is missing or made by another x2paddle."""
    import importlib.metadata

    from shitu_cli.models.export import atomic_dir

    cache = cache_dir_for(image)
    try:
        version = importlib.metadata.version(CONVERTER)
    except importlib.metadata.PackageNotFoundError:
        raise WorkFailed("x2paddle is not installed; --pretrained model.onnx needs it",
                         hint="pip install x2paddle==1.6.0 sympy") from None
    stamp = {"sha256": image.sha256, CONVERTER: version}
    try:
        if json.loads((cache / STAMP_FILE).read_text(encoding="utf-8")) == stamp:
            return cache
    except (OSError, ValueError):
        pass  # missing or damaged: convert again
    try:
        with atomic_dir(cache) as staging:
            _convert(image, staging)
            (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise WorkFailed(f"cannot write the converted model ({exc.strerror or exc})", path=cache,
                         hint="set SHITU_HOME to a writable folder") from None
    return cache


# Run in a child process: x2paddle prints on stdout, logs, and may abort on an op it cannot map.
# disable_feedback: x2paddle otherwise reports each conversion to a remote server.
_CONVERT = """
import sys
from x2paddle.convert import onnx2paddle
onnx2paddle(sys.argv[1], sys.argv[2], disable_feedback=True, enable_onnx_checker=True)
"""


def _convert(image: OnnxImage, out_dir: Path) -> None:
    import shutil

    import onnx

    model = onnx.load(str(image.path))
    plain_names(model)
    source = out_dir / "source.onnx"
    onnx.save(model, str(source))
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(source), str(out_dir)], capture_output=True, text=True,
                          errors="replace")
    source.unlink()
    shutil.rmtree(out_dir / "inference_model", ignore_errors=True)  # the static copy: not used here
    if done.returncode != 0 or not (out_dir / CODE_FILE).is_file() or not (out_dir / WEIGHTS_FILE).is_file():
        raise BadInput(f"x2paddle cannot convert this model ({_last_error(done.stdout + done.stderr)})",
                       path=image.path, hint="simplify or re-export the ONNX graph (opset 7-15, static kernel shapes)")
    check_generated_code((out_dir / CODE_FILE).read_text(encoding="utf-8"), image.path)


def _last_error(chatter: str) -> str:
    lines = [line.strip() for line in chatter.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    text = (errors or lines or ["no output"])[-1]
    return text[:300]


def plain_names(model) -> int:
    """Rename every graph name that is not a plain identifier (x2paddle pastes names into code);
    the graph's meaning is unchanged. Returns how many were renamed."""
    graph = model.graph
    names: list[str] = []
    for items in (graph.input, graph.output, graph.value_info, graph.initializer, graph.node):
        names += [i.name for i in items]
    for node in graph.node:
        names += list(node.input) + list(node.output)
    taken = {n for n in names if SAFE_NAME.match(n)}
    mapping: dict[str, str] = {}
    for name in dict.fromkeys(n for n in names if n and not SAFE_NAME.match(n)):
        base = "t_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
        new, k = base, 0
        while new in taken:
            k += 1
            new = f"{base}_{k}"
        taken.add(new)
        mapping[name] = new
    if not mapping:
        return 0
    for items in (graph.input, graph.output, graph.value_info, graph.initializer, graph.node):
        for item in items:
            item.name = mapping.get(item.name, item.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    return len(mapping)


ALLOWED_IMPORTS = {"paddle", "math", "x2paddle.op_mapper.onnx2paddle"}
FORBIDDEN_NAMES = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
                   "locals", "vars", "input", "breakpoint", "exit", "quit", "os", "sys", "subprocess", "builtins"}


def check_generated_code(code: str, source: Path) -> None:
    """Refuse generated code that does more than build layers: imports beyond paddle/math/x2paddle's own
    layers, builtins that reach outside, or dunder attributes other than __init__."""
    def refuse(why: str):
        raise BadInput(f"x2paddle's code for this model {why}; refusing to import it", path=source,
                       hint="convert a model from a source you trust")

    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        refuse(f"is not valid Python ({exc.msg})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] not in ALLOWED_IMPORTS for a in node.names):
            refuse("imports " + ", ".join(a.name for a in node.names))
        if isinstance(node, ast.ImportFrom) and (node.module or "") not in ALLOWED_IMPORTS:
            refuse(f"imports from {node.module}")
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            refuse(f"uses {node.id}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("__") and node.attr != "__init__":
            refuse(f"reaches {node.attr}")


def _load_net(cache: Path, image: OnnxImage):
    """Import the generated ONNXModel class and set its weights (read as arrays only)."""
    import importlib.util

    from shitu_cli.models.legacy import load_weights

    code = cache / CODE_FILE
    check_generated_code(code.read_text(encoding="utf-8"), image.path)
    spec = importlib.util.spec_from_file_location(f"shitu_onnx_{image.sha256[:16]}", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # x2paddle names some parameters itself (attr='x2paddle_w'), and Paddle refuses a name twice per
    # process: build in a name space of its own, then give every parameter a process-unique name, as
    # Paddle's own are (optimiser state is keyed by them: a second build must not reuse the first's).
    from paddle.utils import unique_name

    with unique_name.guard():
        net = module.ONNXModel()
    for structured, param in net.named_parameters():
        param.name = unique_name.generate(f"onnx.{structured}")
    weights = load_weights(cache / WEIGHTS_FILE)
    own = net.state_dict()
    missing = [k for k in own if k not in weights]
    wrong = [k for k in own if k in weights and list(weights[k].shape) != list(own[k].shape)]
    if missing or wrong:
        raise WorkFailed(f"x2paddle's weights do not fit its code ({len(missing)} missing, {len(wrong)} of another "
                         f"shape)", path=cache, hint=f"delete {cache} to convert again")
    net.set_state_dict({k: weights[k] for k in own})
    net.eval()
    return net


# ---------------------------------------------------------------- checks


def net_outputs(net, batch: np.ndarray) -> list[np.ndarray]:
    import paddle

    with paddle.no_grad():
        outs = net(paddle.to_tensor(batch))
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return [o.numpy() for o in outs]


def onnxruntime_outputs(path: Path, input_name: str, batch: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One thread and no spinning: a spinning onnxruntime pool slows Paddle in the same process 17x.
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: batch})


def _probe_batch(size: tuple[int, int]) -> np.ndarray:
    # Image-like values: normalised pixels lie in about [-2.2, 2.7].
    return np.random.default_rng(0).uniform(-2.0, 2.0, (2, 3, *size)).astype("float32")


def _compare_with_onnxruntime(net, image: OnnxImage, size: tuple[int, int]) -> dict[str, float]:
    batch = _probe_batch(size)
    try:
        reference = onnxruntime_outputs(image.path, image.input_name, batch)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BadInput(f"onnxruntime cannot run this model ({str(exc).splitlines()[0][:200]})", path=image.path) from None
    converted = net_outputs(net, batch)
    if len(converted) != len(reference):
        raise WorkFailed(f"the converted model gives {len(converted)} outputs, onnxruntime {len(reference)}",
                         path=image.path)
    diffs = {}
    for name, want, got in zip(image.output_names, reference, converted):
        if want.shape != got.shape:
            raise WorkFailed(f"output {name!r}: converted shape {list(got.shape)} != onnxruntime's {list(want.shape)}",
                             path=image.path)
        diffs[name] = float(np.abs(want - got).max())
        scale = max(1.0, float(np.abs(want).max()))
        if diffs[name] > MATCH_TOLERANCE * scale:
            raise WorkFailed(f"output {name!r} of the converted model differs from onnxruntime's by "
                             f"{diffs[name]:.2e}", path=image.path, hint="x2paddle mis-converted an op; "
                             "report it with the model")
    return diffs


def _check_runs_at(net, image: OnnxImage, size: int) -> None:
    try:
        net_outputs(net, _probe_batch((size, size))[:1])
    except Exception as exc:  # noqa: BLE001 - shape errors come from deep inside paddle
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else exc.__class__.__name__
        hw = "x".join(str(d) for d in image.input_hw)
        raise BadInput(f"the converted model does not run at {size} px (it was exported for {hw}: {reason})",
                       path=image.path, hint=f"use --input-size {image.input_hw[0]}") from None
