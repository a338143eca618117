"""Drawn result images: boxes with their label and score, in a font that has the label's glyphs."""

from __future__ import annotations

import functools
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


def encode_image(rgb: np.ndarray, suffix: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    kind = "JPEG" if suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(rgb).save(buffer, format=kind, **({"quality": 92} if kind == "JPEG" else {}))
    return buffer.getvalue()


def draw_labels(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """A copy of `rgb` with `lines` written top-left on a dark band, in a font that has their glyphs."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(rgb))
    text = "\n".join(lines)
    font = label_font(text, size=max(12, min(image.size) // 18))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    pad = max(2, font.size // 4)
    draw.rectangle((0, 0, right + 2 * pad, bottom + 2 * pad), fill=(0, 0, 0))
    draw.multiline_text((pad, pad), text, font=font, fill=(255, 255, 255))
    return np.asarray(image)


def label_font(text: str, size: int):
    """The first installed TrueType font that has a glyph for every character of `text`.

    DejaVu Sans (shipped with matplotlib) covers Latin, Greek, Cyrillic and more; for other
    scripts (CJK) any system font with the glyphs is used when one is installed.
    """
    from PIL import ImageFont

    needed = {ord(ch) for ch in text if not ch.isspace()}
    for path in _font_candidates():
        if needed <= _font_codepoints(path):
            return ImageFont.truetype(path, size)
    return ImageFont.truetype(_font_candidates()[0], size)  # best effort: missing glyphs show as boxes


@functools.lru_cache(maxsize=1)
def _font_candidates() -> list[str]:
    from matplotlib import font_manager

    dejavu = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
    others = sorted(
        {f.fname for f in font_manager.fontManager.ttflist if f.fname.lower().endswith((".ttf", ".otf", ".ttc"))}
        - {dejavu}
    )
    # "Last resort" fonts map every code point to a placeholder box: they would always "cover" the text.
    others = [f for f in others if "lastresort" not in Path(f).name.lower()]
    return [dejavu, *others]


@functools.lru_cache(maxsize=64)
def _font_codepoints(path: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:  # a broken or exotic font file is simply not a candidate
        return frozenset()
