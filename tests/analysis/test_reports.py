"""The report's building blocks against hand-made masks: colours, run decoding into crops, the
full-size and per-class overlay files, the difference colours and the heatmap's text colour."""

import itertools

import cv2
import numpy as np
import pytest

from handseg.analysis.reports.overlays import (
    CLASS_COLOURS,
    DIFF_COLOURS,
    OverlayWriter,
    crops_from_polygons,
    pack_shelves,
    runs_box,
)
from handseg.analysis.reports.page import page_json, text_colour
from handseg.common.constants import CLASS_INDEX, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.formats.rle import mask_to_runs


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.float32) / 255, cv2.COLOR_RGB2Lab).reshape(-1, 3)


def test_29_class_colours_are_distinct():
    assert CLASS_COLOURS.shape == (NUM_CLASSES, 3)
    lab = _lab(CLASS_COLOURS)
    closest = min(np.linalg.norm(lab[i] - lab[j]) for i, j in itertools.combinations(range(NUM_CLASSES), 2))
    # CIE76 delta-E above ~10 is a clearly different colour; tab20 repeated colours (delta-E 0)
    assert closest > 20
    assert tuple(CLASS_COLOURS[CLASS_INDEX["Radius"]]) != tuple(CLASS_COLOURS[CLASS_INDEX["Ulna"]])


def test_heatmap_text_colour_follows_the_cell_luminance():
    import matplotlib

    viridis = matplotlib.colormaps["viridis"]
    assert text_colour(viridis(1.0)) == "black"  # yellow: white text was unreadable
    assert text_colour(viridis(0.0)) == "white"  # dark purple
    assert text_colour((1.0, 1.0, 1.0)) == "black" and text_colour((0, 0, 0)) == "white"

    from handseg.analysis.reports.compare import similarity_figure

    sim = np.array([[1.0, 0.9], [0.9, 1.0]])
    fig = similarity_figure(["a", "b"], sim)
    colours = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
    assert colours == {"1.000": "black", "0.900": "white"}  # vmin 0.9 is dark, vmax 1.0 is yellow


def _shape_masks() -> tuple[tuple[int, int], np.ndarray]:
    """A non-square (5, 7) image with: a box, a mask touching both side edges (its runs wrap from one
    row into the next), a single pixel, and an empty class."""
    shape = (5, 7)
    masks = np.zeros((NUM_CLASSES, *shape), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 2, 5:] = True
    masks[1, 3, :2] = True  # runs on as one run from row 2's end into row 3
    masks[2, 4, 6] = True
    return shape, masks


def test_decode_gives_crops_that_place_back_to_the_masks(tmp_path):
    shape, masks = _shape_masks()
    runs = [mask_to_runs(m) for m in masks]
    assert runs[1][0].size == 1  # the wrapping case really is one run
    assert runs_box(runs[1], shape[1]) == (2, 4, 0, 7)
    with OverlayWriter(tmp_path, workers=1) as writer:
        crops = writer.decode(runs, shape)
        again = writer.decode(runs, shape)  # the reusable buffer was cleared after each class
    for c in range(NUM_CLASSES):
        if not masks[c].any():
            assert crops[c] is None
            continue
        crop, r0, c0 = crops[c]
        placed = np.zeros(shape, bool)
        placed[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop
        assert (placed == masks[c]).all()
        assert (again[c][0] == crop).all()
    assert crops[0][1:] == (1, 2) and crops[0][0].shape == (2, 3)


def _read(path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_mask_overlay_files_at_full_size_with_class_colours(tmp_path):
    shape, masks = _shape_masks()
    masks[3, 1, 3] = True  # overlaps class 0: the later class is drawn on top
    with OverlayWriter(tmp_path, workers=2) as writer:
        crops = writer.decode([mask_to_runs(m) for m in masks], shape)
        layer, _ = writer.masks("ID001_x", "gt", crops, shape)
    full = _read(tmp_path / layer["full"])
    assert full.shape == (5, 7, 4)  # BGRA at the image's size
    expected = np.zeros((5, 7, 4), np.uint8)
    for c in (0, 1, 2, 3):
        expected[masks[c]] = [*CLASS_COLOURS[c][::-1], 255]
    assert (full == expected).all()
    sheet = _read(tmp_path / layer["sprite"])
    for c in range(NUM_CLASSES):
        box = layer["boxes"][c]
        if not masks[c].any():
            assert box is None
            continue
        x, y, w, h, sx, sy = box
        crop = sheet[sy : sy + h, sx : sx + w]
        region = masks[c, y : y + h, x : x + w]
        assert (crop[..., 3] == 255 * region).all()  # exactly the class's pixels, in its own box
        assert (crop[region][:, :3] == CLASS_COLOURS[c][::-1]).all()


def test_difference_overlay_colours_pixel_by_pixel(tmp_path):
    shape = (3, 8)
    ref = np.zeros((NUM_CLASSES, *shape), bool)
    pred = np.zeros_like(ref)
    ref[0, 0, 0] = pred[0, 0, 0] = True  # agree
    ref[0, 0, 1] = True  # missed
    pred[1, 0, 2] = True  # extra
    ref[0, 1, 3] = pred[1, 1, 3] = True  # found, but labelled as another class
    ref[4, 2, 5:8] = pred[4, 2, 6:8] = True  # class 4: one missed, two agree
    with OverlayWriter(tmp_path, workers=1) as writer:
        a = writer.decode([mask_to_runs(m) for m in ref], shape)
        b = writer.decode([mask_to_runs(m) for m in pred], shape)
        layer, thumb = writer.diff("ID001_x", "csv1", a, b, shape, None, thumb_width=8)
    full = _read(tmp_path / layer["full"])
    assert full.shape == (3, 8, 4)

    def bgra(name):
        return [*DIFF_COLOURS[name][::-1], 255]

    expected = np.zeros((3, 8, 4), np.uint8)
    expected[0, 0], expected[0, 1], expected[0, 2] = bgra("agree"), bgra("missed"), bgra("extra")
    expected[1, 3] = bgra("confused")
    expected[2, 5], expected[2, 6:8] = bgra("missed"), bgra("agree")
    assert (full == expected).all()
    # the thumbnail (same size here) shows the same colours, opaque
    assert thumb.shape == (3, 8, 3) and thumb[1, 3].tolist() == list(DIFF_COLOURS["confused"])
    # per class: class 0 has agree + missed + missed(1, 3) in its box; class 1 only extras
    sheet = _read(tmp_path / layer["sprite"])
    x, y, w, h, sx, sy = layer["boxes"][0]
    assert (x, y, w, h) == (0, 0, 4, 2)
    crop = sheet[sy : sy + h, sx : sx + w]
    assert crop[0, 0].tolist() == bgra("agree") and crop[0, 1].tolist() == bgra("missed")
    assert crop[1, 3].tolist() == bgra("missed") and crop[0, 2, 3] == 0
    x, y, w, h, sx, sy = layer["boxes"][1]
    assert (x, y, w, h) == (2, 0, 2, 2)
    crop = sheet[sy : sy + h, sx : sx + w]
    assert crop[0, 0].tolist() == bgra("extra") and crop[1, 1].tolist() == bgra("extra")
    assert layer["boxes"][2] is None


def test_crops_from_polygons_cover_the_filled_polygon():
    square = np.array([[2, 1], [5, 1], [5, 3], [2, 3]], np.int32)
    crops = crops_from_polygons({"finger-1": square}, (6, 9))
    crop, r0, c0 = crops[0]
    assert (r0, c0) == (1, 2) and crop.shape == (3, 4) and crop.all()  # fillPoly includes the edges
    assert crops[CLASS_INDEX["Ulna"]] is None  # not annotated: no crop
    with pytest.raises(HandsegError, match="x.json: class Ulna: the polygon lies outside the 9 x 6 image"):
        crops_from_polygons({"Ulna": np.array([[50, 50], [60, 50], [55, 60]])}, (6, 9), "x.json")


def test_shelf_packing_never_overlaps():
    sizes = [(3, 4), None, (2, 6), (5, 2), (1, 9), (4, 4)]
    positions, height, width = pack_shelves(sizes)
    rects = [(x, y, s[1], s[0]) for (x, y), s in ((p, s) for p, s in zip(positions, sizes) if s)]
    assert positions[1] is None
    for (x, y, w, h), (x2, y2, w2, h2) in itertools.combinations(rects, 2):
        assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
    assert all(x + w <= width and y + h <= height for x, y, w, h in rects)
    assert height * width <= 2 * sum(h * w for _, _, w, h in rects)  # no long empty strip


def test_page_json_cannot_close_its_script_element():
    text = page_json({"image": "</script><!--x.png"})
    assert "</script>" not in text and "<!--" not in text
    import json

    assert json.loads(text) == {"image": "</script><!--x.png"}


@pytest.mark.parametrize("workers", [1, 3])
def test_writer_raises_an_encoding_error_on_close(tmp_path, workers):
    writer = OverlayWriter(tmp_path, workers=workers)
    writer._write("bad.png", np.zeros((2, 2, 7), np.uint8))  # 7 channels: PNG cannot hold it
    with pytest.raises(Exception):  # noqa: B017 - OpenCV's error type, re-raised from the thread
        writer.close()
