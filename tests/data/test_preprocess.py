"""train --preprocess: the spec's canonical form, its checks, and the transform against OpenCV's own CLAHE."""

import cv2
import numpy as np
import pytest

from handseg.common.errors import HandsegError
from handseg.data.preprocess import parse_preprocess, preprocess_image


@pytest.mark.parametrize("spec,canonical", [
    ("clahe", "clahe:2:8"), ("CLAHE:3", "clahe:3:8"), ("clahe:1.5:4", "clahe:1.5:4"), (None, None), ("", None),
    ("none", None),
])
def test_spec_canonical_form(spec, canonical):
    assert parse_preprocess(spec) == canonical


@pytest.mark.parametrize("spec,needle", [
    ("sharpen", "unknown pre-processing"), ("clahe:0", "clip limit"), ("clahe:nan", "clip limit"),
    ("clahe:2:0", "tile count"), ("clahe:2:2.5", "tile count"), ("clahe:2:999", "tile count"),
    ("clahe:x", "must be numbers"), ("clahe:2:8:1", "unknown pre-processing"),
])
def test_bad_specs_are_refused(spec, needle):
    with pytest.raises(HandsegError, match=needle):
        parse_preprocess(spec)


def test_clahe_is_opencv_clahe_and_none_is_the_image():
    rng = np.random.default_rng(0)
    image = (rng.random((70, 90)) * 80 + 40).astype(np.uint8)  # low contrast: CLAHE spreads it
    want = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(image)
    got = preprocess_image(image, "clahe:3:4")
    assert got.dtype == np.uint8 and np.array_equal(got, want) and not np.array_equal(got, image)
    assert preprocess_image(image, None) is image
