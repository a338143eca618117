"""Where images come from besides files: http(s) URLs (size- and time-limited, content checked) and video
files (every Nth frame). `shitu predict` and `shitu serve` both read URLs through `fetch_url`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from shitu_cli.errors import BadInput, ImageReadError
from shitu_cli.infer.pipeline import ImageResult

URL_SCHEMES = ("http://", "https://")
MAX_URL_BYTES = 20 * 1024 * 1024
URL_TIMEOUT_S = 10.0
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})


class TooLarge(BadInput):
    """An input over a size limit (bytes or pixels): HTTP 413 in `shitu serve`."""


def url_error(message: str, url: str, kind: type[BadInput] = BadInput) -> BadInput:
    # Not path=: a Path folds the "//" of a URL
    return kind(f"{url}: {message}")


def is_url(text: str) -> bool:
    return str(text).lower().startswith(URL_SCHEMES)


def is_video(path: Path | str) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


# ----------------------------------------------------------------------------- URLs


def fetch_url(url: str, max_bytes: int = MAX_URL_BYTES, timeout: float = URL_TIMEOUT_S) -> bytes:
    """The body of an http(s) URL, refused when it is over `max_bytes` or takes over `timeout` seconds in all."""
    import socket
    import urllib.error
    import urllib.request

    if not is_url(url):
        raise url_error("only http:// and https:// URLs can be read", url)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "shitu", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise url_error(f"URL offers {int(declared):,} bytes, over the {max_bytes:,} byte limit", url, TooLarge)
            return _read_limited(response, url, max_bytes, deadline, timeout)
    except urllib.error.HTTPError as exc:
        raise url_error(f"URL answered HTTP {exc.code} ({exc.reason})", url) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise url_error(f"URL did not answer within {timeout:g} s", url) from None
        raise url_error(f"URL cannot be reached ({getattr(reason, 'strerror', None) or reason})", url) from None
    except (socket.timeout, TimeoutError):
        raise url_error(f"URL did not answer within {timeout:g} s", url) from None
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, BadInput):
            raise
        raise url_error(f"URL cannot be read ({exc.__class__.__name__}: {exc})", url) from None
    except ValueError as exc:  # a malformed URL
        raise url_error(f"not a valid URL ({exc})", url) from None


def _read_limited(response, url: str, max_bytes: int, deadline: float, timeout: float) -> bytes:
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise url_error(f"URL took over {timeout:g} s to send its content", url)
        chunk = response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise url_error(f"URL sends over the {max_bytes:,} byte limit", url, TooLarge)
        chunks.append(chunk)


def url_file_name(url: str, data: bytes) -> str:
    """A file name for a downloaded image: the URL's last path part, given an image suffix from its content."""
    from urllib.parse import unquote, urlparse

    from shitu_cli.data.images import is_image_name

    name = Path(unquote(urlparse(url).path)).name or "image"
    if is_image_name(Path(name)):
        return name
    return f"{name}{image_suffix(data)}"


def image_suffix(data: bytes) -> str:
    signatures = {b"\xff\xd8": ".jpg", b"\x89PNG": ".png", b"GIF8": ".gif", b"BM": ".bmp", b"RIFF": ".webp"}
    for magic, suffix in signatures.items():
        if data.startswith(magic):
            return suffix
    return ".img"


# ----------------------------------------------------------------------------- bytes -> image


def decode_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes (an upload, a download) to RGB uint8 through the one image reader; errors name `name`.

    `max_pixels` is checked from the header, before any pixel is decoded.
    """
    import tempfile

    from PIL import Image, UnidentifiedImageError

    from shitu_cli.data.images import read_image

    if not data:
        raise ImageReadError(f"{name}: empty file, no image data")
    if max_pixels:
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            width = height = 0  # read_image names the problem below
        if width * height > max_pixels:
            raise TooLarge(f"{name}: image is {width}x{height}, over the {max_pixels:,} pixel limit")
    with tempfile.TemporaryDirectory(prefix="shitu-upload-") as tmp:
        path = Path(tmp) / f"upload{image_suffix(data)}"
        path.write_bytes(data)
        try:
            return read_image(path)
        except ImageReadError as exc:  # name the upload or URL, not the temp file (message, not path: a URL's // stays)
            raise ImageReadError(f"{name}: {exc.message}", hint=exc.hint) from None


# ----------------------------------------------------------------------------- video


@dataclass
class VideoFrame:
    frame: int  # 0-based frame number in the video
    rgb: np.ndarray


def video_frames(path: Path, stride: int = 1) -> Iterator[VideoFrame]:
    """Every `stride`-th frame of a video file (frame 0 first), decoded by OpenCV to RGB."""
    import cv2

    if stride < 1:
        raise BadInput(f"--vid-stride must be at least 1, got {stride}")
    path = Path(path)
    if not path.is_file():
        raise BadInput("no such video file", path=path)
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ImageReadError("not a video OpenCV can read", path=path)
    try:
        number, yielded = 0, 0
        while True:
            ok = capture.grab()
            if not ok:
                break
            if number % stride == 0:
                ok, bgr = capture.retrieve()
                if ok and bgr is not None:
                    yielded += 1
                    yield VideoFrame(number, np.ascontiguousarray(bgr[:, :, ::-1]))
            number += 1
        if yielded == 0:
            raise ImageReadError("video has no frames OpenCV can decode", path=path)
    finally:
        capture.release()


def video_fps(path: Path) -> float:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    return float(fps) if fps and fps > 0 else 25.0


# ----------------------------------------------------------------------------- predict's inputs


@dataclass
class FrameResult(ImageResult):
    """One video frame's results: `path` is the video, `frame` the 0-based frame number."""

    frame: int | None = None


@dataclass
class Source:
    """One thing `shitu predict` was given to look at, after expanding folders and globs."""

    name: str  # as reported: a path, or the URL as given
    kind: str  # image | url | video
    path: Path | None = None  # the local file (None for a URL)


def expand_sources(targets: list[str]) -> list[Source]:
    """IMAGE / DIR / GLOB / URL / VIDEO arguments -> sources, in the order given, each once.

    Nothing is downloaded here: a URL is fetched when its turn comes, so a dead link is named
    in the results like an unreadable file, not a reason to stop the batch.
    """
    from shitu_cli.infer.pipeline import expand_inputs

    sources: dict[str, Source] = {}
    for target in targets:
        if is_url(target):
            sources.setdefault(target, Source(target, "url"))
            continue
        if "://" in target:  # rtsp://, ftp://, ...: named whole (a Path would fold its //)
            raise BadInput(f"{target}: only http(s) URLs, files, folders and globs can be read "
                           "(webcams and RTSP streams are not supported yet)")
        for path in expand_inputs(target):
            sources.setdefault(path.as_posix(), Source(path.as_posix(), "video" if is_video(path) else "image", path))
    return list(sources.values())


@dataclass
class UrlLimits:
    max_bytes: int = MAX_URL_BYTES
    timeout_s: float = URL_TIMEOUT_S
    max_pixels: int | None = None


def predict_sources(pipeline, sources: list[Source], vid_stride: int = 1, save_vis: Path | None = None,
                    progress=None, url_limits: UrlLimits | None = None) -> list:
    """Recognise every source: images and URLs give one ImageResult each, videos one FrameResult per
    `vid_stride`-th frame. With `save_vis`, drawn images (and a drawn video per video) go there."""
    from shitu_cli.infer.draw import unique_names

    names = unique_names([Path(_file_name(s)) for s in sources])
    results = []
    for source, name in zip(sources, names):
        if source.kind == "video":
            results.extend(_predict_video(pipeline, source, vid_stride, save_vis and save_vis / f"{Path(name).stem}.mp4"))
        else:
            results.append(_predict_image(pipeline, source, url_limits or UrlLimits(), save_vis and save_vis / name))
        if progress:
            progress(1)
    return results


def _file_name(source: Source) -> str:
    if source.kind == "url":
        from urllib.parse import unquote, urlparse

        name = Path(unquote(urlparse(source.name).path)).name or "image"
        return name if Path(name).suffix else f"{name}.jpg"
    return Path(source.name).name


def _predict_image(pipeline, source: Source, limits: UrlLimits, drawn: Path | None):
    from shitu_cli.errors import ShituError

    try:
        if source.kind == "url":
            rgb = decode_image_bytes(fetch_url(source.name, limits.max_bytes, limits.timeout_s), source.name, limits.max_pixels)
        else:
            from shitu_cli.data.images import read_image

            rgb = read_image(source.path)
    except ShituError as exc:
        return ImageResult(source.name, whole_image_policy=pipeline.options.whole_image, error=exc.one_line()
                           if source.kind == "url" else exc.message)
    result = ImageResult(source.name, pipeline.recognise(rgb), pipeline.options.whole_image, (rgb.shape[1], rgb.shape[0]))
    if drawn is not None:
        from shitu_cli.infer.draw import draw_recognitions, write_image

        write_image(drawn, draw_recognitions(rgb, result.recognitions))
    return result


def _predict_video(pipeline, source: Source, stride: int, drawn: Path | None) -> list:
    from shitu_cli.errors import ShituError

    writer = None
    results = []
    try:
        for frame in video_frames(source.path, stride):
            recognitions = pipeline.recognise(frame.rgb)
            height, width = frame.rgb.shape[:2]
            results.append(FrameResult(source.name, recognitions, pipeline.options.whole_image, (width, height), frame=frame.frame))
            if drawn is not None:
                writer = writer or _VideoOut(drawn, video_fps(source.path) / stride, width, height)
                writer.write(_drawn_bgr(frame.rgb, recognitions))
    except ShituError as exc:
        if not results:
            return [FrameResult(source.name, whole_image_policy=pipeline.options.whole_image, error=exc.message, frame=None)]
        raise
    finally:
        if writer is not None:
            writer.finish()
    return results


def _drawn_bgr(rgb: np.ndarray, recognitions) -> np.ndarray:
    from shitu_cli.infer.draw import draw_recognitions

    return np.ascontiguousarray(draw_recognitions(rgb, recognitions)[:, :, ::-1])


class _VideoOut:
    """An mp4 written to a hidden temp name and renamed when complete, like every artefact."""

    def __init__(self, path: Path, fps: float, width: int, height: int):
        import cv2

        from shitu_cli.errors import writing_to

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp.mp4")
        with writing_to(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), max(fps, 1.0), (width, height))
        if not self.writer.isOpened():
            raise BadInput("OpenCV cannot write an mp4 video here", path=self.path)

    def write(self, bgr: np.ndarray) -> None:
        self.writer.write(bgr)

    def finish(self) -> None:
        import os

        self.writer.release()
        os.replace(self.tmp, self.path)

