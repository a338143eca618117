"""The web page at / in a real headless chromium: pick a photo, see its boxes drawn, add a crop to the gallery."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cdp import Browser, chromium_path
from serve_helpers import ROOT, demo_index, start_server

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed")
QUERY = ROOT / "assets" / "demo" / "queries" / "images" / "scene_000.jpg"
DET = ROOT / "assets" / "demo" / "models" / "det"


def box_pixels(png: bytes) -> int:
    """How many pixels of the page's box colour (magenta) a screenshot holds."""
    from PIL import Image

    from shitu_cli.serve.page import BOX_COLOUR

    target = np.array([int(BOX_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - target).sum(axis=2) < 30).sum())


def test_a_picked_photo_is_drawn_with_boxes_and_a_crop_can_join_the_gallery(tmp_path):
    _, index = demo_index(tmp_path)
    server = start_server(["--index", index, "--det", DET], tmp_path / "serve.log", {"SHITU_HOME": str(tmp_path / "home")})
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for("document.readyState === 'complete' && document.getElementById('gallery').textContent.length > 0")
        assert "18 items" in browser.evaluate("document.getElementById('gallery').textContent")
        assert box_pixels(browser.screenshot()) == 0  # nothing drawn before a photo is picked

        document = browser.call("DOM.getDocument")
        node = browser.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(QUERY)])  # as if the user picked it
        found = browser.wait_for("document.body.dataset.recognised")
        assert found not in ("error", "0"), browser.evaluate("document.getElementById('status').textContent")
        assert browser.evaluate("document.querySelector('#results tbody td:nth-child(2)').textContent") == "horse"
        assert box_pixels(browser.screenshot()) > 500  # the box outline and label tag are drawn

        browser.evaluate("document.getElementById('label').value = 'my horse'")
        browser.evaluate("document.querySelector('#results tbody button').click()")
        browser.wait_for("document.getElementById('status').textContent.startsWith('added to my horse')")
        assert server.get("/gallery").body["labels"]["my horse"] == 1
    finally:
        browser.close()
        server.stop()
