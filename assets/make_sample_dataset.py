"""Regenerate assets/sample_dataset/: a tiny class-per-folder product set for demos (`python assets/make_sample_dataset.py`).

Each class is one coloured shape on a white background, drawn at varied sizes, places
and tints, so a split or a small training run has something real to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "sample_dataset"
SIZE = 64
PER_CLASS = 10
CLASSES = {  # class folder -> (shape, RGB colour)
    "blue_bottle": ("bottle", (40, 80, 200)),
    "green_box": ("box", (40, 160, 60)),
    "red_mug": ("mug", (200, 40, 40)),
    "yellow_can": ("can", (220, 190, 30)),
}


def draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    tint = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colour)
    scale = rng.uniform(0.6, 1.0)
    w, h = int(SIZE * 0.5 * scale), int(SIZE * 0.8 * scale)
    x, y = int(rng.integers(2, SIZE - w - 1)), int(rng.integers(2, SIZE - h - 1))
    if shape == "bottle":
        pen.rectangle([x + w // 3, y, x + 2 * w // 3, y + h // 4], fill=tint)
        pen.rounded_rectangle([x, y + h // 4, x + w, y + h], radius=4, fill=tint)
    elif shape == "box":
        pen.rectangle([x, y + h // 4, x + w, y + h], fill=tint, outline=(0, 0, 0))
    elif shape == "mug":
        pen.rectangle([x, y + h // 3, x + 2 * w // 3, y + h], fill=tint)
        pen.ellipse([x + w // 2, y + h // 2, x + w, y + 5 * h // 6], outline=tint, width=3)
    else:
        pen.ellipse([x, y, x + w, y + h // 5], fill=tint)
        pen.rectangle([x, y + h // 10, x + w, y + h], fill=tint)
    return image


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    for class_index, (name, (shape, colour)) in enumerate(CLASSES.items()):
        folder = OUT / name
        folder.mkdir(parents=True)
        rng = np.random.default_rng(1000 + class_index)  # fixed seeds: the files are byte-stable
        for i in range(PER_CLASS):
            draw(shape, colour, rng).save(folder / f"{name}_{i:02d}.jpg", quality=85)
    total = sum(p.stat().st_size for p in OUT.rglob("*.jpg"))
    print(f"wrote {len(CLASSES) * PER_CLASS} images ({total / 1024:.0f} KB) to {OUT}")


if __name__ == "__main__":
    main()
