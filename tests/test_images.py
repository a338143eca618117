"""read_image: every odd file a real photo folder holds comes out RGB uint8, or as one clear ImageReadError."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import write_image
from shitu_cli.data import images
from shitu_cli.data.images import image_size, read_image
from shitu_cli.errors import ImageReadError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def assert_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, red left and blue right; tag 6 says "rotate 90 clockwise to view".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20], stored[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)

    array = read_image(path)

    assert_rgb(array, 40, 20)
    assert array[2, 10, 0] > 200 and array[2, 10, 2] < 60  # red is now on top
    assert array[37, 10, 2] > 200 and array[37, 10, 0] < 60  # blue at the bottom
    assert image_size(path) == (20, 40)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10), mode="L").save(path)

    array = read_image(path)

    assert_rgb(array, 6, 10)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert array[5, 9, 0] == 59


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (255, 0, 0, 255)  # opaque red rows
    rgba[2:] = (0, 0, 0, 0)  # fully transparent rows
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)

    array = read_image(path)

    assert_rgb(array, 4, 4)
    assert tuple(array[0, 0]) == RED
    assert tuple(array[3, 3]) == WHITE


def test_palette_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 2, 4))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    array = read_image(path)

    assert tuple(array[0, 0]) == RED
    assert tuple(array[0, 3]) == WHITE


@pytest.mark.parametrize("high, expected_top", [(65535, 255), (4095, 255), (200, 200)])
def test_16_bit_png_is_scaled_by_its_real_range(tmp_path, high, expected_top):
    values = np.linspace(0, high, 16 * 16).astype(np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), values)

    array = read_image(path)

    assert_rgb(array, 16, 16)
    assert array[0, 0, 0] == 0
    assert array[15, 15, 0] == expected_top


def test_16_bit_colour_png_keeps_its_colours(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint16)
    bgr[..., 2] = 65535  # OpenCV is BGR: full red
    path = tmp_path / "deep_colour.png"
    assert cv2.imwrite(str(path), bgr)

    array = read_image(path)

    assert_rgb(array, 8, 8)
    assert tuple(array[4, 4]) == RED


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path)

    assert_rgb(read_image(path), 8, 8)


def truncated_jpeg(tmp_path):
    path = write_image(tmp_path / "cut.jpg", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_jpeg_is_refused(tmp_path):
    path = truncated_jpeg(tmp_path)

    with pytest.raises(ImageReadError, match="truncated") as caught:
        read_image(path)

    assert str(path) in str(caught.value)


def test_truncated_jpeg_is_refused_even_after_ppdet_relaxes_pillow(tmp_path, monkeypatch):
    # ppdet.engine.trainer flips this process-wide flag when it is imported.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = truncated_jpeg(tmp_path)

    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path, max_side=32)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # ppdet's own setting is left as it was


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: milk, eggs\n", encoding="utf-8")

    with pytest.raises(ImageReadError, match="not an image"):
        read_image(path)


def test_empty_file_is_not_an_image(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(ImageReadError):
        read_image(path)


def test_unicode_path_reads(tmp_path):
    path = write_image(tmp_path / "产品 café" / "图片 ü.jpg", size=(12, 18))

    assert_rgb(read_image(path), 12, 18)
    assert image_size(path) == (18, 12)


def test_oversize_image_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = write_image(tmp_path / "big.png", size=(20, 20))

    with pytest.raises(ImageReadError, match="pixel limit"):
        read_image(path)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "gone.jpg"

    with pytest.raises(ImageReadError, match="file not found") as caught:
        read_image(path)

    assert caught.value.exit_code == 2
    assert str(path) in caught.value.one_line()
    assert "\n" not in caught.value.one_line()


def test_directory_is_not_an_image(tmp_path):
    folder = tmp_path / "looks_like.jpg"
    folder.mkdir()

    with pytest.raises(ImageReadError, match="directory"):
        read_image(folder)


def test_max_side_downscales_jpeg_but_never_below_max_side(tmp_path):
    path = write_image(tmp_path / "photo.jpg", size=(400, 800))

    array = read_image(path, max_side=100)

    assert min(array.shape[:2]) >= 100
    assert array.shape[:2] != (400, 800)


def test_image_size_of_broken_file_raises(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    with pytest.raises(ImageReadError):
        image_size(path)
