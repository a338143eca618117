"""`--low-memory`: onnxruntime settings and a model form that keep the peak memory of a predicting process low,
for devices with little memory left for the model (PaddleDetection's inspection case: 200 MB).

Measured on YOLOv3-MobileNetV1 (92 MB of fp32 weights, benchmarks/det_memory.md), a default session peaks
at about 3.5x the weights: the protobuf, the initializers made from paddle2onnx's Constant nodes, batch norm
folded into new conv weights and the NCHWc layout pass's reordered copies are all alive at once. Low memory:
- the model is loaded in a form ORT has already optimised (batch norm folded, constants as initializers), with
  its weights in a side file that onnxruntime maps instead of copying through the protobuf;
- the session optimises at the extended level: everything but the layout pass that copies each conv weight
  (QDQ INT8 fusions are kept);
- no CPU memory arena and no memory pattern, so activations are freed as they die instead of being pooled.
It costs latency on fp32 models (about 1.3x there), little on INT8 ones.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shitu_cli.errors import WorkFailed

FORM_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
FORM_VERSION = "1"  # part of the cache key: raising it rebuilds the cached forms
# Weights larger than this go to the side file (small constants such as shapes stay in the graph).
EXTERNAL_MIN_BYTES = 1024


def apply_session_options(session_options) -> None:
    """The low-memory settings on an onnxruntime SessionOptions (threads are set by the caller)."""
    import onnxruntime as ort

    session_options.enable_cpu_mem_arena = False
    session_options.enable_mem_pattern = False
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def low_memory_form(onnx_path: Path) -> Path:
    """The low-memory form of `onnx_path`, built once (in a child process: ORT's optimiser holds the graph several
    times over while it works, which the predicting process should not pay) and cached under
    SHITU_HOME/onnx-low-memory by the ONNX file's content."""
    from shitu_cli.artifacts import sha256_file
    from shitu_cli.bench.record import shitu_home
    from shitu_cli.models.export import atomic_dir

    onnx_path = Path(onnx_path)
    key = sha256_file(onnx_path)[:20]
    cache = shitu_home() / "onnx-low-memory" / f"{key}-v{FORM_VERSION}"
    if (cache / FORM_FILE).is_file() and (cache / WEIGHTS_FILE).is_file():
        return cache / FORM_FILE
    try:
        with atomic_dir(cache) as staging:
            done = subprocess.run([sys.executable, "-c", _OPTIMISE, str(onnx_path), str(staging / FORM_FILE), WEIGHTS_FILE,
                                   str(EXTERNAL_MIN_BYTES)], capture_output=True, text=True, errors="replace")
            if done.returncode != 0 or not (staging / FORM_FILE).is_file():
                reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
                raise WorkFailed(f"onnxruntime could not write the low-memory form of the model ({reason})", path=onnx_path)
            if not (staging / WEIGHTS_FILE).is_file():
                (staging / WEIGHTS_FILE).write_bytes(b"")  # a model with no weight above the threshold
    except OSError as exc:
        raise WorkFailed(f"cannot write the low-memory form ({exc.strerror or exc})", hint="set SHITU_HOME to a writable folder",
                         path=cache) from None
    return cache / FORM_FILE


# ORT's own optimiser writes the form: the basic level only (constant folding, batch norm into conv, redundant
# nodes), which every CPU runs alike; the session then applies the extended level on top at load.
_OPTIMISE = """
import sys
import onnxruntime as ort
source, out, weights, min_bytes = sys.argv[1:5]
options = ort.SessionOptions()
options.log_severity_level = 3
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.optimized_model_filepath = out
options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights)
options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", min_bytes)
ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
"""
