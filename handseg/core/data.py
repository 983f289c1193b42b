"""The competition data layer: layout discovery, images, polygon JSON, multi-label masks, handedness.

Layout (the README's "Data format" section)::

    DIR/DCM/ID001/image1661130828152_R.png       8-bit grayscale PNG
    DIR/outputs_json/ID001/image1661130828152_R.json

A JSON is matched to its PNG by stem; the size always comes from the PNG, never from the JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from handseg.core.constants import (
    ANNOTATION_SUFFIX,
    CLASS_INDEX,
    CLASSES,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    IMAGES_DIR,
    LABELS_DIR,
    NUM_CLASSES,
)
from handseg.core.errors import HandsegError
from handseg.core.rle import EMPTY_RUNS, Runs, crop_to_runs

MAX_COORDINATE = 1_000_000
"""Polygon coordinates beyond this many pixels are refused (they would overflow the rasteriser)."""

Polygons = dict[str, np.ndarray]
"""Class name -> ``(N, 2)`` int32 polygon vertices, x = column, y = row."""


@dataclass(frozen=True)
class Sample:
    """One image of the data set (and its label file, where it has one)."""

    patient: str
    """The person the image belongs to: the first folder under ``DCM/`` (e.g. ``ID001``); folds keep
    a person's images together. An image with no folder is its own person (its stem)."""
    image_path: Path
    label_path: Path | None = None
    rel_dir: str | None = None
    """The image's folder relative to the image root, e.g. ``ID001`` (``""``: the root itself);
    ``None`` means the patient folder."""

    @property
    def stem(self) -> str:
        return self.image_path.stem

    @property
    def name(self) -> str:
        """The basename used in submissions, e.g. ``image1661319116107.png``."""
        return self.image_path.name

    @property
    def folder(self) -> str:
        """The image's folder relative to the image root (``ID040``, ``""`` for a flat folder)."""
        return self.patient if self.rel_dir is None else self.rel_dir

    @property
    def rel(self) -> str:
        """Path relative to ``DCM/`` (or to a plain folder), e.g. ``ID040/image1661319116107.png``;
        submissions sort by it."""
        return f"{self.folder}/{self.image_path.name}" if self.folder else self.image_path.name


LabelPolicy = Literal["required", "optional", "ignore"]
Role = Literal["train", "test", "test_gt"]


@dataclass(frozen=True)
class DataSource:
    """What a ``--data`` argument turned out to be."""

    root: Path
    """The folder the images are read from (holding ``DCM/`` in the competition layout)."""
    layout: Literal["competition", "folder"]
    note: str | None = None
    """Said to the user when ``--data`` was resolved to something other than itself."""


def is_image_file(path: Path) -> bool:
    """An X-ray file by its extension (any case): PNG, JPEG or DICOM."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def resolve_data(data_dir: str | Path, role: Role = "train") -> DataSource:
    """Turn what a user points ``--data`` at into the folder to read: a split holding ``DCM/``, the data
    set's root (``ROOT/train`` for training stages, ``ROOT/test`` for prediction), or, for prediction
    only, any folder of X-rays (PNG, JPEG or DICOM, flat or nested).

    Raises:
        HandsegError: the folder is missing, or holds nothing this role can read.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise HandsegError("data folder not found", data_dir)
    if not data_dir.is_dir():
        raise HandsegError("is a file; --data takes a folder", data_dir)
    if (data_dir / IMAGES_DIR).is_dir():
        return DataSource(data_dir, "competition")
    split = data_dir / role
    if (split / IMAGES_DIR).is_dir():
        return DataSource(split, "competition", f"{data_dir} is a data set's root: using {split} (its {role} split)")
    if role == "test" and any(is_image_file(p) for p in _walk_files(data_dir)):
        return DataSource(data_dir, "folder")
    others = [p for p in ("train", "test", "test_gt") if (data_dir / p / IMAGES_DIR).is_dir()]
    hint = f" (it holds {', '.join(str(data_dir / p) for p in others)})" if others else ""
    what = f"no {IMAGES_DIR}/ folder" + (" and no PNG, JPEG or DICOM images" if role == "test" else "")
    raise HandsegError(f"{what} here{hint}", data_dir)


def _walk_files(root: Path, skipped: list | None = None):
    """Files under ``root`` (symlinks included, dangling ones too), skipping hidden entries (``.DS_Store``,
    macOS ``._x.png`` copies, ``.git``); with ``skipped``, the hidden files are listed there."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if skipped is not None:
            skipped += [Path(dirpath) / d for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name
            elif skipped is not None:
                skipped.append(Path(dirpath) / name)


OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".bmp", ".webp", ".jp2")


def _image_files(root: Path) -> list[Path]:
    """Every image file under ``root``; a broken link with an image name is an error naming it, and
    what is not read (hidden entries, images in formats handseg does not read) is said once."""
    from handseg.core.notices import notice

    images, skipped, other = [], [], []
    for path in _walk_files(root, skipped):
        if not is_image_file(path):
            if path.suffix.lower() in OTHER_IMAGE_EXTENSIONS:
                other.append(path)
            continue
        if not path.exists():
            raise HandsegError("broken link: the image it points to does not exist", path)
        if not path.is_file():
            raise HandsegError("not a regular file", path)
        images.append(path)
    if other:
        kinds = ", ".join(sorted({p.suffix.lower() for p in other}))
        notice(("other-images", str(root)), f"{len(other)} files of {root} are not read ({kinds}; handseg reads PNG, "
                                            f"JPEG and DICOM), e.g. {other[0]}")
    if skipped:
        notice(("hidden", str(root)), f"{len(skipped)} hidden files or folders under {root} are not read, e.g. "
                                      f"{skipped[0]}")
    return images


def discover(data_dir: str | Path, labels: LabelPolicy = "optional", role: Role = "train") -> list[Sample]:
    """List the images of a data folder in submission order (sorted by path relative to ``DCM/``).

    Args:
        data_dir: what ``--data`` points at (see :func:`resolve_data`): a folder holding ``DCM/`` and,
            for labelled data, ``outputs_json/``; a data set's root; or, for ``role="test"``, any
            folder of PNG/JPEG/DICOM X-rays.
        labels: ``required``: every image must have a JSON (and every JSON an image);
            ``optional``: use JSONs where present; ``ignore``: do not look for them.
        role: which split of a data set's root to read (``train``, ``test``, or ``test_gt`` for
            labelled test images).

    Raises:
        HandsegError: the folder holds no images, an image file is a broken link, or images and
            labels do not match.
    """
    source = resolve_data(data_dir, role)
    if source.note:
        from handseg.core.notices import notice

        notice(("data", str(source.root)), source.note)  # which split of a data set's root was read
    data_dir = source.root
    image_root = data_dir / IMAGES_DIR if source.layout == "competition" else data_dir
    images = _image_files(image_root)
    if not images:
        raise HandsegError(f"no PNG, JPEG or DICOM images under {image_root.name}/", data_dir)
    rels = [p.relative_to(image_root) for p in images]

    label_root = data_dir / LABELS_DIR
    use_labels = source.layout == "competition" and labels != "ignore" and (labels == "required"
                                                                            or label_root.is_dir())
    if labels == "required" and not label_root.is_dir():
        raise HandsegError(f"no {LABELS_DIR}/ folder: these images have no labels", data_dir)
    label_files = {}
    if use_labels:
        for label in _walk_files(label_root):
            if label.suffix.lower() == ANNOTATION_SUFFIX:
                key = (label.parent.relative_to(label_root).as_posix(), label.stem)
                label_files[key] = label

    samples, seen = [], {}
    for image, rel in zip(images, rels):
        folder = rel.parent.as_posix()
        folder = "" if folder == "." else folder
        if (folder, image.stem) in seen:
            raise HandsegError(f"two images share the name {image.stem} ({seen[folder, image.stem].name} and "
                               f"{image.name}); labels and caches could not tell them apart", image.parent)
        seen[folder, image.stem] = image
        patient = rel.parts[0] if len(rel.parts) > 1 else image.stem
        label = label_files.pop((folder, image.stem), None) if use_labels else None
        if label is None and labels == "required":
            expected = label_root / folder / (image.stem + ANNOTATION_SUFFIX)
            raise HandsegError(f"image has no label file (expected {expected})", image)
        samples.append(Sample(patient, image, label, folder))
    if label_files:
        orphan = sorted(label_files.values())[0]
        raise HandsegError(f"label file has no matching image under {IMAGES_DIR}/ "
                           f"({len(label_files)} such file(s))", orphan)
    samples.sort(key=lambda s: s.rel)
    return samples


# ----------------------------------------------------------------------------------------------
# images


def max_pixels() -> int:
    """The largest image handseg reads, in pixels: ``HANDSEG_MAX_PIXELS`` (default 8192 x 8192).

    A small file can declare a huge image (a 429 KB PNG of 20000 x 20000); prediction allocates 29
    float maps of the image's size, so such files are refused before anything is decoded."""
    from handseg.core.files import env_limit

    return env_limit("HANDSEG_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def check_image_size(height: int, width: int, path: str | Path) -> None:
    if height <= 0 or width <= 0:
        raise HandsegError(f"image header gives a size of {width} x {height}", path)
    if height * width > max_pixels():
        raise HandsegError(f"image is {width} x {height} pixels, more than the limit of {max_pixels():,} "
                           "(set HANDSEG_MAX_PIXELS to raise it)", path)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"


@dataclass(frozen=True)
class PngHeader:
    height: int
    width: int
    bit_depth: int
    significant_bits: int | None
    """From the ``sBIT`` chunk, when the file declares it (e.g. 12 for a 12-bit X-ray in 16 bits)."""


def read_png_header(data: bytes, path: str | Path, verify: bool = True) -> PngHeader:
    """Parse a PNG's chunks: size, bit depth, declared significant bits; with ``verify`` every chunk's
    CRC is checked and the file must end with ``IEND``, so a corrupt or truncated file is reported
    here in one line (instead of by the decoder's own messages on stderr)."""
    if data[:8] != _PNG_SIGNATURE:
        raise HandsegError("not a PNG file", path)
    pos, header, sbit, ended = 8, None, None, False
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            break
        body = data[pos + 8 : pos + 8 + length]
        if verify and zlib.crc32(kind + body) != int.from_bytes(data[end - 4 : end], "big"):
            raise HandsegError(f"corrupt PNG: the {kind.decode('latin-1')} chunk fails its checksum", path)
        if kind == b"IHDR":
            if length < 13:
                break
            width, height = struct.unpack(">II", body[:8])
            header = (height, width, body[8])
            if not verify:
                break
        elif kind == b"sBIT" and length >= 1:
            sbit = body[0]
        elif kind == b"IEND":
            ended = True
            break
        pos = end
    if header is None:
        raise HandsegError("corrupt PNG: no image header", path)
    if verify and not ended:
        raise HandsegError("truncated PNG: the file ends before its last chunk", path)
    check_image_size(header[0], header[1], path)
    return PngHeader(header[0], header[1], header[2], sbit)


def _jpeg_size(data: bytes, path: str | Path) -> tuple[int, int]:
    """``(H, W)`` from a JPEG's start-of-frame marker; the file must end with its end-of-image marker."""
    if b"\xff\xd9" not in data[-64:]:
        raise HandsegError("truncated JPEG: no end-of-image marker", path)
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            pos += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            check_image_size(height, width, path)
            return height, width
        pos += 2 + length
    raise HandsegError("corrupt JPEG: no frame header", path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise HandsegError("broken link: the image it points to does not exist", path) from None
        raise HandsegError("image not found", path) from None
    except IsADirectoryError:
        raise HandsegError("is a folder, not an image", path) from None
    except OSError as e:
        raise HandsegError(f"cannot read image ({e.strerror or e})", path) from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an X-ray as an ``(H, W)`` uint8 array.

    PNG (8 or 16 bits, grey or colour), JPEG, and DICOM (see :mod:`handseg.core.dicom`). Colour is
    converted to grey. A 16-bit image is
    scaled by its depth: the ``sBIT`` bits it declares, else the smallest of 8, 10, 12, 14 or 16 bits
    that holds its largest value (a 12-bit X-ray, 0..4095, becomes 0..255; ``>> 8`` would make it
    black); this is said once per run.

    Raises:
        HandsegError: the file is missing, a broken link, larger than :func:`max_pixels`, corrupt
            or truncated, or not a PNG/JPEG/DICOM (or DICOM without the ``dicom`` extra).
    """
    import cv2

    from handseg.core.dicom import is_dicom, read_dicom

    path = Path(path)
    data = _read_bytes(path)
    png = None
    if data[:8] == _PNG_SIGNATURE:
        png = read_png_header(data, path)
    elif data[:2] == _JPEG_SOI:
        _jpeg_size(data, path)
    elif is_dicom(data, path):
        return read_dicom(data, path)
    else:
        raise HandsegError("not a PNG, JPEG or DICOM image", path)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise HandsegError("cannot decode image (corrupt file)", path)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = _from_16_bit(image, png.significant_bits if png is not None else None, path)
    elif image.dtype != np.uint8:
        raise HandsegError(f"unsupported pixel type {image.dtype}", path)
    return image


def _from_16_bit(image: np.ndarray, significant_bits: int | None, path: Path) -> np.ndarray:
    from handseg.core.notices import notice

    top = int(image.max())
    if significant_bits and 8 <= significant_bits <= 16 and top < 2**significant_bits:
        bits, why = significant_bits, "declared"
    else:
        bits = next(b for b in (8, 10, 12, 14, 16) if top < 2**b)
        why = f"largest value {top}"
    scale = 255.0 / (2**bits - 1)
    notice(("16-bit", bits), f"16-bit images are scaled to 8 bits by their depth: {path.name} read as {bits}-bit "
                             f"({why}), values x {scale:.5g}")
    return np.rint(image.astype(np.float32) * scale).astype(np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image read from its header, without decoding the pixels (or checking the
    rest of the file: :func:`read_image` does that)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except FileNotFoundError:
        if path.is_symlink():
            raise HandsegError("broken link: the image it points to does not exist", path) from None
        raise HandsegError("image not found", path) from None
    if head[:8] == _PNG_SIGNATURE:
        header = read_png_header(head, path, verify=False)
        return header.height, header.width
    from handseg.core.dicom import dicom_size, is_dicom

    if is_dicom(head, path):
        return dicom_size(path)
    return read_image(path).shape  # type: ignore[return-value]


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The one resize of an X-ray to a model's input size, in training and in prediction alike:
    ``(H, W)`` uint8 -> ``(h, w)`` uint8 with area averaging (OpenCV ``INTER_AREA``, which interpolates
    bilinearly when enlarging)."""
    import cv2

    h, w = hw
    if image.shape == (h, w):
        return image
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_AREA)


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
