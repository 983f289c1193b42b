import json

import cv2
import numpy as np
import pytest

from handseg.common.constants import CLASSES
from handseg.common.errors import HandsegError
from handseg.data.anatomy import hand_side, wrist_bend
from handseg.data.images import image_size, read_image
from handseg.data.labels import class_masks, class_runs, read_polygons
from handseg.data.layout import discover
from handseg.formats.rle import mask_to_runs


def _square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.int32)


def test_polygon_filled_area_is_known():
    # a 10 x 6 axis-aligned rectangle with inclusive corners fills 11 * 7 pixels with fillPoly
    polys = {"finger-1": _square(2, 3, 12, 9)}
    masks = class_masks(polys, (20, 20))
    assert masks.shape == (29, 20, 20) and masks.dtype == bool
    assert masks[0].sum() == 11 * 7
    assert masks[1:].sum() == 0


def test_masks_equal_full_canvas_fillpoly_and_keep_overlaps():
    rng = np.random.default_rng(0)
    polys = {name: rng.integers(-5, 70, (rng.integers(3, 12), 2)).astype(np.int32) for name in CLASSES}
    masks = class_masks(polys, (64, 60))
    for c, name in enumerate(CLASSES):
        ref = np.zeros((64, 60), np.uint8)
        cv2.fillPoly(ref, [polys[name].reshape(-1, 1, 2)], 1)
        assert np.array_equal(masks[c], ref.astype(bool)), name
        assert [r.tolist() for r in class_runs(polys, (64, 60))[c]] == [r.tolist() for r in mask_to_runs(ref)]
    assert (masks.sum(axis=0) > 1).any()  # multi-label: overlaps are kept, never argmax


def _write_label(path, polys, **extra):
    doc = {"annotations": [{"id": "x", "type": "poly_seg", "attributes": {}, "points": p.tolist(), "label": n}
                           for n, p in polys.items()], "filename": "x.jpg", "metadata": {"height": 3060}, **extra}
    path.write_text(json.dumps(doc))


def test_strict_json_errors_name_the_file(tmp_path):
    full = {n: _square(1, 1, 5, 5) for n in CLASSES}
    ok = tmp_path / "ok.json"
    _write_label(ok, full)
    assert set(read_polygons(ok)) == set(CLASSES)

    bad = tmp_path / "corrupt.json"
    bad.write_text('{"annotations": [')
    with pytest.raises(HandsegError, match="corrupt.json: not valid JSON"):
        read_polygons(bad)

    unknown = tmp_path / "unknown.json"
    _write_label(unknown, {**full, "finger-20": _square(0, 0, 3, 3)})
    with pytest.raises(HandsegError, match="unknown class 'finger-20'"):
        read_polygons(unknown)

    missing = tmp_path / "missing.json"
    _write_label(missing, {n: p for n, p in full.items() if n != "Pisiform"})
    with pytest.raises(HandsegError, match="missing classes: Pisiform"):
        read_polygons(missing)

    points = tmp_path / "points.json"
    points.write_text(json.dumps({"annotations": [{"label": "finger-1", "points": [[1, 2], [3]]}]}))
    with pytest.raises(HandsegError, match="points"):
        read_polygons(points)


def test_discover_order_and_layout(synth_data, tmp_path, capsys):
    samples = discover(synth_data / "train", labels="required")
    rels = [s.rel for s in samples]
    assert rels == sorted(rels)
    assert all(s.label_path.stem == s.stem for s in samples)
    assert any(s.stem.endswith(("_R", "_L")) for s in samples if s.patient == "ID001")
    test = discover(synth_data / "test")
    assert all(s.label_path is None for s in test)
    with pytest.raises(HandsegError, match="has no labels|no outputs_json"):
        discover(synth_data / "test", labels="required")
    # a data set's root: training stages read ROOT/train, prediction ROOT/test, scoring ROOT/test_gt;
    # which one was read is said (once per folder)
    capsys.readouterr()
    assert [s.rel for s in discover(synth_data)] == rels
    assert [s.rel for s in discover(synth_data, role="test")] == [s.rel for s in test]
    gt = discover(synth_data, labels="required", role="test_gt")
    assert gt and all(s.image_path.is_relative_to(synth_data / "test_gt") for s in gt)
    err = capsys.readouterr().err
    assert err.count("(its test_gt split)") == 1 and "(its test split)" in err
    (tmp_path / "root" / "test_gt" / "DCM").mkdir(parents=True)
    with pytest.raises(HandsegError, match="no DCM/ folder here .it holds .*test_gt"):
        discover(tmp_path / "root")


def test_label_without_image_is_an_error(tmp_path, synth_data):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(synth_data / "train", data)
    victim = next((data / "DCM").glob("*/*.png"))
    victim.unlink()
    with pytest.raises(HandsegError, match="no matching image"):
        discover(data, labels="optional")


def test_images_corrupt_png_and_size_from_header(tmp_path, synth_data):
    s = discover(synth_data / "train")[0]
    img = read_image(s.image_path)
    assert img.dtype == np.uint8 and img.shape == (128, 128) == image_size(s.image_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 3)
    with pytest.raises(HandsegError, match="bad.png: (corrupt|truncated) PNG"):
        read_image(bad)


def test_handedness_by_geometry():
    right = {"finger-1": _square(10, 10, 12, 12), "finger-16": _square(50, 10, 52, 12)}
    left = {"finger-1": _square(50, 10, 52, 12), "finger-16": _square(10, 10, 12, 12)}
    assert hand_side(right) == "right" and hand_side(left) == "left"
    masks = class_masks(right, (64, 64))
    assert hand_side(masks=masks) == "right"
    assert hand_side({"finger-1": _square(1, 1, 3, 3)}) is None


def test_synthetic_hands_sides_and_bend_are_recovered():
    from handseg.data.synth import sample_pose, synth_hand

    rng = np.random.default_rng(5)
    true, est = [], []
    for i in range(12):
        side = "right" if i % 2 else "left"
        pose = sample_pose(rng, side, bent_fraction=0.5, nail_art=False)
        _, polys = synth_hand(pose, 256, rng)
        assert hand_side(polys) == side
        true.append(pose.wrist_bend if side == "right" else pose.wrist_bend)
        est.append(wrist_bend(polys))
    assert np.corrcoef(true, est)[0, 1] > 0.9
