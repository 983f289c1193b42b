"""The competition data layer: layout discovery, images, polygon JSON, multi-label masks, handedness.

Layout (FORMAT.md)::

    DIR/DCM/ID001/image1661130828152_R.png       8-bit grayscale PNG
    DIR/outputs_json/ID001/image1661130828152_R.json

A JSON is matched to its PNG by stem; the size always comes from the PNG, never from the JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from handseg.core.constants import (
    ANNOTATION_SUFFIX,
    CLASS_INDEX,
    CLASSES,
    IMAGE_SUFFIX,
    IMAGES_DIR,
    LABELS_DIR,
    NUM_CLASSES,
)
from handseg.core.errors import HandsegError
from handseg.core.rle import EMPTY_RUNS, Runs, crop_to_runs

Polygons = dict[str, np.ndarray]
"""Class name -> ``(N, 2)`` int32 polygon vertices, x = column, y = row."""


@dataclass(frozen=True)
class Sample:
    """One image of the data set (and its label file, where it has one)."""

    patient: str
    """The folder name, e.g. ``ID001``."""
    image_path: Path
    label_path: Path | None = None

    @property
    def stem(self) -> str:
        return self.image_path.stem

    @property
    def name(self) -> str:
        """The basename used in submissions, e.g. ``image1661319116107.png``."""
        return self.image_path.name

    @property
    def rel(self) -> str:
        """Path relative to ``DCM/``, e.g. ``ID040/image1661319116107.png``; submissions sort by it."""
        return f"{self.patient}/{self.image_path.name}"


LabelPolicy = Literal["required", "optional", "ignore"]


def discover(data_dir: str | Path, labels: LabelPolicy = "optional") -> list[Sample]:
    """List the images of a data folder in submission order (sorted by path relative to ``DCM/``).

    Args:
        data_dir: a folder holding ``DCM/`` and, for labelled data, ``outputs_json/``.
        labels: ``required``: every image must have a JSON (and every JSON an image);
            ``optional``: use JSONs where present; ``ignore``: do not look for them.

    Raises:
        HandsegError: the folder or its ``DCM/`` is missing, holds no PNG, or images and labels do
            not match.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HandsegError("data folder not found", data_dir)
    image_root = data_dir / IMAGES_DIR
    if not image_root.is_dir():
        hint = ""
        if (data_dir / "train" / IMAGES_DIR).is_dir():
            hint = f" (did you mean {data_dir / 'train'}?)"
        raise HandsegError(f"no {IMAGES_DIR}/ folder here{hint}", data_dir)
    images = sorted(p for p in image_root.glob(f"*/*{IMAGE_SUFFIX}") if p.is_file())
    if not images:
        raise HandsegError(f"no PNG images under {IMAGES_DIR}/<ID>/", data_dir)
    images.sort(key=lambda p: f"{p.parent.name}/{p.name}")

    label_root = data_dir / LABELS_DIR
    use_labels = labels != "ignore" and (labels == "required" or label_root.is_dir())
    if labels == "required" and not label_root.is_dir():
        raise HandsegError(f"no {LABELS_DIR}/ folder: these images have no labels", data_dir)

    samples = []
    for image in images:
        label = None
        if use_labels:
            candidate = label_root / image.parent.name / (image.stem + ANNOTATION_SUFFIX)
            if candidate.is_file():
                label = candidate
            elif labels == "required":
                raise HandsegError(f"image has no label file (expected {candidate})", image)
        samples.append(Sample(image.parent.name, image, label))

    if use_labels:
        known = {(s.patient, s.stem) for s in samples}
        for label in sorted(label_root.glob(f"*/*{ANNOTATION_SUFFIX}")):
            if (label.parent.name, label.stem) not in known:
                raise HandsegError(f"label file has no matching image under {IMAGES_DIR}/", label)
    return samples


# ----------------------------------------------------------------------------------------------
# images


def read_image(path: str | Path) -> np.ndarray:
    """Read an X-ray as an ``(H, W)`` uint8 array (colour PNGs are converted, 16-bit scaled).

    Raises:
        HandsegError: the file is missing or is not a decodable image.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise HandsegError("image not found", path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise HandsegError("cannot decode image (corrupt or not a PNG)", path)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise HandsegError(f"unsupported pixel type {image.dtype}", path)
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of a PNG read from its header, without decoding the pixels."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        raise HandsegError("image not found", path) from None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        # not a PNG header we can read: decode it to find out (and to fail clearly if corrupt)
        return read_image(path).shape  # type: ignore[return-value]
    width, height = struct.unpack(">II", head[16:24])
    if width == 0 or height == 0:
        raise HandsegError("PNG header gives a zero size", path)
    return height, width


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
        try:
            points = np.asarray(ann.get("points"), dtype=np.float64)
        except (TypeError, ValueError):
            raise HandsegError(f"annotation {i} ({label}) has malformed points", path) from None
        if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 3 or not np.isfinite(points).all():
            raise HandsegError(f"annotation {i} ({label}) needs at least 3 [x, y] points", path)
        polygons[label] = np.rint(points).astype(np.int32)
    if require_all:
        missing = [c for c in CLASSES if c not in polygons]
        if missing:
            raise HandsegError(f"missing classes: {', '.join(missing)}", path)
    return polygons


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


def polygon_crops(polygons: Polygons, shape: tuple[int, int]) -> BoneCrops:
    """Each class's polygon rasterised into its clipped bounding box (see :func:`polygon_crop`)."""
    crops = []
    for name, points in polygons.items():
        placed = polygon_crop(points, shape)
        if placed is not None:
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


def class_masks(polygons: Polygons, shape: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Multi-label masks, each class filled exactly as ``cv2.fillPoly`` fills it in its own channel.

    Args:
        polygons: ``{class: (N, 2) int32}`` as from :func:`read_polygons`.
        shape: ``(H, W)`` of the image.
        out: optional zero-filled ``(29, H, W)`` bool array to fill.

    Returns:
        ``(29, H, W)`` bool; overlapping bones are set in both channels (never argmax).
    """
    return place_crops(polygon_crops(polygons, shape), shape, out)


def class_runs(polygons: Polygons, shape: tuple[int, int]) -> list[Runs]:
    """Per-class runs of the masks of :func:`class_masks`, without building full-size masks."""
    runs = [EMPTY_RUNS] * NUM_CLASSES
    for c, crop, r0, c0 in polygon_crops(polygons, shape):
        runs[c] = crop_to_runs(crop, r0, c0, shape[1])
    return runs


def load_labels(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Decode a labelled sample from PNG + JSON: ``(image (H, W) uint8, masks (29, H, W) bool)``."""
    if sample.label_path is None:
        raise HandsegError("image has no label file", sample.image_path)
    image = read_image(sample.image_path)
    return image, class_masks(read_polygons(sample.label_path), image.shape)


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
