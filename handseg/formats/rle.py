"""Run-length encoding exactly as the competition baseline writes it, and set operations on runs.

Convention (the README's "Data format" section): flatten the H x W mask in row-major order; the RLE is space-separated
``start length`` pairs with 1-indexed starts; an empty mask is ``""`` (NaN is read as empty too).

Internally a mask is a pair of int64 arrays ``(starts, lengths)`` with 0-indexed, sorted,
non-overlapping starts: "runs". Encoding and decoding touch only the bounding box of the mask,
and voting and Dice work on runs directly, so no step scans or allocates a full 2048 x 2048 image
it does not need.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from handseg.common.errors import HandsegError

Runs = tuple[np.ndarray, np.ndarray]
"""``(starts, lengths)``: int64 arrays of equal length, 0-indexed starts, sorted, non-overlapping."""

_EMPTY = np.zeros(0, dtype=np.int64)
EMPTY_RUNS: Runs = (_EMPTY, _EMPTY)


# ----------------------------------------------------------------------------------------------
# strings <-> runs


def rle_to_runs(rle: str | float | None) -> Runs:
    """Parse an RLE string into runs, validating it.

    Args:
        rle: ``"start length start length ..."`` with 1-indexed starts; ``""``, ``None`` or NaN is empty.

    Returns:
        ``(starts, lengths)`` int64 arrays with 0-indexed starts.

    Raises:
        ValueError: the string is not a valid RLE (odd count, non-integers, runs out of order).
    """
    if rle is None or (isinstance(rle, float) and math.isnan(rle)):
        return EMPTY_RUNS
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    if rle == "" or rle.isspace():
        return EMPTY_RUNS
    values = _parse_ints(rle)
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size})")
    starts = values[0::2] - 1
    lengths = values[1::2]
    if (starts < 0).any():
        raise ValueError("RLE start below 1")
    if (lengths <= 0).any():
        raise ValueError("RLE run length must be positive")
    if starts.size > 1 and (starts[1:] < starts[:-1] + lengths[:-1]).any():
        raise ValueError("RLE runs overlap or are out of order")
    return starts, lengths


def _parse_ints(rle: str) -> np.ndarray:
    # np.fromstring in text mode is ~5x faster than str.split; it stops quietly (with a warning) at
    # the first bad token, so warnings are errors here and the token count is checked.
    if "  " not in rle and not rle.startswith(" ") and not rle.endswith(" "):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                values = np.fromstring(rle, dtype=np.int64, sep=" ")
            if values.size == rle.count(" ") + 1:
                return values
        except (ValueError, DeprecationWarning, RuntimeWarning):
            pass
    tokens = rle.split()
    bad = next((t for t in tokens if not (t.isdigit() or (t[0] == "-" and t[1:].isdigit()))), None)
    if bad is not None:
        raise ValueError(f"RLE value {bad[:20]!r} is not an integer")
    return np.array(tokens, dtype=np.int64)


def runs_to_rle(runs: Runs) -> str:
    """Format runs as the baseline's RLE string (1-indexed starts)."""
    starts, lengths = runs
    if starts.size == 0:
        return ""
    pairs = np.empty(starts.size * 2, dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


# ----------------------------------------------------------------------------------------------
# masks <-> runs


def mask_to_runs(mask: np.ndarray) -> Runs:
    """Runs of a 2-D mask, looking only at its bounding box.

    Args:
        mask: ``(H, W)`` bool or integer array; non-zero is foreground.

    Returns:
        Runs over the row-major flattening of the full ``H x W`` mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    m = mask if mask.dtype == np.bool_ else mask != 0
    height, width = m.shape
    if m.flags.c_contiguous and width % 8 == 0:
        # eight pixels a word: OR-reduce rows, then the columns of the occupied band
        words = m.view(np.uint64).reshape(height, width // 8)
        rows = np.flatnonzero(np.bitwise_or.reduce(words, axis=1))
        if rows.size == 0:
            return EMPTY_RUNS
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(np.bitwise_or.reduce(words[r0:r1], axis=0).view(np.uint8))
    else:
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            return EMPTY_RUNS
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(m[r0:r1].any(axis=0))
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    return crop_to_runs(m[r0:r1, c0:c1], r0, c0, width)


def crop_to_runs(crop: np.ndarray, row0: int, col0: int, width: int) -> Runs:
    """Runs of a mask given as a crop placed at ``(row0, col0)`` inside an image ``width`` wide.

    Runs that continue from the end of one image row to the start of the next are merged, so the
    result equals the runs of the full mask.
    """
    h, w = crop.shape
    if h == 0 or w == 0:
        return EMPTY_RUNS
    padded = np.zeros((h, w + 2), dtype=np.uint8)
    padded[:, 1:-1] = crop.view(np.uint8) if crop.dtype == np.bool_ else crop != 0
    # a change between neighbours marks a run's first pixel or one past its last; they alternate
    # within a row because every padded row starts and ends with 0
    flat = np.flatnonzero(padded[:, 1:] != padded[:, :-1])
    row, col = np.divmod(flat, w + 1)
    pos = (row + row0) * width + col + col0
    starts = pos[0::2]
    ends = pos[1::2]
    if col0 == 0 and col0 + w == width and starts.size > 1:
        touching = ends[:-1] == starts[1:]
        if touching.any():
            starts = starts[np.concatenate(([True], ~touching))]
            ends = ends[np.concatenate((~touching, [True]))]
    return starts.astype(np.int64, copy=False), (ends - starts).astype(np.int64, copy=False)


def runs_to_mask(runs: Runs, shape: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Paint runs into a 2-D bool mask, touching only their bounding box.

    Args:
        runs: ``(starts, lengths)`` as from :func:`rle_to_runs`.
        shape: ``(H, W)`` of the image the runs belong to.
        out: optional ``(H, W)`` bool array to paint into (pixels outside the runs are left as they are).

    Returns:
        ``(H, W)`` bool mask.

    Raises:
        ValueError: a run lies past the end of an ``H x W`` image.
    """
    height, width = shape
    if out is None:
        out = np.zeros((height, width), dtype=np.bool_)
    starts, lengths = runs
    if starts.size == 0:
        return out
    ends = starts + lengths
    if ends[-1] > height * width:
        raise ValueError(f"RLE runs past the end of a {height} x {width} image")
    row_s, col_s = np.divmod(starts, width)
    row_e = (ends - 1) // width
    if (row_s != row_e).any():
        # some run wraps onto the next row: paint the covered span in one pass
        span0, span1 = int(starts[0]), int(ends[-1])
        delta = np.zeros(span1 - span0 + 1, dtype=np.int32)
        np.add.at(delta, starts - span0, 1)
        np.add.at(delta, ends - span0, -1)
        flat = out.reshape(-1)
        flat[span0:span1] |= np.cumsum(delta[:-1]) > 0
        return out
    col_e = col_s + lengths  # exclusive, may equal width
    r0, r1 = int(row_s[0]), int(row_s[-1]) + 1
    c0, c1 = int(col_s.min()), int(col_e.max())
    if row_s.size == r1 - r0 and (row_s.size < 2 or (np.diff(row_s) == 1).all()):
        # one run in every row of the box (a convex bone): compare columns against the run ends
        cols = np.arange(c0, c1)
        out[r0:r1, c0:c1] |= (cols >= col_s[:, None]) & (cols < col_e[:, None])
        return out
    delta = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.int8)
    delta[row_s - r0, col_s - c0] += 1  # unique positions: runs in one row never share a start
    delta[row_s - r0, col_e - c0] -= 1
    out[r0:r1, c0:c1] |= np.cumsum(delta[:, :-1], axis=1, dtype=np.int8) > 0
    return out


def runs_to_crop(runs: Runs, shape: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    """Runs painted into their bounding box only: ``((h, w) bool crop, row0, col0)``, or None if empty.

    Raises:
        ValueError: a run lies past the end of an ``H x W`` image.
    """
    starts, lengths = runs
    if starts.size == 0:
        return None
    height, width = shape
    r0, r1 = int(starts[0]) // width, int(starts[-1] + lengths[-1] - 1) // width + 1
    band = runs_to_mask((starts - r0 * width, lengths), (r1 - r0, width)) if r1 <= height else None
    if band is None:
        raise ValueError(f"RLE runs past the end of a {height} x {width} image")
    cols = np.flatnonzero(band.any(axis=0))
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    return band[:, c0:c1], r0, c0


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask as the baseline's RLE string.

    Example:
        >>> rle_encode(np.array([[0, 1, 1], [1, 0, 0]], dtype=bool))
        '2 3'
    """
    return runs_to_rle(mask_to_runs(mask))


def rle_decode(rle: str | float | None, shape: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Decode an RLE string into an ``(H, W)`` bool mask (NaN and ``""`` are empty)."""
    return runs_to_mask(rle_to_runs(rle), shape, out)


def rles_to_masks(rles: list[str], shape: tuple[int, int]) -> np.ndarray:
    """Decode one image's per-class RLEs into a ``(C, H, W)`` bool array."""
    out = np.zeros((len(rles), *shape), dtype=np.bool_)
    for c, rle in enumerate(rles):
        rle_decode(rle, shape, out[c])
    return out


# ----------------------------------------------------------------------------------------------
# set operations on runs


def _coverage(run_sets: list[Runs]) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries and, for each segment ``[pos[i], pos[i+1])``, how many run sets cover it."""
    starts = [r[0] for r in run_sets]
    ends = [r[0] + r[1] for r in run_sets]
    pos = np.concatenate(starts + ends)
    if pos.size == 0:
        return _EMPTY, _EMPTY
    delta = np.concatenate([np.ones(s.size, np.int64) for s in starts] + [-np.ones(e.size, np.int64) for e in ends])
    order = np.argsort(pos, kind="stable")
    # ties make zero-length segments, so they never change an area or a vote
    return pos[order], np.cumsum(delta[order])


def intersection_area(a: Runs, b: Runs) -> int:
    """Number of pixels in both masks."""
    if a[0].size == 0 or b[0].size == 0:
        return 0
    pos, cover = _coverage([a, b])
    seg = np.diff(pos)
    return int(seg[cover[:-1] >= 2].sum())


def vote_runs(run_sets: list[Runs], min_votes: int) -> Runs:
    """Pixels covered by at least ``min_votes`` of the run sets (a hard vote), as runs."""
    if min_votes < 1:
        raise ValueError("min_votes must be at least 1")
    pos, cover = _coverage(run_sets)
    if pos.size == 0:
        return EMPTY_RUNS
    seg_start, seg_end = pos[:-1], pos[1:]
    keep = (cover[:-1] >= min_votes) & (seg_end > seg_start)
    starts, ends = seg_start[keep], seg_end[keep]
    if starts.size > 1:
        touching = ends[:-1] == starts[1:]
        if touching.any():
            starts = starts[np.concatenate(([True], ~touching))]
            ends = ends[np.concatenate((~touching, [True]))]
    return starts, ends - starts


def check_runs_fit(runs: Runs, shape: tuple[int, int], where: str) -> None:
    """Raise a HandsegError if runs extend past an image of ``shape``."""
    starts, lengths = runs
    if starts.size and int(starts[-1] + lengths[-1]) > shape[0] * shape[1]:
        raise HandsegError(f"RLE runs past the end of a {shape[0]} x {shape[1]} image", where)
