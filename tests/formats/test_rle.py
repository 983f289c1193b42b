import numpy as np
import pytest

from handseg.formats.rle import (
    intersection_area,
    mask_to_runs,
    rle_decode,
    rle_encode,
    rle_to_runs,
    runs_to_mask,
    vote_runs,
)


def baseline_encode(mask: np.ndarray) -> str:
    """The official baseline's encoder, verbatim in spirit: the independent truth."""
    pixels = np.concatenate([[0], mask.flatten().astype(np.uint8), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def test_known_strings_for_hand_made_masks():
    m = np.array([[0, 1, 1, 0],
                  [0, 0, 0, 1],
                  [1, 1, 0, 0]], dtype=bool)
    # flat: 0 1 1 0 | 0 0 0 1 | 1 1 0 0 -> runs at 2 (len 2) and 8 (len 3, wraps a row)
    assert rle_encode(m) == "2 2 8 3"
    assert rle_encode(np.zeros((3, 4), bool)) == ""
    assert rle_encode(np.ones((2, 3), bool)) == "1 6"
    assert rle_encode(np.array([[0, 0], [0, 1]], np.uint8)) == "4 1"


def test_decode_known_string_and_empty_forms():
    m = rle_decode("2 2 8 3", (3, 4))
    assert m.astype(int).tolist() == [[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]]
    for empty in ("", float("nan"), None):
        assert not rle_decode(empty, (3, 4)).any()


@pytest.mark.parametrize("seed", range(5))
def test_bit_exact_round_trip_against_baseline(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        if rng.random() < 0.3:  # full rows: runs that wrap from one row into the next
            m[rng.integers(0, h):] = True
        s = rle_encode(m)
        assert s == baseline_encode(m)
        assert np.array_equal(rle_decode(s, (h, w)), m)


def test_large_mask_round_trip_2048():
    import cv2

    m = np.zeros((2048, 2048), np.uint8)
    cv2.ellipse(m, (1000, 900), (60, 200), 10, 0, 360, 1, -1)
    cv2.rectangle(m, (0, 2000), (2047, 2047), 1, -1)  # full-width rows at the bottom
    s = rle_encode(m)
    assert s == baseline_encode(m)
    assert np.array_equal(rle_decode(s, m.shape), m.astype(bool))


@pytest.mark.parametrize("bad,msg", [("1 2 3", "odd"), ("a 3", "not an integer"), ("1 0", "positive"),
                                     ("0 3", "below 1"), ("5 2 3 1", "overlap"), ("1 5 3 2", "overlap"),
                                     ("1.5 2", "not an integer")])
def test_malformed_rle_is_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        rle_to_runs(bad)


def test_decode_past_image_end_is_an_error():
    with pytest.raises(ValueError, match="past the end"):
        rle_decode("10 5", (3, 4))


def test_intersection_and_vote_match_direct_computation():
    rng = np.random.default_rng(3)
    for _ in range(100):
        shape = tuple(rng.integers(2, 30, 2))
        masks = [rng.random(shape) < 0.4 for _ in range(4)]
        runs = [mask_to_runs(m) for m in masks]
        assert intersection_area(runs[0], runs[1]) == int((masks[0] & masks[1]).sum())
        total = np.sum(masks, axis=0)
        for k in (1, 2, 3, 4):
            voted = runs_to_mask(vote_runs(runs, k), shape)
            assert np.array_equal(voted, total >= k)


def test_vote_worked_out_by_hand():
    # 1-D image of 10 pixels: A = 0..4, B = 3..7, C = 4..9 (0-indexed, inclusive)
    a, b, c = rle_to_runs("1 5"), rle_to_runs("4 5"), rle_to_runs("5 6")
    assert vote_runs([a, b, c], 2)[0].tolist() == [3]  # pixels 3..7 covered twice or more
    assert vote_runs([a, b, c], 2)[1].tolist() == [5]
    assert vote_runs([a, b, c], 3)[0].tolist() == [4] and vote_runs([a, b, c], 3)[1].tolist() == [1]
    assert vote_runs([a, b, c], 1)[1].tolist() == [10]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tensor_runs_equal_numpy_runs(device):
    """predict's device-side runs (torch) equal the numpy encoder's, including empty, full and
    row-wrapping masks and widths that are not multiples of 8."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    from handseg.inference.predictor import masks_to_runs, tensor_runs

    rng = np.random.default_rng(3)
    for h, w in ((37, 53), (64, 64)):
        masks = rng.random((6, h, w)) < np.array([0.0, 1.0, 0.5, 0.02, 0.98, 0.3]).reshape(-1, 1, 1)
        masks[5, :, -3:] = True
        masks[5, 1:, :2] = True  # runs that continue from one row's end into the next
        tensor = torch.from_numpy(masks).to(device)
        for got in (masks_to_runs(tensor), tensor_runs(tensor)):  # the host's choice, and torch's on any device
            for m, (starts, lengths) in zip(masks, got):
                want = mask_to_runs(m)
                assert starts.dtype == np.int64 and lengths.dtype == np.int64
                assert np.array_equal(starts, want[0]) and np.array_equal(lengths, want[1])
