"""INT8 through ONNX: paddle2onnx conversion (the predictor's cached one) + onnxruntime `quantize_static`
(QDQ, per-channel signed weights, unsigned activations), run by onnxruntime's CPU provider."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from shitu_cli.errors import WorkFailed

ONNX_INT8_FILE = "model.onnx"


def quantize_onnx(fp32_onnx: Path, out_file: Path, feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
                  op_types: list[str] | None = None) -> Path:
    """`feeds` gives a fresh iterator of {input name: batch} dicts; `op_types` limits the quantized ONNX
    ops (a detector keeps its box decoding and NMS in float: only its Conv ops are worth INT8)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:  # onnxruntime.quantization imports ml_dtypes (<0.5 with numpy 1.x) undeclared
        raise WorkFailed(f"onnxruntime.quantization cannot be imported ({exc})", hint="pip install 'ml_dtypes<0.5'") from None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds())

        def get_next(self):
            return next(self._feeds, None)

    import onnxruntime
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnxruntime.set_default_logger_severity(3)  # paddle2onnx leaves unused initializers; ORT warns about each
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    prepared = out_file.with_name("prepared.onnx")
    try:
        # paddle2onnx writes weights as Constant nodes and keeps BatchNorm apart: ORT's optimiser turns them
        # into initializers and folds BN into the convs, without which quantize_static leaves weights fp32.
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        _upgrade_opset(prepared)
        quantize_static(
            str(prepared), str(out_file), Reader(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=op_types,
        )
    except Exception as exc:  # onnxruntime raises assorted types for graphs it cannot quantize
        raise WorkFailed(f"onnxruntime quantize_static failed ({exc.__class__.__name__}: {str(exc)[:300]})", path=fp32_onnx) from None
    finally:
        prepared.unlink(missing_ok=True)
    return out_file


PER_CHANNEL_OPSET = 13  # DequantizeLinear's per-channel `axis` exists from opset 13; paddle2onnx writes 11


def _upgrade_opset(path: Path) -> None:
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    if model.opset_import[0].version < PER_CHANNEL_OPSET:
        onnx.save(version_converter.convert_version(model, PER_CHANNEL_OPSET), str(path))
