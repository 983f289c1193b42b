"""A region of interest: the box around a group of bones that a ROI model (``train --roi``) sees.

A 2024 team replaced the carpal classes of their whole-hand model with the output of a model trained
on a wrist crop. Here such a model is trained on a square box around its classes, taken from the labels
(with a random jitter of its size and centre, so that the model does not rely on a perfect box); at
prediction the box comes from a stage-1 model's masks of those classes (the cascade's ``--context``
runs; each class's largest connected component, so that a stray pixel does not stretch it). The box is
cut from the full-resolution image (beyond the image's edge: black, as training's crops pad) and resized
to the model's ``--size``.

This module is the one home of the rule that turns the classes' extent into a box, used by training
(:class:`~handseg.training.dataset.SegmentationDataset`) and prediction
(:class:`~handseg.inference.predictor.Predictor`) alike.
"""

from __future__ import annotations

import math

import numpy as np

from handseg.common.constants import CARPALS, CLASS_INDEX, CLASSES
from handseg.common.errors import HandsegError

ROI_GROUPS: dict[str, tuple[str, ...]] = {"carpals": CARPALS}
"""Names for groups of classes that ``--roi`` takes besides class names (``--roi carpals``)."""
ROI_MARGIN = 0.15
"""Default share of the classes' extent (its longer side) added as a margin on each side of the box."""
ROI_JITTER = (0.1, 0.05)
"""Training's random change of a box: its side by up to +-10 %, its centre by up to 5 % of its side."""
MIN_ROI_SIDE = 32
"""The smallest box side in pixels (a class of a few pixels still gets a box the model can read)."""

Bounds = tuple[int, int, int, int]
"""``(row0, row1, col0, col1)``: the rows and columns an extent covers, ends exclusive."""
Box = tuple[int, int, int]
"""``(row, col, side)``: a square's top-left corner (may lie outside the image) and side, in pixels."""


def parse_roi(spec: str | list[str] | tuple[str, ...] | None, flag: str = "--roi") -> list[str] | None:
    """The classes of a ``--roi`` spec, in class order: a group name (``carpals``) or class names, comma
    separated (``Scaphoid,Lunate``), or both; ``None`` for no ROI.

    Raises:
        HandsegError: an unknown name (listing the groups and classes), or no class at all.
    """
    if spec is None:
        return None
    parts = spec if isinstance(spec, list | tuple) else str(spec).split(",")
    chosen: set[str] = set()
    for part in parts:
        name = str(part).strip()
        if not name:
            continue
        if name.lower() in ROI_GROUPS:
            chosen.update(ROI_GROUPS[name.lower()])
        elif name in CLASS_INDEX:
            chosen.add(name)
        else:
            raise HandsegError(f"{flag}: unknown class or group {name!r}; valid: {', '.join(ROI_GROUPS)} or class "
                               f"names ({', '.join(CLASSES[:3])}, ..., {CLASSES[-1]})")
    if not chosen:
        raise HandsegError(f"{flag}: no class given; e.g. {flag} carpals or {flag} Scaphoid,Lunate")
    return [c for c in CLASSES if c in chosen]


def roi_label(classes: list[str]) -> str:
    """A short name of a ROI's classes: its group's name (``carpals``), or the class names."""
    group = next((g for g, members in ROI_GROUPS.items() if set(members) == set(classes)), None)
    return group or (",".join(classes) if len(classes) <= 3 else f"{classes[0]},...({len(classes)} classes)")


def roi_indices(classes: list[str]) -> list[int]:
    return [CLASS_INDEX[c] for c in classes]


def crops_bounds(crops, indices: list[int]) -> Bounds | None:
    """The extent of the classes ``indices`` in bone crops (``(class, bool crop, row0, col0)``, as labels
    give them); None when none of them is there."""
    wanted = set(indices)
    boxes = [(r0, r0 + crop.shape[0], c0, c0 + crop.shape[1]) for c, crop, r0, c0 in crops
             if c in wanted and crop.any()]
    if not boxes:
        return None
    return (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))


def mask_bounds(rows, cols) -> Bounds | None:
    """The extent of a mask from whether each row and each column holds a pixel (numpy bool vectors);
    None for an empty mask."""
    rows, cols = np.flatnonzero(np.asarray(rows)), np.flatnonzero(np.asarray(cols))
    if rows.size == 0 or cols.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def roi_box(bounds: Bounds, margin: float = ROI_MARGIN, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
            ) -> Box:
    """The square box a ROI model sees around an extent: centred on it, its side the extent's longer side
    plus ``margin`` of it on each side (at least :data:`MIN_ROI_SIDE`), times ``scale``, the centre moved
    by ``shift`` (rows, columns) times the side. ``scale`` and ``shift`` are training's jitter."""
    r0, r1, c0, c1 = bounds
    side = max(MIN_ROI_SIDE, math.ceil(max(r1 - r0, c1 - c0) * (1.0 + 2.0 * margin) * scale))
    centre_r = (r0 + r1) / 2.0 + shift[0] * side
    centre_c = (c0 + c1) / 2.0 + shift[1] * side
    return int(math.floor(centre_r - side / 2.0)), int(math.floor(centre_c - side / 2.0)), side


def jittered_box(bounds: Bounds, margin: float, rng: np.random.Generator) -> Box:
    """:func:`roi_box` with training's random jitter (:data:`ROI_JITTER`)."""
    size_jitter, centre_jitter = ROI_JITTER
    scale = float(rng.uniform(1.0 - size_jitter, 1.0 + size_jitter))
    shift = (float(rng.uniform(-centre_jitter, centre_jitter)), float(rng.uniform(-centre_jitter, centre_jitter)))
    return roi_box(bounds, margin, scale, shift)


def overlap(box: Box, shape: tuple[int, int]) -> tuple[slice, slice, slice, slice] | None:
    """Where a box and an image of ``shape`` overlap: ``(image rows, image cols, box rows, box cols)``
    slices; None when they do not."""
    row, col, side = box
    h, w = shape
    i0, i1, j0, j1 = max(row, 0), min(row + side, h), max(col, 0), min(col + side, w)
    if i0 >= i1 or j0 >= j1:
        return None
    return slice(i0, i1), slice(j0, j1), slice(i0 - row, i1 - row), slice(j0 - col, j1 - col)


def cut_box(image: np.ndarray, box: Box) -> np.ndarray:
    """The box of an ``(H, W, ...)`` array, zero (black) beyond the image's edge."""
    out = np.zeros((box[2], box[2], *image.shape[2:]), dtype=image.dtype)
    where = overlap(box, image.shape[:2])
    if where is not None:
        ir, ic, br, bc = where
        out[br, bc] = image[ir, ic]
    return out


def crops_in_box(crops, box: Box):
    """Bone crops (``(class, bool crop, row0, col0)``) in the box's own coordinates, cut to the box."""
    row, col, side = box
    out = []
    for c, crop, r0, c0 in crops:
        h, w = crop.shape
        i0, i1, j0, j1 = max(r0, row), min(r0 + h, row + side), max(c0, col), min(c0 + w, col + side)
        if i0 < i1 and j0 < j1:
            out.append((c, crop[i0 - r0 : i1 - r0, j0 - c0 : j1 - c0], i0 - row, j0 - col))
    return out
