"""Anatomy from labels or masks: which hand (left or right) and the wrist's bend."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from handseg.common.constants import (
    CLASSES,
)
from handseg.data.labels import BoneCrops, Polygons

# ----------------------------------------------------------------------------------------------
# geometry: handedness and wrist bend

Side = Literal["right", "left"]


def _centroids_from_polygons(polygons: Polygons) -> dict[str, np.ndarray]:
    return {name: pts.astype(np.float64).mean(axis=0) for name, pts in polygons.items()}


def _centroids_from_masks(masks: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for c, name in enumerate(CLASSES):
        ys, xs = np.nonzero(masks[c])
        if xs.size:
            out[name] = np.array([xs.mean(), ys.mean()])
    return out


def _centroids_from_crops(crops: BoneCrops) -> dict[str, np.ndarray]:
    out = {}
    for c, crop, r0, c0 in crops:
        n = np.count_nonzero(crop)
        if n:
            xs = crop.sum(axis=0, dtype=np.int64) @ np.arange(crop.shape[1])
            ys = crop.sum(axis=1, dtype=np.int64) @ np.arange(crop.shape[0])
            out[CLASSES[c]] = np.array([c0 + xs / n, r0 + ys / n])
    return out


def hand_side(polygons: Polygons | None = None, masks: np.ndarray | None = None,
              crops: BoneCrops | None = None) -> Side | None:
    """Which hand an image shows, by geometry: in this PA view the thumb tip (finger-1) of a right
    hand lies left of the little-finger tip (finger-16). ``None`` if either bone is absent.

    Give ``polygons``, ``masks`` (``(29, H, W)`` bool, e.g. a prediction) or bone ``crops``
    (``(class, bool crop, row0, col0)``, as the prep cache holds them).
    """
    if polygons is not None:
        cents = _centroids_from_polygons(polygons)
    elif crops is not None:
        cents = _centroids_from_crops(crops)
    else:
        cents = _centroids_from_masks(masks)
    if "finger-1" not in cents or "finger-16" not in cents:
        return None
    return side_of(cents["finger-1"][0], cents["finger-16"][0])


def side_of(thumb_x: float, little_x: float) -> Side:
    """The rule of :func:`hand_side`, from the x centroids of finger-1 and finger-16."""
    return "right" if thumb_x < little_x else "left"


def _principal_axis(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[0]


def wrist_bend(polygons: Polygons) -> float:
    """Estimated in-plane wrist bend in degrees: the angle between the radius's long axis and the
    line from the capitate to the middle-finger metacarpal (finger-11). 0 is a straight wrist;
    positive is towards the little finger (ulnar deviation) for either hand.
    """
    needed = ("Radius", "Capitate", "finger-11")
    if any(n not in polygons for n in needed):
        raise ValueError("wrist_bend needs Radius, Capitate and finger-11")
    radius = polygons["Radius"].astype(np.float64)
    cents = _centroids_from_polygons({n: polygons[n] for n in needed})
    axis = _principal_axis(radius)
    towards_wrist = cents["Capitate"] - cents["Radius"]
    if axis @ towards_wrist < 0:
        axis = -axis
    hand_dir = cents["finger-11"] - cents["Capitate"]
    # image y points down; the cross product's sign says clockwise (towards image right) or not
    angle = math.degrees(math.atan2(axis[0] * hand_dir[1] - axis[1] * hand_dir[0], axis @ hand_dir))
    side = hand_side(polygons)
    # for a right hand the little finger is on the image right, i.e. a clockwise turn
    return angle if side != "left" else -angle
