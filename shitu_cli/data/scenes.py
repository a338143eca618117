"""Composite scenes for the built-in demo: real object photos pasted onto real backgrounds at new
positions, scales, rotations and lighting, with exact boxes (COCO) for training and scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shitu_cli.artifacts import atomic_write_text


@dataclass
class PlacedObject:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in scene pixels


def paste_object(scene: np.ndarray, obj: np.ndarray, rng: np.random.Generator, placed: list[PlacedObject],
                 label: str, scale_range=(0.28, 0.5), max_rotation: float = 20.0) -> PlacedObject | None:
    """Paste `obj` rotated/scaled/relit somewhere in `scene` not overlapping earlier objects much."""
    height, width = scene.shape[:2]
    side = rng.uniform(*scale_range) * min(height, width)
    ratio = side / max(obj.shape[:2])
    resized = cv2.resize(obj, (max(8, round(obj.shape[1] * ratio)), max(8, round(obj.shape[0] * ratio))), interpolation=cv2.INTER_AREA)
    lit = np.clip(resized.astype(np.float32) * rng.uniform(0.7, 1.25) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
    rotated, mask = _rotate_with_mask(lit, rng.uniform(-max_rotation, max_rotation))
    rh, rw = rotated.shape[:2]
    if rh >= height or rw >= width:
        return None
    for _ in range(30):
        x, y = int(rng.integers(0, width - rw)), int(rng.integers(0, height - rh))
        box = _mask_box(mask, x, y)
        if all(_iou(box, other.box) < 0.05 for other in placed):
            region = scene[y : y + rh, x : x + rw]
            region[mask > 0] = rotated[mask > 0]
            return PlacedObject(label, box)
    return None


def _rotate_with_mask(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(h * sin + w * cos), int(h * cos + w * sin)
    matrix[0, 2] += new_w / 2 - w / 2
    matrix[1, 2] += new_h / 2 - h / 2
    rotated = cv2.warpAffine(image, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full((h, w), 255, np.uint8), matrix, (new_w, new_h), flags=cv2.INTER_NEAREST)
    return rotated, mask


def _mask_box(mask: np.ndarray, x: int, y: int) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(x + xs.min()), float(y + ys.min()), float(x + xs.max() + 1), float(y + ys.max() + 1))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def background_crop(background: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop of a background resized to size (h, w), with a random colour cast."""
    bh, bw = background.shape[:2]
    crop_h, crop_w = int(bh * rng.uniform(0.5, 1.0)), int(bw * rng.uniform(0.5, 1.0))
    top, left = int(rng.integers(0, bh - crop_h + 1)), int(rng.integers(0, bw - crop_w + 1))
    crop = cv2.resize(background[top : top + crop_h, left : left + crop_w], (size[1], size[0]), interpolation=cv2.INTER_AREA)
    cast = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    return np.clip(crop.astype(np.float32) * cast, 0, 255).astype(np.uint8)


def make_scene(objects: dict[str, np.ndarray], backgrounds: list[np.ndarray], rng: np.random.Generator,
               size: tuple[int, int] = (320, 416), max_objects: int = 2) -> tuple[np.ndarray, list[PlacedObject]]:
    scene = background_crop(backgrounds[int(rng.integers(len(backgrounds)))], size, rng)
    labels = list(objects)
    chosen = rng.choice(len(labels), size=int(rng.integers(1, max_objects + 1)), replace=False)
    placed: list[PlacedObject] = []
    for index in chosen:
        result = paste_object(scene, objects[labels[index]], rng, placed, labels[index])
        if result is not None:
            placed.append(result)
    return scene, placed


def write_coco(path: Path, images: list[tuple[str, int, int, list[PlacedObject]]], categories: list[str]) -> None:
    """COCO detection json: file names relative to the json's dir, one category per label."""
    ids = {name: i + 1 for i, name in enumerate(categories)}
    coco = {"info": {"description": "shitu demo scenes"}, "licenses": [], "images": [], "annotations": [],
            "categories": [{"id": ids[n], "name": n, "supercategory": "object"} for n in categories]}
    for image_id, (file_name, height, width, objects) in enumerate(images, start=1):
        coco["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": ids[obj.label],
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    atomic_write_text(Path(path), json.dumps(coco, indent=1))
