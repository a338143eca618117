"""Training-time augmentation for cls and rec (numpy + OpenCV, driven by an explicit RNG so a
seeded epoch is reproducible). Evaluation uses shitu_cli.infer.preprocess, exactly as inference does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


def random_resized_crop(rgb: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop: a random area and aspect, resized to size (h, w)."""
    height, width = rgb.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            return cv2.resize(rgb[top : top + h, left : left + w], (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # fallback: whole image


def random_flip(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rgb[:, ::-1] if rng.random() < 0.5 else rgb


def random_rotate(rgb: np.ndarray, max_degrees: float, rng: np.random.Generator) -> np.ndarray:
    if max_degrees <= 0:
        return rgb
    height, width = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-max_degrees, max_degrees), 1.0)
    return cv2.warpAffine(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


@dataclass
class TrainAugment:
    """rotate -> random resized crop -> flip; normalisation happens batch-wise afterwards."""

    input_size: tuple[int, int]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    rotate_degrees: float = 0.0
    flip: bool = True

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rgb = random_rotate(rgb, self.rotate_degrees, rng)
        rgb = random_resized_crop(rgb, self.input_size, rng, scale=self.crop_scale)
        if self.flip:
            rgb = random_flip(rgb, rng)
        return np.ascontiguousarray(rgb)
