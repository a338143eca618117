"""`shitu predict` on http(s) URLs (loopback server) and on a video written by OpenCV in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_server import ModelServer
from serve_helpers import demo_index

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ROOT / "assets" / "demo" / "queries" / "images"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_index(tmp_path_factory.mktemp("sources"))


@pytest.fixture
def web():
    server = ModelServer(files={
        "/photos/cat.jpg": next((ROOT / "assets/demo/gallery/cat").iterdir()).read_bytes(),
        "/photos/no-suffix": next((ROOT / "assets/demo/gallery/rocket").iterdir()).read_bytes(),
        "/photos/page.html": b"<html>not a photo</html>",
    }).start()
    yield server
    server.stop()


def test_a_url_is_read_and_reported_as_given(cli, demo, web):
    _, index = demo
    urls = [f"{web.base_url}/photos/cat.jpg", f"{web.base_url}/photos/no-suffix"]
    result = cli("predict", *urls, "--index", index, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [image["path"] for image in doc["images"]] == urls
    assert [image["recognitions"][0]["label"] for image in doc["images"]] == ["cat", "rocket"]
    assert doc["images"][0]["recognitions"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_bad_url_in_a_batch_is_named_and_skipped(cli, demo, web, tmp_path):
    _, index = demo
    good = f"{web.base_url}/photos/cat.jpg"
    missing, not_image = f"{web.base_url}/photos/gone.jpg", f"{web.base_url}/photos/page.html"
    result = cli("predict", good, missing, not_image, "--index", index, "--json", "--save-vis", tmp_path / "drawn")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    errors = {image["path"]: image["error"] for image in doc["images"]}
    assert errors[good] is None and "HTTP 404" in errors[missing] and missing in errors[missing]
    assert "not an image" in errors[not_image]
    assert doc["failed"] == 2 and "2 of 3 images could not be read" in result.stderr
    assert [p.name for p in (tmp_path / "drawn").iterdir()] == ["cat.jpg"]

    only_bad = cli("predict", missing, "--index", index)
    assert only_bad.exit_code == 2 and "gone.jpg" in only_bad.stderr and "HTTP 404" in only_bad.stderr


def test_fetch_url_refuses_a_body_over_the_limit(web):
    from shitu_cli.data.sources import TooLarge, fetch_url

    url = f"{web.base_url}/photos/cat.jpg"
    assert fetch_url(url)[:2] == b"\xff\xd8"
    with pytest.raises(TooLarge, match="over the 100 byte limit"):
        fetch_url(url, max_bytes=100)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> Path:
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    writer.release()
    return path


def test_a_video_is_read_every_nth_frame_with_frame_numbers(cli, demo, tmp_path):
    import cv2

    from shitu_cli.data.images import read_image

    gallery, index = demo
    shots = [cv2.resize(read_image(next((gallery / label).iterdir())), (96, 96)) for label in ("cat", "horse", "rocket")]
    frames = [shots[0]] * 2 + [shots[1]] * 2 + [shots[2]] * 2  # frames 0-1 cat, 2-3 horse, 4-5 rocket
    clip = write_video(tmp_path / "clip.avi", frames)
    result = cli("predict", clip, "--index", index, "--vid-stride", "2", "--json", "--save-vis", tmp_path / "drawn")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [image["frame"] for image in doc["images"]] == [0, 2, 4]
    assert all(image["path"] == clip.as_posix() and image["size"] == [96, 96] for image in doc["images"])
    assert [image["recognitions"][0]["label"] for image in doc["images"]] == ["cat", "horse", "rocket"]
    drawn = cv2.VideoCapture(str(tmp_path / "drawn" / "clip.mp4"))
    count = 0
    while drawn.read()[0]:
        count += 1
    assert count == 3
    assert not list((tmp_path / "drawn").glob(".*"))  # no temp file left

    table = cli("predict", clip, "--index", index, "--vid-stride", "3")
    assert table.exit_code == 0 and "clip.avi frame 0" in table.stdout and "clip.avi frame 3" in table.stdout


def test_a_broken_video_and_a_bad_stride_are_refused(cli, demo, tmp_path):
    _, index = demo
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video at all")
    result = cli("predict", fake, "--index", index)
    assert result.exit_code == 2 and "fake.mp4" in result.stderr
    stride = cli("predict", fake, "--index", index, "--vid-stride", "0")
    assert stride.exit_code == 2 and "--vid-stride must be at least 1" in stride.stderr


def test_a_stream_url_is_refused_by_name(cli, demo):
    _, index = demo
    result = cli("predict", "rtsp://127.0.0.1:8554/shelf", "--index", index)
    assert result.exit_code == 2 and "rtsp://127.0.0.1:8554/shelf: only http(s) URLs" in result.stderr
