"""Post-training INT8 quantization of an old-format static model with Paddle's PTQ (runs on oneDNN INT8)."""

from __future__ import annotations

import contextlib
import io
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from shitu_cli.compress.legacy import LEGACY_MODEL, LEGACY_PARAMS, canonical_program
from shitu_cli.errors import BadInput, WorkFailed

ALGOS = ("hist", "KL", "avg", "abs_max", "mse", "emd")


CONV_OPS = ("conv2d", "depthwise_conv2d")


def _conv_only_quantizer():
    """Paddle's base quantizer for the conv ops, without its "observer" ops (scales after every other op)."""
    from paddle.static.quantization.quant_config import BaseQuantizer

    class ConvOnlyQuantizer(BaseQuantizer):
        @property
        def observer_operation_types(self):
            return []

    return ConvOnlyQuantizer(quantizable_op_type=list(CONV_OPS))


@contextmanager
def _ptq_chatter_hidden() -> Iterator[None]:
    """Paddle's PTQ draws a progress bar per phase and logs each step; the stage lines of `shitu compress`
    already say what runs, and stdout must stay free for --json. Failures still raise."""
    # paddle.static.io also warns that PTQ loads the model "the old way", which is the point here.
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name.startswith(("paddle.static.quantization", "paddle.static.io"))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_algo(algo: str) -> str:
    if algo not in ALGOS:
        raise BadInput(f"unknown PTQ algorithm {algo!r}", hint=f"choose one of: {', '.join(ALGOS)}")
    return algo


def quantize_static(fp32_dir: Path, out_dir: Path, feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
                    algo: str = "hist", batch_count: int | None = None, conv_only: bool = False) -> Path:
    """INT8 model (inference.pdmodel + .pdiparams) in out_dir from the legacy fp32 model in fp32_dir.

    `feeds` gives a fresh iterator of {input name: batch} dicts. onnx_format=True stores
    quantize/dequantize pairs with int8-valued weights, which is what oneDNN's INT8 pass expects;
    channel-wise weight scales keep depthwise convs accurate. `conv_only` leaves every other op
    without a scale: Paddle's default also records scales after reshape, concat, softmax and the
    like, and on PicoDet's head oneDNN's quantize-squash pass then refuses the graph.
    """
    import paddle
    from paddle.static.quantization import PostTrainingQuantization

    paddle.enable_static()
    try:
        with paddle.pir_utils.OldIrGuard(), _ptq_chatter_hidden():
            executor = paddle.static.Executor(paddle.CPUPlace())
            ptq = PostTrainingQuantization(
                executor=executor,
                model_dir=str(fp32_dir),
                model_filename=LEGACY_MODEL,
                params_filename=LEGACY_PARAMS,
                data_loader=feeds,
                batch_nums=batch_count,
                algo=check_algo(algo),
                onnx_format=True,
                weight_quantize_type="channel_wise_abs_max",
                is_use_cache_file=False,
                quantizable_op_type=list(CONV_OPS if conv_only else []),
            )
            if conv_only:
                ptq.quant_config = _conv_only_quantizer()  # PTQ's constructor offers no way to pass one
            ptq.quantize()
            ptq.save_quantized_model(str(out_dir), model_filename=LEGACY_MODEL, params_filename=LEGACY_PARAMS)
        program_file = Path(out_dir) / LEGACY_MODEL
        program_file.write_bytes(canonical_program(program_file.read_bytes()))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise WorkFailed(f"post-training quantization failed ({exc.__class__.__name__}: {str(exc)[:300]})", path=fp32_dir) from None
    finally:
        paddle.disable_static()
    return Path(out_dir)
