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
from shitu_cli.infer import onnx_convert
from shitu_cli.infer.onnx_convert import model_hash_of, onnx_model
from shitu_cli.models.manifest import ModelManifest, read_model_manifest

BACKENDS = ("paddle", "onnxruntime", "openvino")
BACKEND_CHOICES = BACKENDS + ("auto",)
PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class PredictorOptions:
    backend: str = "paddle"  # paddle | onnxruntime | openvino | auto
    threads: int = 1
    mkldnn: bool = True  # Paddle only: oneDNN kernels
    precision: str = "fp32"  # fp32 | bf16 | int8 (int8 models come from `shitu compress`)
    low_memory: bool = False  # onnxruntime only: the settings of infer/low_memory.py, for devices short of memory


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
            if manifest.extra.get("family") == "yolov3" or _has_leaky_relu(self.model_files[0]):
                # Paddle 3.3 segfaults (pir::FloatAttribute::data) building the FusedConv2dOp that fuses a
                # conv with a leaky ReLU, whose slope a Paddle 3 program stores as a double (YOLOv3's
                # neck and head, or any net with one); the rest of the graph keeps oneDNN.
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


def _has_leaky_relu(program_file: Path) -> bool:
    return program_file.suffix == ".json" and b'"1.leaky_relu"' in program_file.read_bytes()


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
        recorded = manifest.extra.get("low_memory") is True  # `shitu export --low-memory` wrote the form itself
        low_memory = options.low_memory or recorded
        if options.low_memory and not recorded:
            from shitu_cli.infer.low_memory import low_memory_form

            onnx_path = low_memory_form(onnx_path)
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
        if low_memory:
            from shitu_cli.infer.low_memory import apply_session_options

            apply_session_options(session_options)
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


onnx_cache_dir = onnx_convert.onnx_cache_dir  # its old home, where callers import it from
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
    options = _low_memory_backend(options)
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


def _low_memory_backend(options: PredictorOptions) -> PredictorOptions:
    """Low memory runs on onnxruntime: "auto" picks it; Paddle and OpenVINO are refused by name."""
    if not options.low_memory or options.backend == "onnxruntime":
        return options
    if options.backend == "auto":
        return dataclasses.replace(options, backend="onnxruntime")
    raise BadInput(f"--low-memory runs on onnxruntime, not {options.backend}",
                   hint="drop --backend (or pass --backend onnxruntime); Paddle Inference's runtime alone takes about "
                        "300 MB (benchmarks/det_memory.md)")


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


@functools.lru_cache(maxsize=1)
def _openvino_core():
    import openvino as ov

    return ov.Core()


def _short_reason(exc: BaseException) -> str:
    """The last non-empty line of an exception: where C++ backends put the actual reason."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else exc.__class__.__name__
