"""Keep-largest-component against worked examples; its wiring into `vote`."""

import json

import numpy as np
import pytest

from handseg.common.constants import CLASS_INDEX, CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.ensemble.masks import (
    format_keep_largest,
    keep_largest_classes,
    keep_largest_masks,
    keep_largest_runs,
    largest_component,
    parse_keep_largest,
    runs_crop,
)
from handseg.formats.probs import pack_probs
from handseg.formats.rle import crop_to_runs, mask_to_runs, rle_encode, runs_to_mask
from handseg.formats.submission import read_predictions, write_predictions
from tests.conftest import run_cli

# Three components, worked out by hand:
#   A: the 2x2 square at the top left (4 px)
#   B: the diagonal staircase from (2,3) to (5,7) (5 px): one piece only because diagonal neighbours
#      connect (8-connectivity); with 4-connectivity it would fall apart into pieces of 1, 1, 1 and 2
#   C: the single pixel at (5,0)
# The largest is B (5 px), so the answer would be A under 4-connectivity.
THREE = np.array([
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 0, 0],
    [1, 0, 0, 0, 0, 0, 1, 1],
], dtype=bool)
ONLY_B = np.zeros_like(THREE)
ONLY_B[[2, 3, 4, 5, 5], [3, 4, 5, 6, 7]] = True

# A tie: X (3 px, row 1, columns 4..6) and Y (3 px, column 1, rows 1..3) share their top row; Y's
# first pixel in row-major order, (1, 1), comes before X's, (1, 4), so Y is kept.
TIE = np.zeros((5, 8), dtype=bool)
TIE[1, 4:7] = True
TIE[1:4, 1] = True
ONLY_Y = np.zeros_like(TIE)
ONLY_Y[1:4, 1] = True


def test_largest_component_worked_example():
    assert np.array_equal(largest_component(THREE), ONLY_B)
    assert np.array_equal(largest_component(TIE), ONLY_Y)
    # fewer than two components: unchanged (and a copy)
    one = ONLY_B.copy()
    out = largest_component(one)
    assert np.array_equal(out, ONLY_B) and out is not one
    assert not largest_component(np.zeros((3, 3), bool)).any()


def test_tie_rule_does_not_depend_on_position_or_path():
    # the tie placed anywhere in a bigger image, through runs, crops and (C, H, W) stacks alike
    for r0, c0 in ((0, 0), (7, 3), (11, 24)):
        full = np.zeros((20, 32), dtype=bool)
        full[r0 : r0 + 5, c0 : c0 + 8] = TIE
        want = np.zeros_like(full)
        want[r0 : r0 + 5, c0 : c0 + 8] = ONLY_Y
        got = runs_to_mask(keep_largest_runs(mask_to_runs(full), full.shape), full.shape)
        assert np.array_equal(got, want)
        stack = np.stack([full, full, np.zeros_like(full)])
        keep_largest_masks(stack, [True, False, True])
        assert np.array_equal(stack[0], want) and np.array_equal(stack[1], full) and not stack[2].any()


def test_runs_that_wrap_onto_the_next_row():
    # 4 x 5 image: pixels (0,3) (0,4) (1,0) (1,1) are one run in the flattening (0-indexed 3..6), but two
    # components in the image (row ends do not touch the next row's start); plus (3,2) alone.
    # The two 2-px pieces tie; (0,3) comes first in row-major order, so the top piece stays.
    mask = np.zeros((4, 5), dtype=bool)
    mask[0, 3:5] = mask[1, 0:2] = mask[3, 2] = True
    runs = mask_to_runs(mask)
    assert runs[0].tolist() == [3, 17] and runs[1].tolist() == [4, 1]
    crop, r0, c0 = runs_crop(runs, 5)
    assert (r0, c0) == (0, 0) and np.array_equal(crop, mask)
    kept = keep_largest_runs(runs, (4, 5))
    assert kept[0].tolist() == [3] and kept[1].tolist() == [2]


def test_runs_crop_is_the_bounding_box():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:9, 10:14] = True
    mask[20, 30] = True
    crop, r0, c0 = runs_crop(mask_to_runs(mask), 40)
    assert (r0, c0, crop.shape) == (5, 10, (16, 21))
    assert np.array_equal(crop, mask[5:21, 10:31])
    assert [a.tolist() for a in crop_to_runs(crop, r0, c0, 40)] == [a.tolist() for a in mask_to_runs(mask)]
    with pytest.raises(HandsegError, match="past the end"):
        keep_largest_runs(mask_to_runs(mask), (10, 40))


def test_keep_largest_classes_only_touches_flagged_classes():
    runs = [mask_to_runs(THREE)] * 3
    out = keep_largest_classes(runs, THREE.shape, [True, False, True])
    assert np.array_equal(runs_to_mask(out[0], THREE.shape), ONLY_B)
    assert out[1] is runs[1]
    with pytest.raises(ValueError):
        keep_largest_classes(runs, THREE.shape, [True])


def test_parse_and_format_keep_largest():
    assert parse_keep_largest("all") == (True,) * NUM_CLASSES
    assert parse_keep_largest(None) == parse_keep_largest("none") == (False,) * NUM_CLASSES
    flags = parse_keep_largest("Radius, Ulna,")
    assert [CLASSES[i] for i in np.flatnonzero(flags)] == ["Radius", "Ulna"]
    assert format_keep_largest(flags) == "Radius,Ulna"
    assert parse_keep_largest(format_keep_largest(flags)) == flags
    assert format_keep_largest([True] * NUM_CLASSES) == "all"
    with pytest.raises(HandsegError) as e:
        parse_keep_largest("Radius,radius")
    message = str(e.value)
    assert "'radius'" in message and "valid: all, none, finger-1" in message and "Ulna" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------
# vote --keep-largest


def _image_folder(root, names_shapes):
    import cv2

    for name, (h, w) in names_shapes.items():
        (root / "DCM" / "ID001").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "DCM" / "ID001" / name), np.zeros((h, w), np.uint8))
    return root


def test_vote_soft_keep_largest(tmp_path, capsys):
    a = np.zeros((NUM_CLASSES, 6, 8), np.float32)
    a[0] = THREE * 0.9
    a[1] = THREE * 0.9
    for name in ("pa", "pb"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", pack_probs(a))
        (tmp_path / name / "index.json").write_text(json.dumps({"images": ["x.png"]}))
    code, _, err = run_cli(["vote", "soft", tmp_path / "pa", tmp_path / "pb", "-o", tmp_path / "s.csv",
                            "--keep-largest", "finger-1"], capsys)
    assert code == 0, err
    s = read_predictions(tmp_path / "s.csv")
    assert s.rle("x.png", 0) == rle_encode(ONLY_B) and s.rle("x.png", 1) == rle_encode(THREE)
    manifest = json.loads((tmp_path / "s.manifest.json").read_text())
    assert manifest["options"]["keep_largest"] == "finger-1"
    code, _, err = run_cli(["vote", "soft", tmp_path / "pa", tmp_path / "pb", "-o", tmp_path / "bad.csv",
                            "--keep-largest", "Radius,Femur"], capsys)
    assert code == 2 and "unknown class 'Femur'" in err and "valid: all" in err and err.count("\n") == 1
    assert not (tmp_path / "bad.csv").exists()


def test_vote_hard_and_classwise_keep_largest_need_image_sizes(tmp_path, capsys):
    rows = {"x.png": [rle_encode(THREE)] * NUM_CLASSES}
    for name in ("a", "b", "c"):
        write_predictions(tmp_path / f"{name}.csv", rows.items())
    csvs = [tmp_path / f"{n}.csv" for n in "abc"]
    code, _, err = run_cli(["vote", "hard", *csvs, "-o", tmp_path / "v.csv", "--keep-largest", "all"], capsys)
    assert code == 2 and "--data" in err and not (tmp_path / "v.csv").exists()

    data = _image_folder(tmp_path / "data", {"x.png": THREE.shape})
    code, _, err = run_cli(["vote", "hard", *csvs, "-o", tmp_path / "v.csv", "--keep-largest", "Lunate",
                            "--data", data], capsys)
    assert code == 0, err
    v = read_predictions(tmp_path / "v.csv")
    assert v.rle("x.png", CLASS_INDEX["Lunate"]) == rle_encode(ONLY_B)
    assert v.rle("x.png", 0) == rle_encode(THREE)

    (tmp_path / "map.json").write_text(json.dumps({"default": "a.csv"}))
    code, _, err = run_cli(["vote", "classwise", "--map", tmp_path / "map.json", "-o", tmp_path / "cw.csv",
                            "--keep-largest", "all", "--data", data], capsys)
    assert code == 0, err
    c = read_predictions(tmp_path / "cw.csv")
    assert all(c.rle("x.png", k) == rle_encode(ONLY_B) for k in range(NUM_CLASSES))

    # the image is smaller than the runs: an error naming the CSV, not a wrong mask
    small = _image_folder(tmp_path / "small", {"x.png": (3, 8)})
    code, _, err = run_cli(["vote", "hard", *csvs, "-o", tmp_path / "w.csv", "--keep-largest", "all",
                            "--data", small], capsys)
    assert code == 2 and "a.csv (x.png" in err and "past the end" in err
    # an image missing from --data
    other = _image_folder(tmp_path / "other", {"y.png": (6, 8)})
    code, _, err = run_cli(["vote", "hard", *csvs, "-o", tmp_path / "w.csv", "--keep-largest", "all",
                            "--data", other], capsys)
    assert code == 2 and "holds other images than the inputs (e.g. x.png)" in err and not (tmp_path / "w.csv").exists()
