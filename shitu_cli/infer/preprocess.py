"""Deterministic model-input preprocessing, shared by inference and by evaluation during training.

One cv2.resize straight to the net's input, then one fused normalise + HWC->NCHW pass for the
whole batch (OpenCV's blobFromImagesWithParams): no per-pixel Python.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from shitu_cli.models.manifest import Preprocess

INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def resize_for_model(rgb: np.ndarray, preprocess: Preprocess, input_size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image to exactly input_size (h, w) as the manifest says."""
    height, width = input_size
    interpolation = INTERPOLATIONS[preprocess.interpolation]
    if preprocess.resize == "direct":
        return cv2.resize(rgb, (width, height), interpolation=interpolation)
    if preprocess.resize == "short":
        return _resize_short_center_crop(rgb, preprocess.resize_short or max(height, width), (height, width), interpolation)
    raise ValueError(f"unknown resize mode {preprocess.resize!r}")


def _resize_short_center_crop(rgb: np.ndarray, short: int, size: tuple[int, int], interpolation: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    ratio = short / min(h, w)
    new_w, new_h = max(size[1], round(w * ratio)), max(size[0], round(h * ratio))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
    return resized[top : top + size[0], left : left + size[1]]


def normalize_batch(images: Sequence[np.ndarray], preprocess: Preprocess) -> np.ndarray:
    """Same-sized RGB uint8 images -> float32 NCHW, (x/255 - mean)/std in one fused pass."""
    params = cv2.dnn.Image2BlobParams()
    params.scalefactor = tuple(1.0 / (255.0 * s) for s in preprocess.std)
    params.mean = tuple(255.0 * m for m in preprocess.mean)
    params.ddepth = cv2.CV_32F
    params.datalayout = cv2.dnn.DNN_LAYOUT_NCHW
    params.swapRB = preprocess.channel_order == "BGR"  # our images are RGB already
    return cv2.dnn.blobFromImagesWithParams(list(images), params)


def preprocess_batch(images: Sequence[np.ndarray], preprocess: Preprocess, input_size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 images of any sizes -> the model's float32 NCHW batch."""
    return normalize_batch([resize_for_model(image, preprocess, input_size) for image in images], preprocess)
