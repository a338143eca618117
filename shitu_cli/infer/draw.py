"""Drawn result images: boxes with their label and score, in a font that has the label's glyphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Distinct, colour-blind-friendly box colours (Okabe-Ito), picked per label so a label keeps its colour.
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167))
UNKNOWN_COLOR = (160, 160, 160)


def _color(label: str) -> tuple[int, int, int]:
    if label == "unknown":
        return UNKNOWN_COLOR
    return PALETTE[sum(label.encode("utf-8")) % len(PALETTE)]


def draw_recognitions(rgb: np.ndarray, recognitions: Sequence[Any]) -> np.ndarray:
    """A copy of `rgb` with each recognition's box and "label score" drawn on it."""
    from PIL import Image, ImageDraw

    from shitu_cli.infer.classifier import label_font

    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    text_of = [f"{r.label} {r.score:.2f}" for r in recognitions]
    font = label_font("".join(text_of) or "a", size=max(11, min(image.size) // 28))
    width = max(2, min(image.size) // 200)
    for recognition, text in zip(recognitions, text_of):
        x1, y1, x2, y2 = (float(v) for v in recognition.box)
        color = _color(recognition.label)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        lift = bottom - top + 2 * width
        y_text = y1 - lift if y1 - lift >= 0 else y1  # above the box, or inside it at the top edge
        draw.rectangle((x1, y_text, x1 + right - left + 2 * width, y_text + lift), fill=color)
        draw.text((x1 + width, y_text + width - (top - y1)), text, font=font, fill=(0, 0, 0))
    return np.asarray(image)


def write_image(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB image atomically; JPEG for .jpg/.jpeg names, PNG otherwise."""
    from shitu_cli.artifacts import atomic_write_bytes
    from shitu_cli.infer.classifier import encode_image

    path = Path(path)
    atomic_write_bytes(path, encode_image(rgb, path.suffix))
    return path


def unique_names(paths: list[Path]) -> list[str]:
    """A file name per input for a flat output folder: the plain name, numbered where two collide."""
    taken: set[str] = set()
    names = []
    for path in paths:
        name, counter = path.name, 1
        while name in taken:
            name, counter = f"{path.stem}_{counter}{path.suffix}", counter + 1
        taken.add(name)
        names.append(name)
    return names
