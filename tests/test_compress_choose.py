"""`--algo auto`'s bookkeeping: which calibration images calibrate and which score, and how outputs are compared.
The choice itself runs end to end in test_compress.py, test_compress_rec.py and test_compress_det.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shitu_cli.compress.choose import AUTO, check_algo_choice, closeness_to, split_held_out
from shitu_cli.compress.images import ImageSet, Sample, Skipped
from shitu_cli.errors import BadInput


def _images(count: int) -> ImageSet:
    return ImageSet(Path("calib"), [Sample(Path(f"{i:02d}.jpg"), str(i % 3)) for i in range(count)])


def test_every_fourth_image_is_held_out_and_the_rest_calibrate():
    images = _images(10)
    calibration, scoring = split_held_out(images)
    assert [s.path.name for s in scoring.samples] == ["03.jpg", "07.jpg"]
    assert len(calibration.samples) == 8
    assert {s.path for s in calibration.samples}.isdisjoint({s.path for s in scoring.samples})
    # an unreadable image found in either part is still reported by the whole set
    scoring.skipped.append(Skipped("03.jpg", "not an image"))
    assert images.skipped == [Skipped("03.jpg", "not an image")] and calibration.skipped is images.skipped


def test_too_few_images_to_hold_any_out_score_on_the_calibration_images():
    images = _images(7)
    calibration, scoring = split_held_out(images)
    assert calibration is images and scoring is images


def test_auto_and_the_paddle_algorithms_are_accepted_and_others_refused():
    assert check_algo_choice(AUTO) == "auto" and check_algo_choice("abs_max") == "abs_max"
    with pytest.raises(BadInput) as refused:
        check_algo_choice("best")
    assert "auto" in refused.value.hint and "hist" in refused.value.hint


def test_closeness_ranks_a_nearer_copy_of_the_outputs_higher():
    rng = np.random.default_rng(0)
    original = rng.normal(size=(12, 4)).astype(np.float32)
    near = original + 0.01 * rng.normal(size=original.shape).astype(np.float32)
    far = original + 1.0 * rng.normal(size=original.shape).astype(np.float32)
    assert closeness_to("cls", original, original, [None] * 12) == (1.0, 1.0)
    assert closeness_to("cls", original, near, [None] * 12) > closeness_to("cls", original, far, [None] * 12)
    labels = [str(i // 3) for i in range(12)]
    agreement, cosine = closeness_to("rec", original, -original, labels)
    assert cosine == -1.0 and 0.0 <= agreement <= 1.0


def test_a_detector_is_scored_by_map_against_the_original_boxes():
    from shitu_cli.compress.measure import map_against

    def rows(*boxes):
        return np.array(boxes, np.float32).reshape(-1, 6)

    original = [rows([0, 0.9, 10, 10, 50, 50], [0, 0.8, 60, 60, 90, 90])]
    assert map_against(original, original, ["object"]) == pytest.approx(1.0)
    shifted = [rows([0, 0.9, 12, 12, 52, 52], [0, 0.8, 60, 60, 90, 90])]  # one box 2 px off: found, less exactly
    lost = [rows([0, 0.9, 10, 10, 50, 50])]
    assert 0.5 < map_against(original, shifted, ["object"]) < 1.0
    assert map_against(original, lost, ["object"]) < map_against(original, shifted, ["object"])
    # boxes below predict's threshold are not the original's answer: finding nothing then agrees
    assert map_against([rows([0, 0.05, 10, 10, 50, 50])], [rows()], ["object"]) == 1.0
