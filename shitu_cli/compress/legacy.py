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
    from shitu_cli.models.export import fresh_name_scopes

    with old_ir_compat(), fresh_name_scopes(), quiet_stdout():
        paddle.jit.save(layer, str(out_dir / "inference"), input_spec=spec)
    (out_dir / "inference.pdiparams.info").unlink(missing_ok=True)  # training-only metadata
    return out_dir


# ----------------------------------------------------------------------------- a canonical program file


def canonical_program(data: bytes) -> bytes:
    """The same old-format program with its ops in one deterministic dependency order, its variables sorted
    by name and the op_callstack debug attribute dropped, so the same model is the same bytes.

    Paddle's quantization passes walk graph nodes from unordered sets, so two PTQ runs of one model
    write the same ops in different orders (and each op's Python call stack besides); `shitu
    reproduce` would then call identical INT8 models different.
    """
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    program.ParseFromString(data)
    for block in program.blocks:
        ops = [_without_callstack(block.ops[i], framework_pb2) for i in _dependency_order(list(block.ops))]
        variables = sorted(block.vars, key=lambda var: var.name)
        variables = [_copy(var, framework_pb2.VarDesc) for var in variables]
        del block.ops[:]
        block.ops.extend(ops)
        del block.vars[:]
        block.vars.extend(variables)
    return program.SerializeToString(deterministic=True)


def _arguments(slots) -> list[str]:
    return [name for slot in slots for name in slot.arguments]


def _dependency_order(ops: list) -> list[int]:
    """Kahn's topological order of the ops (each depends on the last earlier writer of each input), ties
    broken by what an op writes, its type and what it reads: names that do not depend on set order."""
    import heapq

    last_writer: dict[str, int] = {}
    waits_for = [set() for _ in ops]
    for index, op in enumerate(ops):
        waits_for[index] = {last_writer[name] for name in _arguments(op.inputs) if name in last_writer}
        for name in _arguments(op.outputs):
            last_writer[name] = index
    unlocks = [[] for _ in ops]
    for index, needed in enumerate(waits_for):
        for earlier in needed:
            unlocks[earlier].append(index)

    def key(index: int):
        op = ops[index]
        return (op.type == "fetch", sorted(_arguments(op.outputs)), op.type, sorted(_arguments(op.inputs)), index)

    pending = [len(needed) for needed in waits_for]
    ready = [key(i) for i in range(len(ops)) if not pending[i]]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)[-1]
        order.append(index)
        for later in unlocks[index]:
            pending[later] -= 1
            if not pending[later]:
                heapq.heappush(ready, key(later))
    return order


def _without_callstack(op, framework_pb2):
    copy = _copy(op, framework_pb2.OpDesc)
    kept = [_copy(attr, framework_pb2.OpDesc.Attr) for attr in copy.attrs if attr.name != "op_callstack"]
    del copy.attrs[:]
    copy.attrs.extend(kept)
    return copy


def _copy(message, kind):
    copy = kind()
    copy.CopyFrom(message)
    return copy
