"""Full-resolution overlays of one image at a time, written as files beside a report's ``index.html``.

For each image and each mask source (ground truth, a CSV) a report holds:

- ``overlays/<prefix>_<key>.png``: the 29 masks in their class colours at the image's full size,
  RGBA, transparent where no bone is (the page lays it over the X-ray with an opacity control);
- ``overlays/<prefix>_<key>_classes.png``: a sprite of the same masks, one bounding-box crop per
  class, so the page can show one bone at a time (CSS background crops: a browser cannot read the
  pixels of a local image, so the page never decodes masks itself);
- for a source compared with a reference, ``<prefix>_<key>_diff.png`` and ``<prefix>_<key>_diff_classes.png``:
  white where both agree, red where only the reference has the class (missed), green where only the
  compared source has it (extra), yellow where a pixel is missed for one class and extra for
  another (a bone found but labelled as another).

The X-rays themselves are not copied: the page links to them in the data folder (a copy would
double the data on disk, about 250 MB of JPEGs for 288 images at 2048 px, and spread patient
images further).

Masks are decoded one image at a time, class by class, into one reusable full-size buffer (see
:meth:`OverlayWriter.decode`), and only each bone's bounding box is touched afterwards, so a report
of 288 images at 2048 px holds one image's masks at a time (and the few overlays still being encoded).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from handseg.common.constants import NUM_CLASSES
from handseg.common.threads import budget as thread_budget
from handseg.data.labels import polygon_crops
from handseg.formats.files import safe_name
from handseg.formats.rle import Runs, runs_to_mask

OVERLAYS_DIR = "overlays"

# 29 colours picked greedily for the largest CIELAB distance from each other (minimum delta-E 28),
# light enough to read on an X-ray; tab20 repeats after 20 classes (Radius and Ulna shared a colour).
CLASS_COLOURS: np.ndarray = np.array([
    (0xD8, 0x00, 0x48), (0x00, 0xFF, 0x00), (0x00, 0xDD, 0xFF), (0x59, 0x4D, 0xFF), (0xFF, 0xD0, 0x4D),
    (0x36, 0xB2, 0x5F), (0xFF, 0x00, 0xCC), (0x62, 0x68, 0xB2), (0xFF, 0x66, 0x00), (0xFF, 0xA4, 0x8D),
    (0xFF, 0x8D, 0xD1), (0x9E, 0xD8, 0x00), (0x00, 0xFF, 0xDD), (0xCC, 0x00, 0xFF), (0xA7, 0xB2, 0x62),
    (0xB2, 0x6B, 0x00), (0x4D, 0xFF, 0x7C), (0x00, 0x77, 0xFF), (0xC2, 0x8D, 0xFF), (0xB2, 0x36, 0xA1),
    (0x00, 0xAA, 0xFF), (0x36, 0xB2, 0xA1), (0xFF, 0x00, 0x22), (0xB2, 0x62, 0x7D), (0xB2, 0x4F, 0x36),
    (0x18, 0xB2, 0x00), (0xFF, 0x00, 0x88), (0xFF, 0xD1, 0x8D), (0xA6, 0x41, 0xD8),
], dtype=np.uint8)
"""``(29, 3)`` uint8 RGB, one colour per class in competition order."""

DIFF_COLOURS: dict[str, tuple[int, int, int]] = {
    "agree": (255, 255, 255), "missed": (255, 40, 40), "extra": (40, 220, 40), "confused": (255, 210, 0)}
"""RGB of the difference overlays (see the module docstring)."""

# per-pixel difference flags: bit 0 agree, bit 1 missed (reference only), bit 2 extra (compared only)
AGREE, MISSED, EXTRA = 1, 2, 4


def _diff_lut() -> np.ndarray:
    """``(8, 4)`` uint8 BGRA colour of each combination of difference flags (0 is transparent)."""
    lut = np.zeros((8, 4), np.uint8)
    for flags in range(1, 8):
        missed, extra = bool(flags & MISSED), bool(flags & EXTRA)
        name = "confused" if missed and extra else "missed" if missed else "extra" if extra else "agree"
        r, g, b = DIFF_COLOURS[name]
        lut[flags] = (b, g, r, 255)
    return lut


DIFF_LUT = _diff_lut()

ClassCrop = tuple[np.ndarray, int, int]
"""One class mask as ``(crop (h, w), row0, col0)``: its bounding box and where that box lies."""
ClassCrops = list[ClassCrop | None]
"""The 29 class masks of one image as bounding-box crops (``None``: the class is empty)."""


def _png_params() -> list[int]:
    import cv2

    # level 1 and no row filters: masks are flat colour on transparent, where filters buy nothing and
    # cost three quarters of the time (a 2048 px RGBA mask: 27 ms and about 110 KB, against 108 ms)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    return params


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W)``, ``(H, W, 3)`` BGR or ``(H, W, 4)`` BGRA uint8 array, encoded for speed."""
    import cv2

    ok, data = cv2.imencode(".png", image, _png_params())
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {image.shape}")
    return data.tobytes()


def runs_box(runs: Runs, width: int) -> tuple[int, int, int, int]:
    """Bounding box ``(row0, row1, col0, col1)`` (ends exclusive) of non-empty runs in an image ``width`` wide.

    A run that wraps from one row into the next gives the full width.
    """
    starts, lengths = runs
    ends = starts + lengths
    row_s = starts // width
    row_e = (ends - 1) // width
    r0, r1 = int(row_s[0]), int(row_e[-1]) + 1
    if (row_s != row_e).any():
        return r0, r1, 0, width
    col_s = starts - row_s * width
    return r0, r1, int(col_s.min()), int((col_s + lengths).max())


def crops_from_polygons(polygons: dict[str, np.ndarray], shape: tuple[int, int], source=None) -> ClassCrops:
    """The 29 class crops of an image's polygons (each filled as ``cv2.fillPoly`` fills it; a polygon
    with no pixel in the image is an error naming ``source``, the label file)."""
    crops: ClassCrops = [None] * NUM_CLASSES
    for c, crop, r0, c0 in polygon_crops(polygons, shape, source):
        if crop.any():
            crops[c] = (crop, r0, c0)
    return crops


def _union(a: ClassCrop | None, b: ClassCrop | None) -> tuple[int, int, int, int]:
    boxes = [(r0, r0 + crop.shape[0], c0, c0 + crop.shape[1]) for crop, r0, c0 in (x for x in (a, b) if x is not None)]
    return min(x[0] for x in boxes), max(x[1] for x in boxes), min(x[2] for x in boxes), max(x[3] for x in boxes)


def _placed(item: ClassCrop | None, box: tuple[int, int, int, int]) -> np.ndarray:
    """A crop placed into the (larger) box ``(row0, row1, col0, col1)``, as a bool array of the box's size."""
    r0, r1, c0, c1 = box
    out = np.zeros((r1 - r0, c1 - c0), np.bool_)
    if item is not None:
        crop, cr, cc = item
        out[cr - r0 : cr - r0 + crop.shape[0], cc - c0 : cc - c0 + crop.shape[1]] = crop
    return out


def diff_codes(ref: ClassCrop | None, pred: ClassCrop | None) -> tuple[np.ndarray, int, int] | None:
    """One class compared: ``(codes (h, w) uint8, row0, col0)`` over the union of both boxes, each pixel
    ``AGREE``, ``MISSED`` (reference only), ``EXTRA`` (compared only) or 0; ``None`` when both are empty."""
    if ref is None and pred is None:
        return None
    box = _union(ref, pred)
    a, b = _placed(ref, box), _placed(pred, box)
    codes = (a & b).view(np.uint8) * np.uint8(AGREE)
    codes |= (a & ~b).view(np.uint8) * np.uint8(MISSED)
    codes |= (b & ~a).view(np.uint8) * np.uint8(EXTRA)
    return codes, box[0], box[2]


def pack_shelves(sizes: list[tuple[int, int] | None]) -> tuple[list[tuple[int, int] | None], int, int]:
    """Pack ``(h, w)`` rectangles onto shelves, tallest first, in a sheet about as wide as it is high.

    Returns:
        Each rectangle's ``(x, y)`` (``None`` for ``None``) and the sheet's ``(height, width)``.
    """
    present = [i for i, s in enumerate(sizes) if s is not None]
    positions: list[tuple[int, int] | None] = [None] * len(sizes)
    if not present:
        return positions, 0, 0
    area = sum(sizes[i][0] * sizes[i][1] for i in present)
    # a near-square sheet: a 2048 px image's bones fill about two thirds of it instead of a quarter
    # of one image-wide strip, which halves the bytes to encode
    width = max(max(sizes[i][1] for i in present), int(np.ceil(np.sqrt(area * 1.2))))
    x = y = shelf = sheet_w = 0
    for i in sorted(present, key=lambda i: -sizes[i][0]):
        h, w = sizes[i]
        if x > 0 and x + w > width:
            x, y, shelf = 0, y + shelf, 0
        positions[i] = (x, y)
        x += w
        shelf = max(shelf, h)
        sheet_w = max(sheet_w, x)
    return positions, y + shelf, sheet_w


def thumbnail(image: np.ndarray | None, rgba: np.ndarray, width: int, alpha: float, dim: float = 1.0) -> np.ndarray:
    """An RGB thumbnail ``width`` wide of an X-ray with a full-size BGRA overlay blended at ``alpha``.

    Args:
        image: ``(H, W)`` uint8 X-ray, or ``None`` for a black background.
        rgba: ``(H, W, 4)`` uint8 BGRA overlay whose colour is 0 wherever its alpha is 0.
        width: thumbnail width; the height keeps the aspect ratio.
        alpha: opacity of the overlay; ``dim`` scales the X-ray.

    Returns:
        ``(h, width, 3)`` uint8 RGB.
    """
    import cv2

    h, w = rgba.shape[:2]
    size = (width, max(1, round(h * width / w)))
    # area averaging of a colour that is zero where transparent gives premultiplied colour, so this
    # equals blending at full size and shrinking afterwards
    over = cv2.resize(rgba, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    cover = over[..., 3:] / 255.0 * alpha
    base = (np.zeros((size[1], size[0]), np.float32) if image is None
            else cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32) * dim)
    out = base[..., None] * (1.0 - cover) + over[..., :3] * alpha
    return np.clip(out, 0, 255).astype(np.uint8)[..., ::-1].copy()


def _packed(bgra: np.ndarray) -> np.ndarray:
    """``(K, 4)`` uint8 BGRA colours as ``(K,)`` uint32 with the same bytes: one store paints a pixel."""
    return np.ascontiguousarray(bgra, dtype=np.uint8).view(np.uint32).reshape(-1)


DIFF_LUT32 = _packed(DIFF_LUT)


class OverlayWriter:
    """Writes the overlay files of one image at a time into ``folder/overlays/``.

    Masks are decoded through one reusable full-size bool buffer and kept as bounding-box crops.
    PNG encoding (most of the time) runs in a few threads (OpenCV releases the GIL), at most a
    bounded number of files behind the caller, so memory stays at a few full-size images. Use it
    as a context manager, or call :meth:`close`: that waits for every file and raises the first
    encoding or write error.

    Example:
        >>> with OverlayWriter(report_folder) as writer:
        ...     truth = writer.decode(gt_runs, (2048, 1800))             # 29 crops, from runs
        ...     layer = writer.masks("ID001_image1", "gt", truth, (2048, 1800))[0]
        ...     pred = writer.decode(pred_runs, (2048, 1800))
        ...     diff = writer.diff("ID001_image1", "csv1", truth, pred, (2048, 1800))[0]
    """

    def __init__(self, folder: str | Path, colours: np.ndarray = CLASS_COLOURS, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.folder = Path(folder)
        (self.folder / OVERLAYS_DIR).mkdir(parents=True, exist_ok=True)
        bgra = np.concatenate([colours[:, ::-1], np.full((len(colours), 1), 255, np.uint8)], axis=1)
        self._colour32 = _packed(bgra)
        self._mask = np.zeros((0, 0), np.bool_)
        self._flags = np.zeros((0, 0), np.uint8)
        self._used: set[str] = set()
        workers = workers or max(1, min(8, thread_budget()[0] - 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="handseg-overlay")
        self._pending: deque = deque()
        self._max_pending = 2 * workers

    def __enter__(self) -> OverlayWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # failing anyway: drop what is queued, wait for what runs, raise the original error
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)

    def close(self) -> None:
        """Wait until every file is written; raises the first error of an encoding or a write."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def prefix(self, patient: str, stem: str) -> str:
        """A unique file-name prefix for one image, e.g. ``ID001_image1661130828152_R``."""
        base = safe_name(f"{patient}_{stem}", "image")
        name, n = base, 1
        while name in self._used:
            n += 1
            name = f"{base}_{n}"
        self._used.add(name)
        return name

    def _write(self, name: str, image: np.ndarray) -> str:
        """Queue ``image`` (which the caller no longer changes) to be encoded and written; returns its path."""
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(_encode_to, self.folder / OVERLAYS_DIR / name, image))
        return f"{OVERLAYS_DIR}/{name}"

    def decode(self, runs: list[Runs], shape: tuple[int, int]) -> ClassCrops:
        """Decode an image's 29 run sets into bounding-box crops, through the reusable full-size buffer.

        Args:
            runs: 29 ``(starts, lengths)`` pairs (checked to fit ``shape`` beforehand).
            shape: ``(H, W)`` of the image.
        """
        if self._mask.shape != shape:
            self._mask = np.zeros(shape, np.bool_)
        crops: ClassCrops = [None] * NUM_CLASSES
        for c, r in enumerate(runs):
            if r[0].size == 0:
                continue
            runs_to_mask(r, shape, self._mask)
            r0, r1, c0, c1 = runs_box(r, shape[1])
            crops[c] = (self._mask[r0:r1, c0:c1].copy(), r0, c0)
            self._mask[r0:r1, c0:c1] = False
        return crops

    def _sprite(self, name: str, items: list[tuple[np.ndarray, int, int, np.ndarray] | None]) -> dict:
        """Write a sheet of per-class crops; ``items[c]`` is ``(codes (h, w) uint8, row0, col0, lut32)``
        painted through ``lut32`` (packed BGRA per code). Returns ``{"sprite", "boxes"}``, ``boxes[c]``
        being ``[x, y, w, h, sprite_x, sprite_y]`` or ``None``."""
        positions, sheet_h, sheet_w = pack_shelves([None if it is None else it[0].shape for it in items])
        sheet = np.zeros((max(sheet_h, 1), max(sheet_w, 1), 4), np.uint8)
        sheet32 = sheet.view(np.uint32)[..., 0]
        boxes: list[list[int] | None] = []
        for item, pos in zip(items, positions):
            if item is None:
                boxes.append(None)
                continue
            codes, r0, c0, lut32 = item
            h, w = codes.shape
            sheet32[pos[1] : pos[1] + h, pos[0] : pos[0] + w] = lut32[codes]
            boxes.append([c0, r0, w, h, pos[0], pos[1]])
        return {"sprite": self._write(name, sheet), "boxes": boxes}

    def masks(self, prefix: str, key: str, crops: ClassCrops, shape: tuple[int, int],
              thumb_of: np.ndarray | None = None, thumb_width: int = 0) -> tuple[dict, np.ndarray | None]:
        """Write one source's class-coloured masks: the full-size PNG and the per-class sprite.

        Args:
            prefix: from :meth:`prefix`; key: the source (``gt``, ``csv1``, ...).
            crops: the 29 class crops; shape: ``(H, W)``.
            thumb_of: with ``thumb_width``, also return a thumbnail over this ``(H, W)`` X-ray.

        Returns:
            ``({"full", "sprite", "boxes"}, RGB thumbnail or None)``.
        """
        rgba = np.zeros((*shape, 4), np.uint8)  # a new one per file: the encoder thread owns it
        rgba32 = rgba.view(np.uint32)[..., 0]
        for c, item in enumerate(crops):
            if item is not None:
                crop, r0, c0 = item
                rgba32[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]][crop] = self._colour32[c]
        thumb = thumbnail(thumb_of, rgba, thumb_width, alpha=0.5) if thumb_width else None
        layer = {"full": self._write(f"{prefix}_{key}.png", rgba)}
        items = [None if it is None else (it[0].view(np.uint8), it[1], it[2],
                                          np.array([0, self._colour32[c]], np.uint32)) for c, it in enumerate(crops)]
        layer.update(self._sprite(f"{prefix}_{key}_classes.png", items))
        return layer, thumb

    def diff(self, prefix: str, key: str, ref: ClassCrops, pred: ClassCrops, shape: tuple[int, int],
             thumb_of: np.ndarray | None = None, thumb_width: int = 0) -> tuple[dict, np.ndarray | None]:
        """Write one source's differences from the reference, class by class (see the module docstring).

        Returns:
            ``({"full", "sprite", "boxes"}, RGB thumbnail or None)``; the thumbnail shows the
            differences opaque over the dimmed X-ray.
        """
        if self._flags.shape != shape:
            self._flags = np.zeros(shape, np.uint8)
        flags = self._flags
        rgba = np.zeros((*shape, 4), np.uint8)
        items: list[tuple[np.ndarray, int, int, np.ndarray] | None] = []
        painted = []
        for a, b in zip(ref, pred):
            placed = diff_codes(a, b)
            if placed is None:
                items.append(None)
                continue
            codes, r0, c0 = placed
            box = (r0, r0 + codes.shape[0], c0, c0 + codes.shape[1])
            flags[box[0] : box[1], box[2] : box[3]] |= codes
            painted.append(box)
            items.append((codes, r0, c0, DIFF_LUT32))
        if painted:
            r0, r1 = min(b[0] for b in painted), max(b[1] for b in painted)
            c0, c1 = min(b[2] for b in painted), max(b[3] for b in painted)
            rgba.view(np.uint32)[r0:r1, c0:c1, 0] = DIFF_LUT32[flags[r0:r1, c0:c1]]
            flags[r0:r1, c0:c1] = 0
        thumb = thumbnail(thumb_of, rgba, thumb_width, alpha=1.0, dim=0.6) if thumb_width else None
        layer = {"full": self._write(f"{prefix}_{key}_diff.png", rgba)}
        layer.update(self._sprite(f"{prefix}_{key}_diff_classes.png", items))
        return layer, thumb


def _encode_to(path: Path, image: np.ndarray) -> None:
    path.write_bytes(encode_png(image))


def diff_overlay(image: np.ndarray | None, a: np.ndarray, b: np.ndarray, width: int = 280) -> np.ndarray:
    """RGB thumbnail comparing ``(C, H, W)`` bool masks ``a`` (reference) and ``b`` class by class, on
    the X-ray: white where both give a pixel the same classes, red where A has a class B lacks
    (missed), green where B has a class A lacks (extra), yellow where both happen."""
    flags = ((a & b).any(axis=0).view(np.uint8) * np.uint8(AGREE)
             | (a & ~b).any(axis=0).view(np.uint8) * np.uint8(MISSED)
             | (b & ~a).any(axis=0).view(np.uint8) * np.uint8(EXTRA))
    return thumbnail(image, DIFF_LUT[flags], width, alpha=1.0, dim=0.6)
