"""A Paddle model's ONNX conversion: paddle2onnx run once in a child process, repaired where paddle2onnx
misreads the program (models/onnx_repair.py), and cached under SHITU_HOME/onnx by weights and program hash
(never written into the model's folder)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from shitu_cli.errors import WorkFailed
from shitu_cli.models.manifest import ModelManifest

ONNX_FILE = "model.onnx"
ONNX_STAMP = "source.json"
ONNX_OPSET = 11


def model_hash_of(manifest: ModelManifest, model_dir: Path) -> str:
    if manifest.model_hash:
        return manifest.model_hash
    from shitu_cli.artifacts import sha256_file

    return sha256_file(Path(model_dir) / manifest.params_file)


def onnx_model(model_dir: Path, manifest: ModelManifest) -> Path:
    """The ONNX file for this model, converted by paddle2onnx on first use and reused while weights, program
    and the repairs applied to the conversion match."""
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
    return _store_onnx(source, data)


def onnx_cache_dir(model_dir: Path, manifest: ModelManifest) -> Path:
    """Where this model's ONNX conversion is (or would be) cached: SHITU_HOME/onnx/<weights hash>-<program hash>."""
    return _onnx_cache_dir(_conversion_source(model_dir, manifest))


def _conversion_source(model_dir: Path, manifest: ModelManifest) -> dict[str, str]:
    """What an ONNX file is made from: the weights (the model hash), the program, which a re-export can change
    while the weights stay the same (as the demo detector's ONNX-friendly re-export did), and the version of
    our repairs (a conversion cached before a repair existed is converted again)."""
    from shitu_cli.artifacts import sha256_file
    from shitu_cli.models.onnx_repair import REPAIRS_VERSION

    return {"model_hash": model_hash_of(manifest, model_dir),
            "program_hash": sha256_file(Path(model_dir) / manifest.model_file),
            "repairs": REPAIRS_VERSION}


def _onnx_cache_dir(source: dict[str, str]) -> Path:
    # Keyed by weights and program, so two exports of the same weights never overwrite each other's
    # conversion; a model folder stays as its writer left it (shitu export writes an ONNX model folder).
    from shitu_cli.bench.record import shitu_home

    return shitu_home() / "onnx" / f"{source['model_hash'][:16]}-{source['program_hash'][:12]}"


def _store_onnx(source: dict[str, str], data: bytes) -> Path:
    import importlib.metadata

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
    from shitu_cli.models.onnx_repair import repair_conversion

    if importlib.util.find_spec("paddle2onnx") is None:
        raise WorkFailed("paddle2onnx is not installed; onnxruntime and openvino need it", hint="pip install paddle2onnx==2.1.0")
    model_file, params_file = Path(model_dir) / manifest.model_file, Path(model_dir) / manifest.params_file
    with tempfile.TemporaryDirectory(prefix="shitu-onnx-") as scratch:
        out = Path(scratch) / ONNX_FILE
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(model_file), str(params_file), str(out), str(ONNX_OPSET)],
                              capture_output=True, text=True, errors="replace")
        if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
            reason = _conversion_error(done.stdout + done.stderr) or f"paddle2onnx exited with code {done.returncode}"
            raise WorkFailed(f"paddle2onnx cannot convert this model ({reason})", path=model_dir)
        return repair_conversion(out.read_bytes(), model_file)


def _conversion_error(chatter: str) -> str | None:
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", chatter)
    errors = [line.split("[ERROR]", 1)[1].strip() for line in plain.splitlines() if "[ERROR]" in line]
    errors = [e for e in errors if e and e != "None"]
    return errors[0][:300] if errors else None
