"""The ROI box rule (issue 20, --roi): groups and class names, the box around an extent, cutting it."""

import numpy as np
import pytest

from handseg.common.constants import CARPALS, CLASS_INDEX
from handseg.common.errors import HandsegError
from handseg.data.roi import (
    MIN_ROI_SIDE,
    ROI_JITTER,
    crops_bounds,
    crops_in_box,
    cut_box,
    jittered_box,
    mask_bounds,
    overlap,
    parse_roi,
    roi_box,
    roi_label,
)


def test_parse_roi_takes_groups_and_class_names_in_class_order():
    assert parse_roi("carpals") == list(CARPALS)
    assert parse_roi("Lunate,Scaphoid") == ["Scaphoid", "Lunate"]  # class order, not the order given
    assert parse_roi(["Radius", "carpals"]) == [*CARPALS, "Radius"]
    assert parse_roi(None) is None
    assert roi_label(parse_roi("carpals")) == "carpals" and roi_label(["Radius", "Ulna"]) == "Radius,Ulna"
    with pytest.raises(HandsegError, match=r"--roi: unknown class or group 'wrist'.*carpals"):
        parse_roi("wrist")
    with pytest.raises(HandsegError, match="no class given"):
        parse_roi(" , ")


def test_the_box_is_a_square_centred_on_the_extent_with_its_margin():
    # extent rows 10..30, cols 20..60: the longer side 40, plus 25 % on each side -> 60, centred on (20, 40)
    assert roi_box((10, 30, 20, 60), margin=0.25) == (-10, 10, 60)
    assert roi_box((10, 30, 20, 60), margin=0.0) == (0, 20, 40)
    assert roi_box((5, 6, 5, 6), margin=0.15)[2] == MIN_ROI_SIDE  # a speck still gets a readable box
    # jitter: side within +-10 %, centre within 5 % of the side
    rng = np.random.default_rng(0)
    size, centre = ROI_JITTER
    for _ in range(50):
        r, c, side = jittered_box((100, 300, 200, 300), 0.15, rng)
        assert 260 * (1 - size) - 1 <= side <= 260 * (1 + size) + 1  # 200 px extent, 15 % margins
        assert abs(r + side / 2 - 200) <= centre * side + 1 and abs(c + side / 2 - 250) <= centre * side + 1


def test_cutting_a_box_pads_black_beyond_the_image_and_moves_crops_into_it():
    image = np.arange(100, dtype=np.uint8).reshape(10, 10)
    box = (-2, 6, 6)  # rows -2..3, cols 6..11
    cut = cut_box(image, box)
    assert cut.shape == (6, 6)
    assert np.array_equal(cut[2:, :4], image[0:4, 6:10]) and not cut[:2].any() and not cut[:, 4:].any()
    assert overlap((20, 20, 5), (10, 10)) is None and not cut_box(image, (20, 20, 5)).any()

    full = np.zeros((10, 10), dtype=bool)
    full[1:5, 5:9] = True
    crops = [(CLASS_INDEX["Scaphoid"], full[1:5, 5:9].copy(), 1, 5), (0, np.ones((2, 2), bool), 8, 0)]
    moved = crops_in_box(crops, box)
    assert len(moved) == 1  # the second crop lies outside the box
    placed = np.zeros((6, 6), dtype=bool)
    c, crop, r0, c0 = moved[0]
    placed[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop
    assert c == CLASS_INDEX["Scaphoid"] and np.array_equal(placed, cut_box(full, box))


def test_bounds_from_label_crops_and_from_masks():
    lunate, radius = CLASS_INDEX["Lunate"], CLASS_INDEX["Radius"]
    crops = [(lunate, np.ones((3, 4), bool), 10, 20), (CLASS_INDEX["Capitate"], np.ones((2, 2), bool), 5, 30),
             (radius, np.ones((9, 9), bool), 40, 40)]
    assert crops_bounds(crops, [lunate, CLASS_INDEX["Capitate"]]) == (5, 13, 20, 32)
    assert crops_bounds(crops, [CLASS_INDEX["Pisiform"]]) is None
    mask = np.zeros((8, 9), dtype=bool)
    mask[2:5, 3] = mask[6, 7] = True
    assert mask_bounds(mask.any(axis=1), mask.any(axis=0)) == (2, 7, 3, 8)
    assert mask_bounds(np.zeros(4, bool), np.zeros(4, bool)) is None
