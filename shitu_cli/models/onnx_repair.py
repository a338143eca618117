"""Repairs to paddle2onnx 2.1.0's conversion of Paddle 3 (.json) programs, each checked against the program.

paddle2onnx 2.1.0 reads `leaky_relu`'s `negative_slope`, which a Paddle 3 program stores as a double
(`0.a_f64`), as a float: the ONNX LeakyRelu nodes it writes carry alpha 0 or a denormal (2.5e-43) instead
of YOLOv3's 0.1. The net then runs as ReLU, and YOLOv3's boxes and scores disagree with Paddle's
(benchmarks/det_memory.md, 0.05 box agreement before this repair). Each LeakyRelu gets its slope back
from the program it was converted from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from shitu_cli.errors import WorkFailed

# Part of the ONNX cache key: raising it converts conversions cached before a repair existed again.
REPAIRS_VERSION = "1"


def repair_conversion(onnx_bytes: bytes, program_file: Path) -> bytes:
    """The ONNX model `onnx_bytes` with what paddle2onnx misread from `program_file` put right."""
    program_file = Path(program_file)
    if program_file.suffix != ".json":
        return onnx_bytes  # legacy programs store the slope as a float, which paddle2onnx reads
    slopes = leaky_relu_slopes(program_file)
    if not slopes:
        return onnx_bytes
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    nodes = [node for node in model.graph.node if node.op_type == "LeakyRelu"]
    if len(nodes) != len(slopes):
        raise WorkFailed(f"paddle2onnx wrote {len(nodes)} LeakyRelu nodes for the program's {len(slopes)} leaky_relu ops, "
                         "so their slopes cannot be restored", path=program_file)
    for node, slope in zip(nodes, slopes):  # both in program order: paddle2onnx converts op by op
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("alpha", float(slope)))
    return model.SerializeToString()


def leaky_relu_slopes(program_file: Path) -> list[float]:
    """Each `leaky_relu` op's negative_slope, in program order."""
    program = json.loads(Path(program_file).read_text(encoding="utf-8"))
    return [float(_attribute(op, "negative_slope", 0.01)) for op in _ops(program) if op.get("#") == "1.leaky_relu"]


def _ops(node: Any) -> Iterator[dict]:
    """Every op of a Paddle 3 JSON program (ops are dicts whose "#" names a dialect op, e.g. "1.conv2d"), in order."""
    if isinstance(node, dict):
        if isinstance(node.get("#"), str) and node["#"].startswith("1.") and "A" in node:
            yield node
        for value in node.values():
            yield from _ops(value)
    elif isinstance(node, list):
        for value in node:
            yield from _ops(value)


def _attribute(op: dict, name: str, default: float) -> float:
    for attribute in op.get("A", []):
        if attribute.get("N") == name:
            return attribute["AT"]["D"]
    return default
