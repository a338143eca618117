"""The det stage's own logic: preprocessing faithful to infer_cfg, and box postprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from shitu_cli.errors import ManifestError
from shitu_cli.infer.detector import DetPreprocess, postprocess

STEPS = [
    {"type": "Resize", "target_size": [96, 128], "keep_ratio": False, "interp": 2},
    {"type": "NormalizeImage", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "is_scale": True},
    {"type": "Permute"},
]


def _rows(*rows):
    return np.array(rows, np.float32).reshape(-1, 6)


def test_preprocess_matches_the_plain_formula():
    import cv2

    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    image, scale_factor = DetPreprocess.from_steps(STEPS, None)(rgb)
    resized = cv2.resize(rgb, (128, 96), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    expected = ((resized / 255.0 - STEPS[1]["mean"]) / STEPS[1]["std"]).transpose(2, 0, 1)[None]
    assert image.shape == (1, 3, 96, 128) and image.dtype == np.float32 and image.flags.c_contiguous
    np.testing.assert_allclose(image, expected, atol=1e-5)
    np.testing.assert_allclose(scale_factor, [[96 / 50, 128 / 70]], rtol=1e-6)


def test_preprocess_matches_paddleclas_det_preprocess():
    from shitu_cli.models.ppcls import import_ppcls

    import_ppcls()
    from paddleclas.deploy.python.det_preprocess import DetNormalizeImage, DetPermute, DetResize, det_preprocess

    rgb = np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    ops = [DetResize([96, 128], keep_ratio=False, interp=2), DetNormalizeImage(STEPS[1]["mean"], STEPS[1]["std"]), DetPermute()]
    info = {"scale_factor": np.ones(2, np.float32), "im_shape": np.array(rgb.shape[:2], np.float32), "input_shape": [3, 96, 128]}
    reference, info = det_preprocess(rgb, info, ops)
    image, scale_factor = DetPreprocess.from_steps(STEPS, None)(rgb)
    np.testing.assert_allclose(image[0], reference, atol=1e-5)
    np.testing.assert_allclose(scale_factor[0], info["scale_factor"], rtol=1e-6)


def test_unscaled_normalisation_uses_pixel_units():
    steps = [STEPS[0], {"type": "NormalizeImage", "mean": [123.0, 116.0, 103.0], "std": [58.0, 57.0, 57.0], "is_scale": False}]
    pre = DetPreprocess.from_steps(steps, None)
    assert pre.table[0, 123] == pytest.approx(0.0) and pre.table[2, 160] == pytest.approx(1.0)


@pytest.mark.parametrize("step", [{"type": "Resize", "target_size": [96, 96], "keep_ratio": True}, {"type": "PadStride", "stride": 32}])
def test_unsupported_preprocessing_is_refused(step):
    with pytest.raises(ManifestError):
        DetPreprocess.from_steps([step] + STEPS[1:] if step["type"] == "Resize" else STEPS + [step], None)


def test_threshold_filters_and_sorts_best_first():
    rows = _rows([0, 0.3, 1, 1, 5, 5], [0, 0.9, 2, 2, 8, 8], [0, 0.1, 3, 3, 9, 9], [0, 0.6, 0, 0, 4, 4])
    found = postprocess(rows, 4, ["box"], (20, 20), thresh=0.25, max_boxes=10)
    assert [d.score for d in found] == pytest.approx([0.9, 0.6, 0.3])
    assert found[0].box == (2.0, 2.0, 8.0, 8.0) and found[0].label == "box"


def test_max_boxes_keeps_the_best():
    rows = _rows(*[[0, s, 0, 0, 4, 4] for s in (0.2, 0.8, 0.5, 0.7)])
    found = postprocess(rows, 4, ["box"], (10, 10), thresh=0.0, max_boxes=2)
    assert [d.score for d in found] == pytest.approx([0.8, 0.7])


def test_boxes_are_clipped_and_empty_ones_dropped():
    rows = _rows([1, 0.9, -5, -3, 30, 12], [0, 0.8, 25, 1, 40, 9], [0, 0.7, 3, 4, 3, 9])
    found = postprocess(rows, 3, ["a", "b"], (20, 10), thresh=0.5, max_boxes=5)
    assert len(found) == 1  # the second lies right of the image, the third has zero width
    assert found[0].box == (0.0, 0.0, 20.0, 10.0) and found[0].label == "b"


def test_count_and_padding_rows_are_respected():
    rows = _rows([0, 0.9, 1, 1, 5, 5], [0, 0.8, 1, 1, 6, 6], [-1, 0.99, 0, 0, 1, 1])
    assert len(postprocess(rows, 1, ["x"], (10, 10), 0.0, 5)) == 1
    assert len(postprocess(rows, None, ["x"], (10, 10), 0.0, 5)) == 2  # class -1 pads an empty result
    assert postprocess(np.zeros((0, 6), np.float32), 0, ["x"], (10, 10), 0.0, 5) == []
