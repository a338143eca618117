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
    """A copy of `rgb` with each recognition's box and "label score" drawn on it, followed by the
    detector's "[class score]" where a multi-class detector named the box something else."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    text_of = [_caption(r) for r in recognitions]
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


def _caption(recognition: Any) -> str:
    text = f"{recognition.label} {recognition.score:.2f}"
    det_label = getattr(recognition, "det_label", None)
    if det_label is not None and det_label != recognition.label:
        text += f" [{det_label} {recognition.det_score:.2f}]"
    return text


def write_image(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB image atomically; JPEG for .jpg/.jpeg names, PNG otherwise."""
    from shitu_cli.artifacts import atomic_write_bytes
    from shitu_cli.errors import writing_to

    path = Path(path)
    data = encode_image(rgb, path.suffix)
    with writing_to(path):
        atomic_write_bytes(path, data)
    return path


def check_output_folder(folder: Path, option: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created or written."""
    import os

    from shitu_cli.errors import BadInput, writing_to

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"{option} names a file, not a folder", hint="pass a folder for the drawn images", path=folder)
    with writing_to(folder):
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput("cannot write here: permission denied", hint="choose a writable output folder", path=folder)


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


FONT_HELP = ("install a font with these glyphs, e.g. `sudo apt install fonts-noto-cjk` (Debian/Ubuntu; "
             "fonts-wqy-microhei is smaller), `sudo dnf install google-noto-sans-cjk-fonts` (Fedora), "
             "or copy a .ttf/.otf file into ~/.local/share/fonts")
_missing_glyphs: dict[str, None] = {}  # characters no installed font covers, in the order met
_warned = False


def label_font(text: str, size: int):
    """A TrueType font of `size` px that has a glyph for every character of `text` (see `font_path_for`)."""
    from PIL import ImageFont

    return ImageFont.truetype(font_path_for(text), size)


def font_path_for(text: str) -> str:
    """The first installed font file that has a glyph for every character of `text`.

    DejaVu Sans (shipped with matplotlib) covers Latin, Greek, Cyrillic and more; for other
    scripts (CJK) any system font with the glyphs is used. When none has them all, the one
    that covers most is returned and the missing characters are kept for `font_notes`.
    """
    needed = {ord(ch) for ch in text if not ch.isspace()}
    candidates = _font_candidates()
    best, best_missing = candidates[0], None
    for path in candidates:
        missing = needed - _font_codepoints(path)
        if not missing:
            return path
        if best_missing is None or len(missing) < len(best_missing):
            best, best_missing = path, missing
    for code in sorted(best_missing or ()):
        _missing_glyphs.setdefault(chr(code))
    return best


def font_notes() -> list[str]:
    """Once per process: a warning naming the characters drawn as boxes, and how to get a font for them."""
    global _warned
    if _warned or not _missing_glyphs:
        return []
    _warned = True
    sample = "".join(list(_missing_glyphs)[:10])
    return [f"no installed font has glyphs for {sample!r}, so labels with them are drawn as boxes: {FONT_HELP}"]


@functools.lru_cache(maxsize=1)
def _font_candidates() -> list[str]:
    from matplotlib import font_manager

    dejavu = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
    # The system folders are listed afresh, not taken from matplotlib's font cache, which
    # would not know a font installed after it was built.
    system = font_manager.findSystemFonts(fontext="ttf") + font_manager.findSystemFonts(fontext="otf")
    others = sorted({f for f in system if f.lower().endswith((".ttf", ".otf", ".ttc"))} - {dejavu})
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
