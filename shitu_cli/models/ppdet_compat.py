"""Every Paddle-3 compatibility fix that paddledet 2.6.0 needs, in one place; `apply()` is idempotent.

Each shim wraps one upstream function with a small replacement and names the fault it
works around. Nothing here copies ppdet code; the originals stay reachable as `__wrapped__`.
"""

from __future__ import annotations

import functools
import inspect
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_APPLIED = False
_MARK = "__shitu_shim__"


def apply() -> None:
    """Install every shim once; later calls do nothing."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_multiclass_nms()
    _patch_matrix_nms()
    _patch_pil_textsize()
    _patch_v2_assigner_labels()
    _patch_csppan_scales()
    _patch_checkpoint_loading()
    _APPLIED = True


def is_shim(func: Any) -> bool:
    return bool(getattr(func, _MARK, False))


def _mark(shim: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    functools.update_wrapper(shim, original)
    setattr(shim, _MARK, True)
    return shim


# --- 1. multiclass_nms under PIR -------------------------------------------------------
# Upstream fault: ppdet.modeling.ops.multiclass_nms builds its op with the old
# LayerHelper/append_op API whenever it is not in dynamic mode. Paddle 3 traces export
# programs in PIR, where append_op refuses PIR `Value`s ("The type of '%BBoxes' in
# operator multiclass_nms3 should be one of [str, bytes, Variable]"), so exporting any
# model with NMS fails. Under PIR the op must be called as `_C_ops.multiclass_nms3`.
def _patch_multiclass_nms() -> None:
    from ppdet.modeling import ops

    original = ops.multiclass_nms
    if is_shim(original):
        return

    def multiclass_nms(bboxes, scores, score_threshold, nms_top_k, keep_top_k, nms_threshold=0.3,
                       normalized=True, nms_eta=1.0, background_label=-1, return_index=False,
                       return_rois_num=True, rois_num=None, name=None):
        import paddle
        from paddle import _C_ops

        if not paddle.framework.in_pir_mode():
            return original(bboxes, scores, score_threshold, nms_top_k, keep_top_k, nms_threshold, normalized,
                            nms_eta, background_label, return_index, return_rois_num, rois_num, name)
        output, index, nms_rois_num = _C_ops.multiclass_nms3(
            bboxes, scores, rois_num, score_threshold, nms_top_k, keep_top_k, nms_threshold, normalized,
            nms_eta, background_label,
        )
        return output, nms_rois_num, (index if return_index else None)

    ops.multiclass_nms = _mark(multiclass_nms, original)


# --- 1b. matrix_nms in Paddle 3 ---------------------------------------------------------
# Upstream fault: ppdet.modeling.ops.matrix_nms calls `_C_ops.matrix_nms(bboxes, scores, *attrs)` with
# Paddle 2's ("name", value, ...) attribute list, which Paddle 3's positional signature refuses, and
# builds the op with append_op outside dygraph, which PIR refuses; so MatrixNMS (PP-YOLO's NMS)
# neither evaluates nor exports. paddle.vision.ops.matrix_nms takes the same arguments and handles both.
def _patch_matrix_nms() -> None:
    from ppdet.modeling import ops

    original = ops.matrix_nms
    if is_shim(original):
        return

    def matrix_nms(bboxes, scores, score_threshold, post_threshold, nms_top_k, keep_top_k, use_gaussian=False,
                   gaussian_sigma=2.0, background_label=0, normalized=True, return_index=False,
                   return_rois_num=True, name=None):
        from paddle.vision.ops import matrix_nms as paddle_matrix_nms

        return paddle_matrix_nms(bboxes, scores, float(score_threshold), float(post_threshold), int(nms_top_k),
                                 int(keep_top_k), bool(use_gaussian), float(gaussian_sigma), int(background_label),
                                 bool(normalized), return_index, return_rois_num, name)

    ops.matrix_nms = _mark(matrix_nms, original)


# --- 2. full-graph export ----------------------------------------------------------------
# Upstream fault: paddle 3's `paddle.jit.to_static` defaults to SOT (bytecode tracing with
# fallback), which never builds `forward.main_program`; ppdet's Trainer.export reads that
# attribute to prune its input spec and fails. ENABLE_FALL_BACK=False selects the AST
# full-graph path that still builds it. Scoped to the export, so training is untouched.
@contextmanager
def full_graph_export() -> Iterator[None]:
    previous = os.environ.get("ENABLE_FALL_BACK")
    os.environ["ENABLE_FALL_BACK"] = "False"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ENABLE_FALL_BACK", None)
        else:
            os.environ["ENABLE_FALL_BACK"] = previous


# --- 2b. nearest upsampling that paddle2onnx can read ------------------------------------
# Upstream fault: paddle2onnx 2.1 refuses the `scale` attribute that `nn.Upsample(scale_factor=2)`
# gives nearest_interp_v2 ("the 0th elementwise MUST be ir::FloatAttribute"), so no PicoDet
# export (CSP-PAN upsamples) converts to ONNX. Asking for the doubled size instead is the same
# nearest-neighbour result and converts. Scoped to an export: training keeps the layer as is.
# YOLOv3's FPN and PP-YOLOE's CustomCSPPAN call `F.interpolate(x, scale_factor=2.)` directly, so the
# function is swapped too (for integer nearest factors only) while the export traces. (Their ONNX
# conversions then load, but paddle2onnx 2.1's YOLOv3 boxes differ from Paddle's: `--backend auto`
# only picks a backend whose outputs agree, so those stay on Paddle Inference.)
@contextmanager
def onnx_convertible_upsampling(model: Any) -> Iterator[None]:
    import paddle.nn as nn

    swapped = []
    for layer in model.sublayers():
        factor = getattr(layer, "scale_factor", None)
        if isinstance(layer, nn.Upsample) and layer.mode == "nearest" and isinstance(factor, (int, float)) \
                and float(factor).is_integer():
            layer.forward = functools.partial(_upsample_to_size, factor=int(factor))
            swapped.append(layer)
    functional = nn.functional
    original = functional.interpolate

    def interpolate(x, size=None, scale_factor=None, mode="nearest", *args, **kwargs):
        if size is None and mode == "nearest" and isinstance(scale_factor, (int, float)) \
                and float(scale_factor).is_integer() and kwargs.get("data_format") in (None, "NCHW"):
            return _upsample_to_size(x, int(scale_factor))
        return original(x, size, scale_factor, mode, *args, **kwargs)

    functional.interpolate = interpolate
    try:
        yield
    finally:
        functional.interpolate = original
        for layer in swapped:
            del layer.forward  # back to the class's own forward


def _upsample_to_size(x, factor: int):
    import paddle
    from paddle.nn.functional.common import interpolate  # the original, also while the public name is swapped

    shape = paddle.shape(x)
    return interpolate(x, size=[shape[2] * factor, shape[3] * factor], mode="nearest")


# --- 2c. YOLOv3's exports take image + scale_factor like every other detector --------------
# Not an upstream fault but a contract: ppdet's YOLOv3 post-processing reads an `im_shape` input (the
# resized image's height and width), which would give its exports a third input. A detector's input is
# always the resized image, so while an export traces, im_shape is computed from it; ppdet's input
# pruning then drops the input (and our own exporters never declare it).
@contextmanager
def im_shape_from_image(model: Any) -> Iterator[None]:
    if getattr(model, "post_process", None) is None or not hasattr(model, "yolo_head"):
        yield  # PicoDet and PP-YOLOE read scale_factor only
        return

    def forward(inputs):
        import paddle

        image = inputs["image"]
        size = paddle.cast(paddle.shape(image)[2:], "float32").unsqueeze(0)
        return type(model).forward(model, {**inputs, "im_shape": paddle.expand(size, [paddle.shape(image)[0], 2])})

    model.forward = forward
    try:
        yield
    finally:
        del model.forward  # back to the class's own forward


# --- 3. Pillow 10 removed ImageDraw.textsize -----------------------------------------------
# Upstream fault: ppdet.utils.visualizer.draw_bbox calls `draw.textsize(text)`, which
# Pillow 10 removed; any prediction drawn by ppdet raises AttributeError. Re-add it on
# top of `textbbox`, which is what Pillow's deprecation note says to use.
def _patch_pil_textsize() -> None:
    from PIL import ImageDraw

    existing = getattr(ImageDraw.ImageDraw, "textsize", None)
    if existing is not None:
        return

    def textsize(self, text, font=None, *args, **kwargs):
        left, top, right, bottom = self.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    setattr(textsize, _MARK, True)
    ImageDraw.ImageDraw.textsize = textsize


# --- 4. PicoDet v2 assigners need int64 labels ---------------------------------------------
# Upstream fault: ppdet's readers produce gt_class as int32, while PicoHeadV2's
# ATSSAssigner (its static assigner for the first epochs) compares it with int64 index
# tensors; paddle 3 refuses int64/int32 type promotion ("Type promotion only support
# calculations between floating-point numbers ...") on the first training step.
# TaskAlignedAssigner only warns today; cast for both so neither depends on promotion.
def _patch_v2_assigner_labels() -> None:
    from ppdet.modeling.assigners import atss_assigner, task_aligned_assigner

    for cls in (atss_assigner.ATSSAssigner, task_aligned_assigner.TaskAlignedAssigner):
        if not is_shim(cls.forward):
            cls.forward = _mark(_int64_labels(cls.forward), cls.forward)


def _int64_labels(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an assigner's `forward` so whatever is passed as `gt_labels` arrives as int64."""
    signature = inspect.signature(forward)

    def shim(*args, **kwargs):
        import paddle

        bound = signature.bind(*args, **kwargs)
        bound.arguments["gt_labels"] = _as_int64(bound.arguments["gt_labels"], paddle)
        return forward(*bound.args, **bound.kwargs)

    return shim


def _as_int64(labels, paddle):
    if isinstance(labels, paddle.Tensor) and labels.dtype != paddle.int64:
        return labels.cast("int64")
    return labels


# --- 5. CSPPAN grows its default spatial_scales on every build -----------------------------
# Upstream fault: ppdet.modeling.necks.csp_pan.CSPPAN.__init__ appends to its
# `spatial_scales` argument when num_features == 4, and that argument defaults to a
# shared list. The second PicoDet built in one process (e.g. the export model after
# the training model) gets 4 scales for 3 inputs and fails `assert len(inputs) ==
# len(self.in_channels)`. Hand every build its own copy of the upstream default.
CSPPAN_DEFAULT_SCALES = (0.125, 0.0625, 0.03125)


def _patch_csppan_scales() -> None:
    from ppdet.modeling.necks.csp_pan import CSPPAN

    original = CSPPAN.__init__
    if is_shim(original):
        return
    signature = inspect.signature(original)

    def __init__(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        scales = bound.arguments.get("spatial_scales", CSPPAN_DEFAULT_SCALES)
        bound.arguments["spatial_scales"] = list(scales)
        original(*bound.args, **bound.kwargs)

    CSPPAN.__init__ = _mark(__init__, original)


# --- 6. ppdet unpickles weights with paddle.load -------------------------------------------
# Upstream fault (a safety one): ppdet.utils.checkpoint reads --pretrained, resume and export
# weights with `paddle.load`, an unrestricted unpickle: a crafted .pdparams runs code. Its module
# sees paddle through one global name; give it a paddle whose `load` is the array-only reader
# (tensors back, as paddle.load returns), everything else untouched.
class _ArrayOnlyPaddle:
    def __init__(self, paddle_module: Any):
        self._paddle = paddle_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._paddle, name)

    def load(self, path: str, **_ignored: Any) -> Any:
        from shitu_cli.models.legacy import load_state

        return _to_tensors(load_state(path), self._paddle)


def _to_tensors(value: Any, paddle: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {key: _to_tensors(item, paddle) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return paddle.to_tensor(value)
    return value


def _patch_checkpoint_loading() -> None:
    import paddle
    from ppdet.utils import checkpoint

    if not isinstance(checkpoint.paddle, _ArrayOnlyPaddle):
        checkpoint.paddle = _ArrayOnlyPaddle(paddle)
