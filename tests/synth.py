"""Synthetic but real image files for tests: classes of drawn objects that a tiny net can learn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (150, 50, 190), "cyan": (40, 200, 210), "orange": (240, 140, 30), "gray": (128, 128, 128),
}


def class_names(n: int) -> list[str]:
    """n distinct "color shape" class names (they contain a space on purpose)."""
    names = [f"{c} {s}" for s in SHAPES for c in COLORS]
    rng = np.random.default_rng(1234)
    return [names[i] for i in rng.permutation(len(names))[:n]]


def draw_object(name: str, size: int = 64, rng: np.random.Generator | None = None, background: np.ndarray | None = None) -> np.ndarray:
    """An RGB image of the class `name` with jittered position, scale, rotation and lighting."""
    rng = rng or np.random.default_rng(0)
    color_name, shape = name.split(" ", 1)
    color = np.array(COLORS[color_name], float) * rng.uniform(0.8, 1.1)
    if background is None:
        image = rng.integers(90, 170, (size, size, 3)).astype(np.uint8)
        image = cv2.GaussianBlur(image, (5, 5), 0)
    else:
        image = cv2.resize(background, (size, size))
    center = (size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size)
    radius = size * rng.uniform(0.25, 0.38)
    _draw_shape(image, shape, center, radius, tuple(int(v) for v in np.clip(color, 0, 255)), rng.uniform(0, 360))
    return image


def _draw_shape(image, shape, center, radius, color, angle) -> None:
    cx, cy = center
    if shape in ("circle", "ring"):
        cv2.circle(image, (int(cx), int(cy)), int(radius), color, -1 if shape == "circle" else max(2, int(radius / 3)))
        return
    corners = {"square": 4, "triangle": 3}.get(shape)
    if corners:
        angles = np.deg2rad(angle + np.arange(corners) * 360 / corners)
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(image, [points], color)
        return
    width = max(2, int(radius / 2.5))
    for extra in ((0, 90) if shape == "cross" else (0,)):
        theta = np.deg2rad(angle + extra)
        dx, dy = radius * np.cos(theta), radius * np.sin(theta)
        cv2.line(image, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), color, width)


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix or ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(data.tobytes())
    return path


def make_class_tree(root: Path, n_classes: int, per_class: int, size: int = 64, seed: int = 0, ext: str = ".jpg") -> list[str]:
    """root/<class name>/<i>.jpg for n_classes drawn classes; returns the class names."""
    rng = np.random.default_rng(seed)
    names = class_names(n_classes)
    for name in names:
        for i in range(per_class):
            write_rgb(Path(root) / name / f"{i:03d}{ext}", draw_object(name, size, rng))
    return names


def write_digits(root: Path, size: int = 32) -> Path:
    """scikit-learn's bundled 8x8 digits, upscaled to size px, one folder per class: a real small dataset."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        gray = cv2.resize((pixels * (255 / 16)).astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        path = Path(root) / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), gray)
    return Path(root)


def clustered_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """n L2-normalised vectors in clusters of ~10, as a product gallery's photos: for the index tuning tests."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 10, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
