"""Post-processing of predicted masks: keep each class's largest connected component.

Every bone is one connected piece, so stray blobs a model predicts elsewhere (a sesamoid next to the
thumb, a ring, the other hand's shadow) only cost Dice. Removing all but the largest component fixes
that, and hurts where a bone is predicted in two pieces; ``handseg select`` decides per class.

- **Connectivity is 8**: pixels that touch at a corner belong to one component, so a thin bone
  drawn along a diagonal stays one piece.
- **Ties** (two or more components of the same, largest, area): the component whose first pixel in
  row-major order comes first (its topmost row, then its leftmost pixel in that row) is kept. The rule
  does not depend on how OpenCV numbers its labels, nor on where a crop lies in the image, so a crop,
  its runs and the full-size mask all keep the same component.
- Work happens on a class's bounding box: a crop, or the bounding box of its runs (for CSV rows),
  never on a full-size ``(29, H, W)`` stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASS_INDEX, CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.formats.cropfile import bbox
from handseg.formats.recipe import HARD, MEMBER_THRESHOLD, SOFT
from handseg.formats.rle import EMPTY_RUNS, Runs, crop_to_runs, runs_to_mask

CONNECTIVITY = 8
KEEP_ALL, KEEP_NONE = "all", "none"


# ----------------------------------------------------------------------------------------------
# components


def label_components(mask: np.ndarray) -> tuple[np.ndarray | None, int, int, np.ndarray | None]:
    """Label a mask's 8-connected components and say which one :func:`largest_component` keeps.

    Args:
        mask: ``(h, w)`` bool or uint8 (non-zero is foreground).

    Returns:
        ``(labels, count, keep, areas)``: with two or more components, ``labels`` is ``(h, w)`` int32
        (0 background, 1..count the components), ``keep`` the label to keep and ``areas`` ``(count + 1,)``
        int64 pixel counts per label; with fewer, ``(None, count, 0, None)`` (nothing to remove).
    """
    import cv2

    if mask.size == 0:
        return None, 0, 0, None
    m = (mask if mask.dtype == np.bool_ else mask != 0).view(np.uint8)
    if not m.flags.c_contiguous:
        m = np.ascontiguousarray(m)
    n, labels = cv2.connectedComponents(m, connectivity=CONNECTIVITY, ltype=cv2.CV_32S)
    if n < 3:  # background and at most one component: nothing to remove
        return None, n - 1, 0, None
    areas = np.bincount(labels.ravel(), minlength=n)
    areas[0] = 0
    tied = np.flatnonzero(areas == areas.max())
    keep = int(tied[0]) if tied.size == 1 else _first_in_row_major(labels, tied)
    return labels, n - 1, keep, areas


def _first_in_row_major(labels: np.ndarray, candidates: np.ndarray) -> int:
    """The label among ``candidates`` whose first pixel in row-major order comes first."""
    flat = labels.ravel()
    first = [int(np.argmax(flat == k)) for k in candidates]  # ties are rare: a loop over a handful
    return int(candidates[int(np.argmin(first))])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D mask (ties: see the module docstring).

    Args:
        mask: ``(h, w)`` bool (or integer, non-zero is foreground).

    Returns:
        ``(h, w)`` bool, a new array; a mask with fewer than two components comes back unchanged.

    Example:
        >>> largest_component(np.array([[1, 1, 0, 1]], dtype=bool)).astype(int).tolist()
        [[1, 1, 0, 0]]
    """
    labels, _, keep, _ = label_components(mask)
    if labels is None:
        return mask.astype(np.bool_, copy=True)
    return labels == keep


# ----------------------------------------------------------------------------------------------
# runs (CSV rows) and mask stacks


def runs_crop(runs: Runs, width: int) -> tuple[np.ndarray, int, int]:
    """Paint runs into the crop of their bounding box: ``((h, w) bool crop, row0, col0)``.

    A run that continues onto the next image row makes the crop span the full width. Inverse of
    :func:`~handseg.formats.rle.crop_to_runs`.
    """
    starts, lengths = runs
    ends = starts + lengths
    row_s, col_s = np.divmod(starts, width)
    row_e, col_e = np.divmod(ends - 1, width)
    r0, r1 = int(row_s[0]), int(row_e[-1]) + 1
    if (row_s != row_e).any():
        c0, c1 = 0, width
    else:
        c0, c1 = int(col_s.min()), int(col_e.max()) + 1
    w = c1 - c0
    # within the crop every run still lies in one row (or the crop is full width), so the runs'
    # positions map over by re-indexing rows and columns
    local = (row_s - r0) * w + (col_s - c0)
    return runs_to_mask((local, lengths), (r1 - r0, w)), r0, c0


def keep_largest_runs(runs: Runs, shape: tuple[int, int]) -> Runs:
    """The largest 8-connected component of a mask given as runs, as runs (decodes only its bounding box).

    Args:
        runs: ``(starts, lengths)`` over the row-major flattening of an ``(H, W)`` image.
        shape: ``(H, W)``.

    Raises:
        HandsegError: the runs extend past an ``H x W`` image.
    """
    starts, lengths = runs
    if starts.size == 0:
        return EMPTY_RUNS
    height, width = shape
    if int(starts[-1] + lengths[-1]) > height * width:
        raise HandsegError(f"RLE runs past the end of a {height} x {width} image")
    crop, r0, c0 = runs_crop(runs, width)
    labels, _, keep, _ = label_components(crop)
    if labels is None:
        return runs
    return crop_to_runs(labels == keep, r0, c0, width)


def keep_largest_classes(runs: Sequence[Runs], shape: tuple[int, int], keep: Sequence[bool]) -> list[Runs]:
    """Apply :func:`keep_largest_runs` to the classes flagged in ``keep`` (one image's rows).

    Args:
        runs: one image's per-class runs, ``len(runs) == len(keep)`` (29).
        shape: the image's ``(H, W)``.
        keep: per class, whether to keep only the largest component.

    Example (the predict path, after ``runs = masks_to_runs(masks)``)::

        runs = keep_largest_classes(runs, image.shape[:2], keep)
    """
    if len(runs) != len(keep):
        raise ValueError(f"{len(runs)} classes of runs but {len(keep)} keep-largest flags")
    return [keep_largest_runs(r, shape) if k else r for r, k in zip(runs, keep)]


def keep_largest_masks(masks: np.ndarray, keep: Sequence[bool]) -> np.ndarray:
    """Keep the largest component of each flagged class of a ``(C, H, W)`` bool stack, in place.

    Each class is labelled on its own bounding box. Returns ``masks``.
    """

    if masks.shape[0] != len(keep):
        raise ValueError(f"{masks.shape[0]} classes of masks but {len(keep)} keep-largest flags")
    for c in np.flatnonzero(np.asarray(keep, dtype=bool)):
        box = bbox(masks[c])
        if box is None:
            continue
        r0, r1, c0, c1 = box
        masks[c, r0:r1, c0:c1] = largest_component(masks[c, r0:r1, c0:c1])
    return masks


# ----------------------------------------------------------------------------------------------
# the option value


def parse_keep_largest(spec: str | None) -> tuple[bool, ...]:
    """``--keep-largest`` value -> one flag per class.

    ``all`` (every class), ``none`` or ``None`` (no class), or comma-separated class names
    (``Radius,Ulna,Lunate``).

    Raises:
        HandsegError: an unknown class name (the message lists the valid ones).
    """
    if spec is None or spec.strip().lower() in ("", KEEP_NONE):
        return (False,) * NUM_CLASSES
    if spec.strip().lower() == KEEP_ALL:
        return (True,) * NUM_CLASSES
    flags = [False] * NUM_CLASSES
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token not in CLASS_INDEX:
            raise HandsegError(f"--keep-largest: unknown class {token!r}; valid: {KEEP_ALL}, {KEEP_NONE}, "
                               + ", ".join(CLASSES))
        flags[CLASS_INDEX[token]] = True
    return tuple(flags)


def format_keep_largest(keep: Iterable[bool]) -> str:
    """Flags -> the option value that :func:`parse_keep_largest` reads back (``all``, ``none`` or names)."""
    flags = list(keep)
    if all(flags):
        return KEEP_ALL
    names = [c for c, k in zip(CLASSES, flags) if k]
    return ",".join(names) if names else KEEP_NONE


GRID: tuple[float, ...] = tuple(float(v) for v in np.round(np.arange(0.20, 0.801, 0.05), 2))
"""The per-class threshold grid (0.20..0.80 step 0.05)."""


# ----------------------------------------------------------------------------------------------
# levels and cuts: the one definition of a mask, for selection and application alike


def union_box(gots: Sequence) -> tuple[int, int, int, int] | None:
    present = [g for g in gots if g is not None]
    if not present:
        return None
    return (min(g[1] for g in present), max(g[1] + g[0].shape[0] for g in present),
            min(g[2] for g in present), max(g[2] + g[0].shape[1] for g in present))


def place_crop(got, box: tuple[int, int, int, int], dtype=np.uint8) -> np.ndarray:
    """A ``(crop, row0, col0)`` (or None: nothing) on the box's grid, zero elsewhere."""
    r0, r1, c0, c1 = box
    if got is not None:
        crop, gr, gc = got
        if (gr, gc) == (r0, c0) and crop.shape == (r1 - r0, c1 - c0) and crop.dtype == dtype:
            return crop
    out = np.zeros((r1 - r0, c1 - c0), dtype=dtype)
    if got is not None:
        out[gr - r0 : gr - r0 + crop.shape[0], gc - c0 : gc - c0 + crop.shape[1]] = crop
    return out


def _integral(weights: Sequence[float]) -> bool:
    return all(float(w).is_integer() for w in weights)


def soft_level(placed: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_m w_m q_m`` of uint8 maps on one grid: exact integers (int32) when the weights are integers."""
    if _integral(weights):
        acc = np.zeros(placed[0].shape, dtype=np.int32)
        for q, w in zip(placed, weights):
            acc += q if w == 1 else q.astype(np.int32) * int(w)
        return acc
    acc = np.zeros(placed[0].shape, dtype=np.float64)
    for q, w in zip(placed, weights):
        acc += q * float(w)
    return acc


def hard_level(placed: Sequence[np.ndarray], member_threshold: float = MEMBER_THRESHOLD) -> np.ndarray:
    """How many members' maps exceed the member threshold, per pixel: uint8."""
    cut = member_threshold * 255.0
    votes = np.zeros(placed[0].shape, dtype=np.uint8)
    for q in placed:
        votes += q > cut
    return votes


def check_thresholds(values, where: str | Path | None = None, option: str | None = None) -> np.ndarray:
    """29 per-class thresholds (or one for every class), each a number strictly between 0 and 1: what
    :func:`level_cuts` cuts at. ``option`` names the flag in the error (``--threshold``).

    Returns:
        ``(29,)`` float64.

    Raises:
        HandsegError: wrong count, a non-number, or a value outside (0, 1).
    """
    try:
        thr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise HandsegError(f"thresholds must be numbers between 0 and 1, got {values!r}"[:200], where) from None
    if np.ndim(values) == 0:  # one threshold for every class
        thr = np.full(NUM_CLASSES, thr[0])
    if thr.shape != (NUM_CLASSES,):
        raise HandsegError(f"need {NUM_CLASSES} thresholds, got {thr.size}", where)
    bad = [(c, v) for c, v in zip(CLASSES, thr) if not (0.0 < v < 1.0)]
    if bad and option is not None:
        raise HandsegError(f"{option} must lie strictly between 0 and 1, got {bad[0][1]:g}", where)
    if bad:
        raise HandsegError(f"threshold for {bad[0][0]} is {bad[0][1]}; thresholds lie strictly between 0 and 1", where)
    return thr


def level_cuts(thresholds, weight_sum: float = 1.0) -> np.ndarray:
    """The one cut rule: a pixel belongs to a class when its stored level exceeds ``255 t sum(w)``.

    The level is what handseg stores for a probability ``p``: ``round(255 p)`` as uint8 (see
    :func:`~handseg.formats.probs.quantise_probs`), or ``sum_m w_m q_m`` of several such maps. So
    ``predict`` (on the quantised map of its float probabilities), ``vote soft``, a recipe, ``pseudo``
    and ``--tune-thresholds`` cut the same numbers the same way, and a map folder reproduces its CSV.

    Args:
        thresholds: ``t`` per class, ``(29,)`` (or a scalar).
        weight_sum: ``sum(w)`` of a weighted sum of levels (1 for one map).

    Returns:
        The cuts, float64, shaped like ``thresholds``.
    """
    return np.asarray(thresholds, dtype=np.float64) * 255.0 * float(weight_sum)


def integer_cuts(thresholds, weight_sum: float = 1.0) -> np.ndarray:
    """:func:`level_cuts` for levels that are whole numbers (a uint8 map, or ``round(255 p)`` held as floats):
    ``q > c`` exactly when ``q > floor(c)``, so the cuts are whole numbers too and a map can be compared as
    uint8, or as float32 without the cut's rounding to float32 moving a level across it."""
    return np.floor(level_cuts(thresholds, weight_sum))


def cut_value(kind: str, value: float, weight_sum: float = 1.0) -> float:
    """The number a level must exceed: ``255 t`` (configuration), ``255 t sum(w)`` (soft), ``k - 0.5`` (hard,
    ``value`` = min votes)."""
    if kind == HARD:
        return float(value) - 0.5
    return float(level_cuts(value, weight_sum if kind == SOFT else 1.0))
