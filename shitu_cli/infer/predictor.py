"""The one place predictors are built: a model dir + options in, `run(inputs) -> outputs` out.

Backends: Paddle Inference (the reference), onnxruntime and OpenVINO (both from an ONNX file
converted once by paddle2onnx and cached under SHITU_HOME/onnx by model hash), and "auto": the backend
measured fastest on this machine for this model (by `shitu benchmark-cpu`, or by infer/autobackend.py on
the model's first auto use), else Paddle.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from shitu_cli.errors import BadInput, WorkFailed
from shitu_cli.models.manifest import ModelManifest, read_model_manifest

BACKENDS = ("paddle", "onnxruntime", "openvino")
BACKEND_CHOICES = BACKENDS + ("auto",)
PRECISIONS = ("fp32", "bf16", "int8")
ONNX_FILE = "model.onnx"
ONNX_STAMP = "source.json"
ONNX_OPSET = 11


@dataclass(frozen=True)
class PredictorOptions:
    backend: str = "paddle"  # paddle | onnxruntime | openvino | auto
    threads: int = 1
    mkldnn: bool = True  # Paddle only: oneDNN kernels
    precision: str = "fp32"  # fp32 | bf16 | int8 (int8 models come from `shitu compress`)


class PaddlePredictor:
    """Paddle Inference on CPU. Reads paddle-3 (inference.json) and legacy (inference.pdmodel) models."""

    backend = "paddle"

    def __init__(self, model_dir: Path, manifest: ModelManifest, options: PredictorOptions):
        from paddle.inference import Config, create_predictor

        self.model_dir, self.manifest, self.options = Path(model_dir), manifest, options
        if manifest.model_file.endswith(".onnx"):
            raise WorkFailed("Paddle Inference cannot run an ONNX model", hint="use onnxruntime or openvino", path=model_dir)
        self.model_files = [self.model_dir / manifest.model_file, self.model_dir / manifest.params_file]
        config = Config(str(self.model_files[0]), str(self.model_files[1]))
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(max(1, options.threads))
        # Never enable_memory_optim(): it raises on paddle-3 .json models.
        if options.mkldnn:
            config.enable_mkldnn()
            if manifest.task == "det" and not manifest.model_file.endswith(".pdmodel"):
                # Paddle 3.3 oneDNN crashes on PicoDet's upsample op in PIR (.json) programs; skipping
                # the placement pass keeps oneDNN for the rest of the graph. Old-IR programs (INT8
                # detectors) run placed, and their INT8 convs need the placement.
                config.delete_pass("onednn_placement_pass")
            if manifest.task == "det" and manifest.extra.get("family") == "yolov3":
                # Paddle 3.3 segfaults (pir::FloatAttribute::data) building the FusedConv2dOp that fuses a
                # batch-normed conv with YOLOv3's leaky ReLU; the rest of the graph keeps oneDNN.
                config.delete_pass("conv_activation_onednn_fuse_pass")
            for name in manifest.extra.get("onednn_skip_passes", []):
                # Set at export for nets a oneDNN pass breaks (HRNet's upsample fuse: see models.cls_families).
                config.delete_pass(str(name))
            if options.precision == "bf16":
                config.enable_mkldnn_bfloat16()
            elif options.precision == "int8" or manifest.precision == "int8":
                config.enable_mkldnn_int8()
        elif options.precision == "bf16":
            raise WorkFailed("Paddle Inference runs bf16 only through oneDNN", hint="leave --mkldnn on (drop --no-mkldnn)", path=model_dir)
        else:
            # Paddle 3.3 enables oneDNN on CPU by default: without this, "mkldnn off" still ran
            # oneDNN (and crashed PicoDet, whose placement pass was then left in).
            config.disable_mkldnn()
        try:
            with _native_stderr_silenced(config.mkldnn_int8_enabled()):
                self._predictor = create_predictor(config)
        except Exception as exc:  # paddle raises bare RuntimeError/ValueError subclasses
            raise WorkFailed(f"Paddle Inference cannot load this model ({exc.__class__.__name__}: {exc})", path=model_dir) from None
        self.input_names = list(self._predictor.get_input_names())
        self.output_names = list(self._predictor.get_output_names())

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = {self.input_names[0]: inputs}
        for name, value in inputs.items():
            self._predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(value))
        self._predictor.run()
        return [self._predictor.get_output_handle(name).copy_to_cpu() for name in self.output_names]


@contextmanager
def _native_stderr_silenced(silence: bool) -> Iterator[None]:
    """oneDNN's INT8 passes write some thirty coloured "--- quantized N ops" lines straight to the C-level
    stderr while a predictor is created; Python's sys.stderr cannot catch them, so fd 2 goes to a
    scratch file meanwhile. Failures still surface as the exception create_predictor raises."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class OnnxRuntimePredictor:
    """onnxruntime's CPU execution provider on the cached ONNX conversion of the model."""

    backend = "onnxruntime"

    def __init__(self, model_dir: Path, manifest: ModelManifest, options: PredictorOptions):
        import onnxruntime as ort

        if options.precision == "bf16":
            raise WorkFailed("onnxruntime's CPU provider has no bf16 mode", hint="use paddle or openvino for bf16", path=model_dir)
        self.model_dir, self.manifest, self.options = Path(model_dir), manifest, options
        onnx_path = onnx_model(self.model_dir, manifest)
        self.model_files = [onnx_path]
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = max(1, options.threads)
        session_options.inter_op_num_threads = 1
        # A spinning ORT pool starves Paddle and faiss sharing the process on few cores (Paddle's
        # 2-thread calls measured 17x slower beside idle ORT sessions: STACK.md).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.log_severity_level = 3  # paddle2onnx leaves unused initializers; ORT warns about each
        try:
            self._session = ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise WorkFailed(
                f"onnxruntime cannot load {onnx_path.name} ({exc.__class__.__name__}: {_short_reason(exc)})",
                hint=f"delete {onnx_path.parent} to convert again", path=model_dir,
            ) from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = {self.input_names[0]: inputs}
        feed = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        try:
            return list(self._session.run(None, feed))
        except Exception as exc:
            raise WorkFailed(f"onnxruntime failed to run the model ({_short_reason(exc)})", path=self.model_dir) from None


class OpenVinoPredictor:
    """OpenVINO's CPU plugin on the cached ONNX conversion (it cannot read paddle-3 .json programs)."""

    backend = "openvino"

    def __init__(self, model_dir: Path, manifest: ModelManifest, options: PredictorOptions):
        self.model_dir, self.manifest, self.options = Path(model_dir), manifest, options
        onnx_path = onnx_model(self.model_dir, manifest)
        self.model_files = [onnx_path]
        # bf16 needs avx512_bf16/AMX; on other CPUs OpenVINO quietly runs fp32 (the header says which).
        config = {
            "INFERENCE_NUM_THREADS": max(1, options.threads),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if options.precision == "bf16" else "f32",
        }
        try:
            core = _openvino_core()
            self._compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        except Exception as exc:
            raise WorkFailed(
                f"OpenVINO cannot load {onnx_path.name} ({exc.__class__.__name__}: {_short_reason(exc)})",
                hint=f"delete {onnx_path.parent} to convert again", path=model_dir,
            ) from None
        self._request = self._compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self._compiled.inputs]
        self.output_names = [port.get_any_name() for port in self._compiled.outputs]

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = {self.input_names[0]: inputs}
        feed = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        try:
            results = self._request.infer(feed)
        except Exception as exc:
            raise WorkFailed(f"OpenVINO failed to run the model ({_short_reason(exc)})", path=self.model_dir) from None
        # Copies: the request reuses its output buffers on the next call.
        return [np.array(results[port]) for port in self._compiled.outputs]


PREDICTORS = {"paddle": PaddlePredictor, "onnxruntime": OnnxRuntimePredictor, "openvino": OpenVinoPredictor}
Predictor = PaddlePredictor | OnnxRuntimePredictor | OpenVinoPredictor


def build_predictor(model_dir: Path | str, options: PredictorOptions | None = None, task: str | None = None) -> Predictor:
    """Load the manifest of `model_dir` (refusing a model of another task) and build its predictor.

    The returned predictor's `.backend` names the backend actually used (what "auto" chose).
    """
    options = options or PredictorOptions()
    if options.backend not in BACKEND_CHOICES:
        raise BadInput(f"unknown backend {options.backend!r}", hint=f"choose one of: {', '.join(BACKEND_CHOICES)}")
    if options.precision not in PRECISIONS:
        raise BadInput(f"unknown precision {options.precision!r}", hint=f"choose one of: {', '.join(PRECISIONS)}")
    manifest = read_model_manifest(Path(model_dir), task=task)
    if options.precision == "int8" and manifest.precision != "int8":
        raise WorkFailed(
            f"this is a {manifest.precision} model; int8 needs a quantized model",
            hint="make one with `shitu compress MODEL --quant ptq`", path=model_dir,
        )
    if options.backend == "auto":
        options = dataclasses.replace(options, backend=resolve_auto_backend(manifest, Path(model_dir), options))
    if options.backend != "paddle" and not backend_installed(options.backend):
        raise WorkFailed(f"backend {options.backend} is not installed", hint=f"pip install {options.backend}")
    return PREDICTORS[options.backend](Path(model_dir), manifest, options)


def resolve_auto_backend(manifest: ModelManifest, model_dir: Path, options: PredictorOptions | None = None) -> str:
    """The fastest backend recorded on this machine for this model (and still installed); on a model not
    measured yet, a short interleaved measurement of the installed backends that agree with Paddle decides
    and is recorded (infer/autobackend.py). Paddle where nothing else clearly wins, and for bf16/int8 runs;
    onnxruntime for an ONNX-only model, such as `shitu compress --onnx-int8` writes."""
    from shitu_cli.bench.record import fastest_backend

    options = options or PredictorOptions()
    if manifest.model_file.endswith(".onnx"):
        return "onnxruntime"
    if options.precision != "fp32" or manifest.precision != "fp32":
        return "paddle"  # the record holds fp32 timings only
    model_hash = model_hash_of(manifest, model_dir)
    chosen = fastest_backend(model_hash)
    if chosen is None:
        chosen = _measure_backends(manifest, model_dir, options)
    if chosen in BACKENDS and (chosen == "paddle" or backend_installed(chosen)):
        return chosen
    return "paddle"


def _measure_backends(manifest: ModelManifest, model_dir: Path, options: PredictorOptions) -> str | None:
    from shitu_cli.bench.record import fastest_backend
    from shitu_cli.infer import autobackend

    others = [name for name in BACKENDS[1:] if backend_installed(name)]
    if not autobackend.enabled() or not others or not _importable("paddle2onnx"):
        return None
    try:
        autobackend.measure_and_record(model_dir, manifest, options, ["paddle", *others])
    except OSError:
        return None  # an unwritable cache: choose again next time
    return fastest_backend(model_hash_of(manifest, model_dir))


def backend_installed(backend: str) -> bool:
    """Whether the backend's package imports (openvino and onnxruntime are optional at run time)."""
    return _importable(backend)


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # a broken wheel raises more than ImportError
        return False
    return True


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if backend_installed(name)]


def model_hash_of(manifest: ModelManifest, model_dir: Path) -> str:
    if manifest.model_hash:
        return manifest.model_hash
    from shitu_cli.artifacts import sha256_file

    return sha256_file(Path(model_dir) / manifest.params_file)


# ---- ONNX conversion, cached under the shitu cache (never written into the model's folder)


def onnx_model(model_dir: Path, manifest: ModelManifest) -> Path:
    """The ONNX file for this model, converted by paddle2onnx on first use and reused while weights and program match."""
    import json

    if manifest.model_file.endswith((".onnx", ".xml")):
        # already ONNX (e.g. an ONNX int8 model), or OpenVINO IR from `shitu export`: nothing to convert
        return Path(model_dir) / manifest.model_file
    source = _conversion_source(model_dir, manifest)
    cache = _onnx_cache_dir(source)
    onnx_path, stamp = cache / ONNX_FILE, cache / ONNX_STAMP
    try:
        stamped = json.loads(stamp.read_text(encoding="utf-8"))
        if onnx_path.is_file() and all(stamped.get(key) == value for key, value in source.items()):
            return onnx_path
    except (OSError, ValueError):
        pass  # a missing or damaged stamp means: convert again
    data = _convert_to_onnx(model_dir, manifest)
    return _store_onnx(model_dir, source, data)


def onnx_cache_dir(model_dir: Path, manifest: ModelManifest) -> Path:
    """Where this model's ONNX conversion is (or would be) cached: SHITU_HOME/onnx/<weights hash>-<program hash>."""
    return _onnx_cache_dir(_conversion_source(model_dir, manifest))


def _conversion_source(model_dir: Path, manifest: ModelManifest) -> dict[str, str]:
    """What an ONNX file is made from: the weights (the model hash) and the program, which a re-export
    can change while the weights stay the same (as the demo detector's ONNX-friendly re-export did)."""
    from shitu_cli.artifacts import sha256_file

    return {"model_hash": model_hash_of(manifest, model_dir),
            "program_hash": sha256_file(Path(model_dir) / manifest.model_file)}


def _onnx_cache_dir(source: dict[str, str]) -> Path:
    # Keyed by weights and program, so two exports of the same weights never overwrite each other's
    # conversion; a model folder stays as its writer left it (shitu export writes an ONNX model folder).
    from shitu_cli.bench.record import shitu_home

    return shitu_home() / "onnx" / f"{source['model_hash'][:16]}-{source['program_hash'][:12]}"


def _store_onnx(model_dir: Path, source: dict[str, str], data: bytes) -> Path:
    import importlib.metadata
    import json

    from shitu_cli.artifacts import atomic_write_bytes, atomic_write_text

    stamp = {**source, "paddle2onnx": importlib.metadata.version("paddle2onnx"), "opset": ONNX_OPSET}
    cache = _onnx_cache_dir(source)
    try:
        atomic_write_bytes(cache / ONNX_FILE, data)
        atomic_write_text(cache / ONNX_STAMP, json.dumps(stamp, indent=2) + "\n")
    except OSError as exc:
        raise WorkFailed(f"cannot write the ONNX conversion ({exc.strerror or exc})", hint="set SHITU_HOME to a writable folder",
                         path=cache) from None
    return cache / ONNX_FILE


# Run in a child process: paddle2onnx aborts the whole process (SIGABRT) on ops it cannot
# convert (e.g. a quantized model's), calls sys.exit on other failures, and prints on stdout.
_CONVERT = """
import sys
import paddle2onnx
model, params, out, opset = sys.argv[1:5]
# optimize_tool=None: paddle2onnx's default optimizer pip-installs packages (it moved numpy to 2.x).
paddle2onnx.export(model, params, save_file=out, opset_version=int(opset), enable_onnx_checker=True, optimize_tool=None)
"""


def _convert_to_onnx(model_dir: Path, manifest: ModelManifest) -> bytes:
    import subprocess
    import tempfile

    if not _importable("paddle2onnx"):
        raise WorkFailed("paddle2onnx is not installed; onnxruntime and openvino need it", hint="pip install paddle2onnx==2.1.0")
    model_file, params_file = Path(model_dir) / manifest.model_file, Path(model_dir) / manifest.params_file
    with tempfile.TemporaryDirectory(prefix="shitu-onnx-") as scratch:
        out = Path(scratch) / ONNX_FILE
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(model_file), str(params_file), str(out), str(ONNX_OPSET)],
                              capture_output=True, text=True, errors="replace")
        if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
            reason = _conversion_error(done.stdout + done.stderr) or f"paddle2onnx exited with code {done.returncode}"
            raise WorkFailed(f"paddle2onnx cannot convert this model ({reason})", path=model_dir)
        return out.read_bytes()


def _conversion_error(chatter: str) -> str | None:
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", chatter)
    errors = [line.split("[ERROR]", 1)[1].strip() for line in plain.splitlines() if "[ERROR]" in line]
    errors = [e for e in errors if e and e != "None"]
    return errors[0][:300] if errors else None


@functools.lru_cache(maxsize=1)
def _openvino_core():
    import openvino as ov

    return ov.Core()


def _short_reason(exc: BaseException) -> str:
    """The last non-empty line of an exception: where C++ backends put the actual reason."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else exc.__class__.__name__
