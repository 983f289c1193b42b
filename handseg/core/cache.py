"""The prep cache: images as raw ``.npy`` and multi-label masks as packed per-bone crops.

Layout::

    CACHE/images/ID001/image1661130828152_R.npy    (H, W) uint8, memory-mappable
    CACHE/images/manifest.json
    CACHE/masks/ID001/image1661130828152_R.npy     packed masks (see below)
    CACHE/masks/manifest.json

A packed mask file is a 1-D uint8 ``.npy``: an int64 header ``[magic, version, C, H, W]`` followed
by ``C`` records ``[row0, col0, height, width, offset]``, then each class's bounding-box crop packed
8 pixels a byte along rows (``np.packbits(axis=1)``). A 2048 px sample is about 1-2 MB instead of
116 MB of bool, and unpacking touches only the bones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.core.constants import CLASS_INDEX, NUM_CLASSES
from handseg.core.data import Polygons, Sample, _polygon_crop, discover, read_image, read_polygons
from handseg.core.errors import HandsegError
from handseg.core.files import atomic_open

MAGIC = 0x48534D4B  # "HSMK"
VERSION = 1
_HEADER = 5
_RECORD = 5
IMAGES = "images"
MASKS = "masks"


def pack_polygons(polygons: Polygons, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons (as :func:`handseg.core.data.class_masks` does) straight into the packed form."""
    crops: list[tuple[int, np.ndarray, int, int, int]] = []
    for name, points in polygons.items():
        placed = _polygon_crop(points, shape)
        if placed is not None:
            crop, r0, c0 = placed
            crops.append((CLASS_INDEX[name], crop, r0, c0, crop.shape[1]))
    return _pack(crops, shape)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Pack a ``(C, H, W)`` bool stack into the cache's 1-D uint8 form."""
    crops = []
    for c, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size:
            cols = np.flatnonzero(m[rows[0] : rows[-1] + 1].any(axis=0))
            r0, c0 = int(rows[0]), int(cols[0])
            crop = m[r0 : rows[-1] + 1, c0 : cols[-1] + 1]
            crops.append((c, crop, r0, c0, crop.shape[1]))
    return _pack(crops, masks.shape[1:], channels=masks.shape[0])


def _pack(crops, shape, channels: int = NUM_CLASSES) -> np.ndarray:
    header = np.zeros(_HEADER + _RECORD * channels, dtype=np.int64)
    header[:_HEADER] = (MAGIC, VERSION, channels, shape[0], shape[1])
    blobs, offset = [], 0
    for c, crop, r0, c0, w in crops:
        packed = np.packbits(crop.astype(bool, copy=False), axis=1)
        header[_HEADER + _RECORD * c : _HEADER + _RECORD * (c + 1)] = (r0, c0, crop.shape[0], w, offset)
        blobs.append(packed.ravel())
        offset += packed.size
    return np.concatenate([header.view(np.uint8), *blobs])


def unpack_masks(buf: np.ndarray) -> np.ndarray:
    """Unpack the cache's 1-D uint8 form into ``(C, H, W)`` bool."""
    header = np.asarray(buf[: _HEADER * 8]).view(np.int64)
    if header[0] != MAGIC or header[1] != VERSION:
        raise ValueError("not a handseg packed mask file")
    channels, height, width = (int(v) for v in header[2:5])
    table = buf[_HEADER * 8 : (_HEADER + _RECORD * channels) * 8]
    records = np.asarray(table).view(np.int64).reshape(channels, _RECORD)
    data = buf[(_HEADER + _RECORD * channels) * 8 :]
    out = np.zeros((channels, height, width), dtype=np.bool_)
    for c, (r0, c0, h, w, offset) in enumerate(records.tolist()):
        if h:
            wb = (w + 7) // 8
            block = np.asarray(data[offset : offset + h * wb]).reshape(h, wb)
            out[c, r0 : r0 + h, c0 : c0 + w] = np.unpackbits(block, axis=1, count=w).view(np.bool_)
    return out


def _npy_bytes_path(folder: Path, sample: Sample) -> Path:
    return folder / sample.patient / f"{sample.stem}.npy"


def mask_path(cache_dir: str | Path, sample: Sample) -> Path:
    return _npy_bytes_path(Path(cache_dir) / MASKS, sample)


def image_path(cache_dir: str | Path, sample: Sample) -> Path:
    return _npy_bytes_path(Path(cache_dir) / IMAGES, sample)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _up_to_date(target: Path, *sources: Path) -> bool:
    if not target.is_file():
        return False
    t = target.stat().st_mtime_ns
    return all(t >= s.stat().st_mtime_ns for s in sources)


def _cache_one_mask(args: tuple[Sample, Path]) -> tuple[str, list[int], bool]:
    sample, target = args
    from handseg.core.data import image_size

    shape = image_size(sample.image_path)
    if _up_to_date(target, sample.image_path, sample.label_path):
        return sample.rel, list(shape), False
    _save_npy(target, pack_polygons(read_polygons(sample.label_path), shape))
    return sample.rel, list(shape), True


def _cache_one_image(args: tuple[Sample, Path]) -> tuple[str, list[int], bool]:
    sample, target = args
    if _up_to_date(target, sample.image_path):
        return sample.rel, list(np.load(target, mmap_mode="r").shape), False
    image = read_image(sample.image_path)
    _save_npy(target, image)
    return sample.rel, list(image.shape), True


@dataclass
class CacheResult:
    folder: Path
    samples: list[dict]
    written: int
    skipped: int


def build_cache(kind: str, data_dir: str | Path, cache_dir: str | Path, workers: int = 1,
                progress: Callable[[], None] | None = None) -> CacheResult:
    """Fill ``cache_dir/{images|masks}`` for every sample of ``data_dir``; skip up-to-date files.

    Args:
        kind: ``"masks"`` (needs labels) or ``"images"``.
        workers: processes to use (1 = in this process).
    """
    if kind not in (MASKS, IMAGES):
        raise ValueError(f"unknown cache kind {kind!r}")
    samples = discover(data_dir, labels="required" if kind == MASKS else "ignore")
    folder = Path(cache_dir) / kind
    jobs = [(s, _npy_bytes_path(folder, s)) for s in samples]
    fn = _cache_one_mask if kind == MASKS else _cache_one_image
    results = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 8))):
                results.append(r)
                if progress:
                    progress()
    else:
        for job in jobs:
            results.append(fn(job))
            if progress:
                progress()
    written = sum(r[2] for r in results)
    entries = [{"path": rel, "shape": shape} for rel, shape, _ in results]
    return CacheResult(folder, entries, written, len(results) - written)


def load_cached_image(cache_dir: str | Path, sample: Sample, mmap: bool = True) -> np.ndarray:
    """``(H, W)`` uint8 image from the cache (memory-mapped by default)."""
    path = image_path(cache_dir, sample)
    if not path.is_file():
        raise HandsegError("not in the image cache (run `handseg prep png2npy`)", path)
    return np.load(path, mmap_mode="r" if mmap else None)


def load_cached_masks(cache_dir: str | Path, sample: Sample) -> np.ndarray:
    """``(29, H, W)`` bool masks from the cache."""
    path = mask_path(cache_dir, sample)
    if not path.is_file():
        raise HandsegError("not in the mask cache (run `handseg prep json2npy`)", path)
    try:
        return unpack_masks(np.load(path))
    except ValueError as e:
        raise HandsegError(f"corrupt cache file ({e})", path) from None


def load_sample(cache_dir: str | Path, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """One training sample from the prep cache: ``(image (H, W) uint8, masks (29, H, W) bool)``."""
    return np.asarray(load_cached_image(cache_dir, sample)), load_cached_masks(cache_dir, sample)


def default_cache_dir(data_dir: str | Path) -> Path:
    """Where ``prep`` puts a folder's cache unless told otherwise: ``DATA/cache``."""
    return Path(data_dir) / "cache"


def has_cache(cache_dir: str | Path, kind: str) -> bool:
    return (Path(cache_dir) / kind / "manifest.json").is_file()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
