"""Synthetic detection scenes for tests: drawn objects on cluttered backgrounds, written as COCO."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from synth import class_names, draw_object, write_rgb


@dataclass
class Scene:
    image: np.ndarray  # RGB uint8
    boxes: list[tuple[float, float, float, float]]  # x, y, w, h (COCO)
    labels: list[str]


def cluttered_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Blurred noise plus a few faint lines and blocks, so the net must find objects, not edges."""
    image = rng.integers(60, 200, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 7))):
        color = tuple(int(c) for c in rng.integers(70, 190, 3))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.line(image, p1, p2, color, int(rng.integers(1, 3)))
        else:
            cv2.rectangle(image, p1, p2, color, 1)
    return cv2.GaussianBlur(image, (3, 3), 0)


def _tight_box(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int] | None:
    changed = np.abs(after.astype(int) - before.astype(int)).max(axis=2) > 20
    ys, xs = np.nonzero(changed)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def make_scene(height: int, width: int, names: list[str], rng: np.random.Generator, max_objects: int = 2) -> Scene:
    """Paste 1..max_objects drawn objects at random places and scales; boxes are tight around the drawing."""
    image = cluttered_background(height, width, rng)
    scene = Scene(image, [], [])
    for _ in range(int(rng.integers(1, max_objects + 1))):
        side = int(rng.uniform(0.3, 0.55) * min(height, width))
        x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        if any(_overlaps((x0, y0, side, side), box) for box in scene.boxes):
            continue
        name = names[int(rng.integers(len(names)))]
        region = image[y0 : y0 + side, x0 : x0 + side].copy()
        drawn = draw_object(name, side, rng, background=region)
        tight = _tight_box(region, drawn)
        if tight is None:
            continue
        image[y0 : y0 + side, x0 : x0 + side] = drawn
        x1, y1, x2, y2 = tight
        scene.boxes.append((float(x0 + x1), float(y0 + y1), float(x2 - x1), float(y2 - y1)))
        scene.labels.append(name)
    return scene


def _overlaps(a, b) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def coco_document(entries: list[tuple[str, Scene]], names: list[str]) -> dict:
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    cat_id = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for image_id, (file_name, scene) in enumerate(entries, start=1):
        height, width = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for box, label in zip(scene.boxes, scene.labels):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[label],
                "bbox": [round(v, 2) for v in box], "area": round(box[2] * box[3], 2), "iscrowd": 0,
            })
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco_scenes(root: Path, n_train: int = 16, n_val: int = 6, size: tuple[int, int] = (128, 160),
                     n_classes: int = 2, seed: int = 0) -> list[str]:
    """root/images/*.jpg + root/train.json + root/val.json (file_name relative to root); returns class names."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = class_names(n_classes)
    splits: dict[str, list[tuple[str, Scene]]] = {"train": [], "val": []}
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            scene = make_scene(size[0], size[1], names, rng)
            file_name = f"images/{split}_{i:03d}.jpg"
            write_rgb(root / file_name, scene.image)
            splits[split].append((file_name, scene))
    for split, entries in splits.items():
        (root / f"{split}.json").write_text(json.dumps(coco_document(entries, names)), encoding="utf-8")
    return names
