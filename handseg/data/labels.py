"""Polygon JSON labels: reading, per-class crops and multi-label masks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from handseg.common.constants import (
    CLASS_INDEX,
    CLASSES,
    NUM_CLASSES,
)
from handseg.common.errors import JSON_TOO_DEEP, HandsegError
from handseg.data.images import read_image
from handseg.data.layout import Sample
from handseg.formats.rle import EMPTY_RUNS, Runs, crop_to_runs

MAX_COORDINATE = 1_000_000
"""Polygon coordinates beyond this many pixels are refused (they would overflow the rasteriser)."""

Polygons = dict[str, np.ndarray]
"""Class name -> ``(N, 2)`` int32 polygon vertices, x = column, y = row."""


# ----------------------------------------------------------------------------------------------
# annotations


def read_polygons(path: str | Path, require_all: bool = True) -> Polygons:
    """Read one annotation JSON into ``{class: (N, 2) int32 points}``, strictly.

    Raises:
        HandsegError: the file is not valid JSON, has no ``annotations`` list, an annotation has an
            unknown class, malformed points or a duplicate class, or (with ``require_all``) a class
            is missing.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise HandsegError("label file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HandsegError(f"not valid JSON ({e})", path) from None
    except RecursionError:
        raise HandsegError(JSON_TOO_DEEP, path) from None
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, list):
        raise HandsegError('no "annotations" list', path)
    polygons: Polygons = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise HandsegError(f"annotation {i} is not an object", path)
        label = ann.get("label")
        if label not in CLASS_INDEX:
            raise HandsegError(f"annotation {i} has unknown class {label!r}", path)
        if label in polygons:
            raise HandsegError(f"class {label} is annotated twice", path)
        raw = ann.get("points")
        odd = _not_a_point(raw)
        if odd is not None:  # booleans and strings would pass as numbers through numpy
            raise HandsegError(f"annotation {i} ({label}) has malformed points: {odd}", path)
        try:
            points = np.asarray(raw, dtype=np.float64).reshape(-1, 2)
        except OverflowError:  # an integer beyond any float: out of range like any huge coordinate
            points = np.full((max(len(raw), 1), 2), np.inf)
        if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 3:
            raise HandsegError(f"annotation {i} ({label}) needs at least 3 [x, y] points", path)
        if not np.isfinite(points).all() or np.abs(points).max() > MAX_COORDINATE:
            bad = points[~(np.isfinite(points) & (np.abs(points) <= MAX_COORDINATE))][0]
            raise HandsegError(f"annotation {i} ({label}) has a coordinate out of range ({float(bad):g}; the limit is "
                               f"{MAX_COORDINATE:,} pixels)", path)
        polygons[label] = np.rint(points).astype(np.int32)
    if require_all:
        missing = [c for c in CLASSES if c not in polygons]
        if missing:
            raise HandsegError(f"missing classes: {', '.join(missing)}", path)
    return polygons


def _not_a_point(raw) -> str | None:
    """What is wrong with an annotation's ``points`` (a list of ``[x, y]`` numbers), or None."""
    if not isinstance(raw, list):
        return f"expected a list of [x, y], got {type(raw).__name__}"
    for p in raw:
        if not (isinstance(p, list) and len(p) == 2):
            return f"{p!r:.40} is not an [x, y] pair"
        for v in p:
            if isinstance(v, bool) or not isinstance(v, int | float):
                return f"{v!r:.40} is not a number"
    return None


def polygon_document(polygons: Polygons, filename: str, parent_path: str, meta_size: int = 3060) -> dict:
    """An annotation JSON document in the competition's layout (``filename`` and ``metadata`` as
    the real files carry them: they disagree with the PNG, and readers ignore them)."""
    annotations = [
        {"id": hashlib.md5(f"{filename}/{name}".encode()).hexdigest()[:24], "type": "poly_seg", "attributes": {},
         "points": polygons[name].tolist(), "label": name}
        for name in CLASSES if name in polygons
    ]
    return {"annotations": annotations, "attributes": {}, "file_id": filename.rsplit(".", 1)[0],
            "filename": filename, "parent_path": parent_path, "last_modifier_id": "handseg",
            "metadata": {"height": meta_size, "width": meta_size}, "last_workers": {}}


# ----------------------------------------------------------------------------------------------
# masks


def polygon_crop(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
    """Rasterise one polygon into its clipped bounding box: ``(crop uint8, row0, col0)``.

    ``cv2.fillPoly`` with integer vertices is translation invariant, so the crop equals the
    corresponding part of a full-size ``fillPoly``.
    """
    import cv2

    height, width = shape
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    c0, r0 = max(int(x0), 0), max(int(y0), 0)
    c1, r1 = min(int(x1) + 1, width), min(int(y1) + 1, height)
    if c1 <= c0 or r1 <= r0:
        return None
    crop = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
    cv2.fillPoly(crop, [(points - np.array([c0, r0], dtype=np.int32)).reshape(-1, 1, 2)], 1)
    return crop, r0, c0


BoneCrops = list[tuple[int, np.ndarray, int, int]]
"""The bones of one image as ``(class index, (h, w) bool bounding-box crop, row0, col0)``: what
the prep cache stores, and what masks, runs and training samples are made from."""


def polygon_crops(polygons: Polygons, shape: tuple[int, int], source: str | Path | None = None) -> BoneCrops:
    """Each class's polygon rasterised into its clipped bounding box (see :func:`polygon_crop`).

    Raises:
        HandsegError: a polygon has no pixel inside the ``(H, W)`` image (it lies outside it, or
            is degenerate); the message names ``source`` (the label file) and the class.
    """
    crops = []
    for name, points in polygons.items():
        placed = polygon_crop(points, shape)
        if placed is None or not placed[0].any():
            where = "lies outside" if placed is None else "covers no pixel of"
            raise HandsegError(f"class {name}: the polygon {where} the {shape[1]} x {shape[0]} image", source)
        crop, r0, c0 = placed
        crops.append((CLASS_INDEX[name], crop.view(np.bool_), r0, c0))
    return crops


def place_crops(crops: BoneCrops, shape: tuple[int, int], out: np.ndarray | None = None,
                channels: int = NUM_CLASSES) -> np.ndarray:
    """Bone crops onto full-size ``(channels, H, W)`` bool masks (``out``: zero-filled, optional)."""
    if out is None:
        out = np.zeros((channels, *shape), dtype=np.bool_)
    for c, crop, r0, c0 in crops:
        out[c, r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] |= crop
    return out


def class_masks(polygons: Polygons, shape: tuple[int, int], out: np.ndarray | None = None,
                source: str | Path | None = None) -> np.ndarray:
    """Multi-label masks, each class filled exactly as ``cv2.fillPoly`` fills it in its own channel.

    Args:
        polygons: ``{class: (N, 2) int32}`` as from :func:`read_polygons`.
        shape: ``(H, W)`` of the image.
        out: optional zero-filled ``(29, H, W)`` bool array to fill.

    Returns:
        ``(29, H, W)`` bool; overlapping bones are set in both channels (never argmax).
    """
    return place_crops(polygon_crops(polygons, shape, source), shape, out)


def class_runs(polygons: Polygons, shape: tuple[int, int], source: str | Path | None = None) -> list[Runs]:
    """Per-class runs of the masks of :func:`class_masks`, without building full-size masks."""
    runs = [EMPTY_RUNS] * NUM_CLASSES
    for c, crop, r0, c0 in polygon_crops(polygons, shape, source):
        runs[c] = crop_to_runs(crop, r0, c0, shape[1])
    return runs


def load_labels(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Decode a labelled sample from PNG + JSON: ``(image (H, W) uint8, masks (29, H, W) bool)``."""
    if sample.label_path is None:
        raise HandsegError("image has no label file", sample.image_path)
    image = read_image(sample.image_path)
    return image, class_masks(read_polygons(sample.label_path), image.shape, source=sample.label_path)
