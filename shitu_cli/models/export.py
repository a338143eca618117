"""Exporting a dygraph layer to a Paddle Inference model dir, atomically, with its manifest."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from shitu_cli.artifacts import current_umask
from shitu_cli.models.manifest import ModelManifest, write_model_manifest

MODEL_FILE = "inference.json"
PARAMS_FILE = "inference.pdiparams"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` whole, on error it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; a model dir should be shareable
    try:
        yield staging
        backup = final.with_name(f".{final.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        if final.exists():
            os.replace(final, backup)
        os.replace(staging, final)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def fresh_name_scopes() -> Iterator[None]:
    """Trace with the op name scopes of a fresh process. Paddle 3.3 records each op's layer path
    ("/ConvBNLayer_1/Conv2D/") from a process-wide tree that keeps every earlier trace's children,
    so without this the same model exports to different inference.json bytes after any other export."""
    from paddle.base import framework
    from paddle.utils import unique_name

    saved = framework._name_struct
    framework._name_struct = framework.NameStruct()
    try:
        with unique_name.guard():
            yield
    finally:
        framework._name_struct = saved


def export_layer(layer, out_dir: Path, input_shapes: Sequence[Sequence[int | None]], manifest: ModelManifest,
                 input_names: Sequence[str] = ("x",), dtypes: Sequence[str] | None = None) -> Path:
    """Trace `layer` (eval mode) to `out_dir`/inference.{json,pdiparams} and write shitu.yaml.

    `input_shapes` use None for the batch dimension. The layer's forward must return the
    tensor(s) the predictor should hand back (wrap dict-returning models first).
    """
    import paddle
    from paddle.static import InputSpec

    layer.eval()
    dtypes = dtypes or ["float32"] * len(input_shapes)
    specs = [InputSpec(list(shape), dtype, name) for shape, dtype, name in zip(input_shapes, dtypes, input_names)]
    with atomic_dir(out_dir) as staging:
        with fresh_name_scopes():
            paddle.jit.save(layer, str(staging / "inference"), input_spec=specs)
        manifest.model_file, manifest.params_file = MODEL_FILE, PARAMS_FILE
        manifest.input_names = list(input_names)
        write_model_manifest(staging, manifest)
    return Path(out_dir)
