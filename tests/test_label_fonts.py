"""Labels in any script are drawn with a font that has their glyphs, or a warning says how to get one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from shitu_cli.infer import draw

CJK = "草莓コーヒー"


def cjk_font_installed() -> bool:
    needed = {ord(ch) for ch in CJK}
    return any(needed <= draw._font_codepoints(path) for path in draw._font_candidates())


needs_cjk_font = pytest.mark.skipif(not cjk_font_installed(), reason="no CJK font installed (e.g. apt install fonts-noto-cjk)")


def _ink(char: str, font_path: str) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (40, 40), 0)
    ImageDraw.Draw(image).text((4, 4), char, font=ImageFont.truetype(font_path, 28), fill=255)
    return np.asarray(image)


@needs_cjk_font
def test_cjk_labels_get_a_font_whose_glyphs_differ_from_each_other():
    path = draw.font_path_for(CJK)

    # A font without the glyphs draws one and the same box for every character.
    assert not np.array_equal(_ink("草", path), _ink("莓", path))
    assert _ink("草", path).any()
    assert draw.font_notes() == [] or "草" not in draw.font_notes()[0]


@needs_cjk_font
def test_confusion_png_draws_cjk_class_names_without_missing_glyphs(tmp_path):
    from shitu_cli.train.cls_metrics import save_confusion_png

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" for each box it draws
        save_confusion_png(tmp_path / "confusion.png", np.array([[3, 1], [0, 4]]), ["草莓", "咖啡杯"])

    assert (tmp_path / "confusion.png").stat().st_size > 0


def test_characters_no_font_has_give_one_warning_saying_how_to_get_a_font(monkeypatch):
    monkeypatch.setattr(draw, "_missing_glyphs", {})
    monkeypatch.setattr(draw, "_warned", False)
    hieroglyph = "\U00013000"  # Egyptian hieroglyphs: in no font this suite can expect

    draw.draw_recognitions(np.zeros((60, 80, 3), np.uint8), [_Recognition(hieroglyph)])
    draw.draw_recognitions(np.zeros((60, 80, 3), np.uint8), [_Recognition(hieroglyph + "x")])
    first, second = draw.font_notes(), draw.font_notes()

    assert len(first) == 1 and hieroglyph in first[0] and "fonts-noto-cjk" in first[0]
    assert second == []


class _Recognition:
    def __init__(self, label: str):
        self.label, self.score, self.box = label, 0.9, (5.0, 20.0, 60.0, 55.0)
