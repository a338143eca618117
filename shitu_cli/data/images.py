"""The one place images are read: any file in, RGB uint8 out, or an ImageReadError naming the file.

Handles EXIF orientation, grayscale, palette, alpha (composited on white, the usual
product-photo background), 16-bit, CMYK, truncated or corrupt files, non-images,
unicode paths and very large images.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shitu_cli.errors import ImageReadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})

# Refuse pixel bombs outright (200 MP is 600 MB of RGB). Pillow's own guard (89 MP) would
# refuse ordinary panoramas first, so it is raised to ours and ours decides.
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_STRICT_LOAD = threading.Lock()


def is_image_name(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def iter_image_files(root: Path) -> Iterator[Path]:
    """Image-named files under root, recursively, in a stable (sorted) order; hidden files skipped."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        rel_parts = path.relative_to(root).parts
        if path.is_file() and is_image_name(path) and not any(p.startswith(".") for p in rel_parts):
            yield path


def read_image(path: Path | str, max_side: int | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 RGB uint8 array.

    `max_side` lets JPEG decoding downscale in the DCT (much faster for huge photos);
    the result may still be larger than max_side, never smaller.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(image, path)
                if max_side and image.format == "JPEG":
                    image.draft("RGB", (max_side, max_side))
                _load_strictly(image)
                image = ImageOps.exif_transpose(image)
                return _to_rgb_array(image)
    except FileNotFoundError:
        raise ImageReadError("file not found", path=path) from None
    except IsADirectoryError:
        raise ImageReadError("is a directory, not an image", path=path) from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image (unknown or unsupported format)", path=path) from None
    except Image.DecompressionBombError:
        raise ImageReadError("image is too large to decode safely", path=path) from None
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError with a short reason.
        raise ImageReadError(f"corrupt or truncated image ({exc})", path=path) from None


def decode_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an image (missing, not an image, corrupt, truncated), or None.

    JPEGs decode at 1/8 scale, which still reads every byte; Pillow decodes outside the GIL, so
    callers may check many files on a thread pool.
    """
    from shitu_cli.errors import ImageReadError

    try:
        read_image(path, max_side=32)
    except ImageReadError as exc:
        return exc.message
    return None


def _load_strictly(image: Image.Image) -> None:
    """Decode the pixels, refusing truncated data even where another library relaxed Pillow.

    ppdet.engine.trainer sets the process-wide ImageFile.LOAD_TRUNCATED_IMAGES = True when
    imported, after which a half-written JPEG would decode as grey padding without a word.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        image.load()
        return
    with _STRICT_LOAD:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def _check_size(image: Image.Image, path: Path) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageReadError("image has no pixels", path=path)
    if width * height > MAX_PIXELS:
        raise ImageReadError(f"image is {width}x{height}, over the {MAX_PIXELS:,} pixel limit", path=path)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _high_depth_gray_to_rgb(np.asarray(image))
    if mode == "F":
        return _high_depth_gray_to_rgb(np.asarray(image))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode in ("RGBA", "LA", "PA") or image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _high_depth_gray_to_rgb(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    high = values.max() if values.size else 0
    # 16-bit data often uses only 12 bits (cameras, medical); scale by the real range's bit depth.
    full_scale = 65535.0 if high > 4095 else (4095.0 if high > 255 else 255.0)
    gray = np.clip(values * (255.0 / full_scale) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image header ({exc.__class__.__name__})", path=path) from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
