"""Old-IR (legacy .pdmodel) static export of a dygraph layer: what Paddle 3.3's PTQ pass can read.

Paddle 3.3 traces to PIR by default; `PostTrainingQuantization` only reads the old program
format. Under `OldIrGuard` several paddle functions refuse old-IR variables, so
`old_ir_compat` routes them to their legacy op builders while tracing.
"""

from __future__ import annotations

import contextlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LEGACY_MODEL = "inference.pdmodel"
LEGACY_PARAMS = "inference.pdiparams"


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Paddle's static tools print progress to stdout; keep stdout for results (`--json`)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _legacy_binary(name: str, legacy_op: str):
    """paddle.<name> calls the PIR-only C op; old-IR variables need the elementwise op instead."""
    import paddle
    from paddle.base.framework import Variable
    from paddle.base.layer_helper import LayerHelper
    from paddle.tensor.math import _elementwise_op

    original = getattr(paddle, name)

    def patched(x, y, name=None, **kwargs):
        if isinstance(x, Variable) or isinstance(y, Variable):
            return _elementwise_op(LayerHelper(legacy_op, x=x, y=y, axis=-1, name=name))
        return original(x, y, name=name, **kwargs)

    return original, patched


def _legacy_unary(module, name: str, legacy_op: str):
    """module.<name> calls the PIR-only C op; an old-IR variable needs the op appended the old way."""
    from paddle.base.framework import Variable
    from paddle.base.layer_helper import LayerHelper

    original = getattr(module, name)

    def patched(x, *args, **kwargs):
        if not isinstance(x, Variable):
            return original(x, *args, **kwargs)
        helper = LayerHelper(legacy_op)
        out = helper.create_variable_for_type_inference(x.dtype)
        helper.append_op(type=legacy_op, inputs={"X": [x]}, outputs={"Out": [out]})
        return out

    return original, patched


@contextmanager
def old_ir_compat() -> Iterator[None]:
    """Trace under the old IR, with shims for the paddle functions our nets use that refuse old-IR variables."""
    import paddle
    import paddle.nn.functional as F

    # paddle.multiply: PP-LCNet's SE block; F.sigmoid: PicoHead's class scores. Others (matmul,
    # exp) are not reached by the nets we export; add them here, named, when a net needs them.
    shims = [(paddle, "multiply", _legacy_binary("multiply", "elementwise_mul")),
             (F, "sigmoid", _legacy_unary(F, "sigmoid", "sigmoid"))]
    for module, name, (_, patched) in shims:
        setattr(module, name, patched)
    try:
        with paddle.pir_utils.OldIrGuard():
            yield
    finally:
        for module, name, (original, _) in shims:
            setattr(module, name, original)


def export_legacy(layer, out_dir: Path, input_size: tuple[int, int], input_name: str = "x") -> Path:
    """Trace `layer` (eval mode) to out_dir/inference.pdmodel + inference.pdiparams in the old format."""
    import paddle
    from paddle.static import InputSpec

    out_dir = Path(out_dir)
    layer.eval()
    spec = [InputSpec([None, 3, *input_size], "float32", input_name)]
    with old_ir_compat(), quiet_stdout():
        paddle.jit.save(layer, str(out_dir / "inference"), input_spec=spec)
    (out_dir / "inference.pdiparams.info").unlink(missing_ok=True)  # training-only metadata
    return out_dir
