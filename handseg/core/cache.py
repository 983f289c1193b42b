"""The prep cache: images as raw ``.npy`` and multi-label masks as packed per-bone crops.

Layout::

    CACHE/images/ID001/image1661130828152_R.npy    (H, W) uint8, memory-mappable
    CACHE/images/manifest.json
    CACHE/masks/ID001/image1661130828152_R.npy     packed masks (see below)
    CACHE/masks/manifest.json

A packed mask file is a :mod:`handseg.core.cropfile` buffer whose crops are each class's bounding
box packed 8 pixels a byte along rows (``np.packbits(axis=1)``). A 2048 px sample is about 1-2 MB instead of
116 MB of bool, and unpacking touches only the bones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.core import cropfile
from handseg.core.constants import NUM_CLASSES
from handseg.core.data import (
    BoneCrops,
    Polygons,
    Sample,
    discover,
    image_size,
    place_crops,
    polygon_crops,
    read_image,
    read_polygons,
)
from handseg.core.errors import HandsegError
from handseg.core.files import atomic_open

MAGIC = 0x48534D4B  # "HSMK"
IMAGES = "images"
MASKS = "masks"


def _row_bytes(width: int) -> int:
    return (width + 7) // 8


def pack_polygons(polygons: Polygons, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons (as :func:`handseg.core.data.class_masks` does) straight into the packed form."""
    blocks = [(c, np.packbits(crop, axis=1), r0, c0, crop.shape[1])
              for c, crop, r0, c0 in polygon_crops(polygons, shape)]
    return cropfile.pack(blocks, shape, NUM_CLASSES, MAGIC)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Pack a ``(C, H, W)`` bool stack into the cache's 1-D uint8 form."""
    blocks = []
    for c, m in enumerate(masks):
        box = cropfile.bbox(m)
        if box is not None:
            r0, r1, c0, c1 = box
            blocks.append((c, np.packbits(m[r0:r1, c0:c1], axis=1), r0, c0, c1 - c0))
    return cropfile.pack(blocks, masks.shape[1:], masks.shape[0], MAGIC)


def unpack_crops(buf: np.ndarray) -> tuple[tuple[int, int], int, BoneCrops]:
    """The cache's 1-D uint8 form as ``((H, W), channels, bone crops)``, touching only the bones.

    Raises:
        ValueError: ``buf`` is not a packed mask file.
    """
    try:
        crops = cropfile.CropFile.parse(buf, MAGIC)
    except ValueError as e:
        raise ValueError(f"not a handseg packed mask file ({e})") from None
    bones = []
    for c in range(crops.channels):
        got = crops.block(c, _row_bytes)
        if got is not None:
            block, r0, c0, w = got
            bones.append((c, np.unpackbits(block, axis=1, count=w).view(np.bool_), r0, c0))
    return crops.shape, crops.channels, bones


def unpack_masks(buf: np.ndarray) -> np.ndarray:
    """Unpack the cache's 1-D uint8 form into ``(C, H, W)`` bool.

    Raises:
        ValueError: ``buf`` is not a packed mask file.
    """
    shape, channels, bones = unpack_crops(buf)
    return place_crops(bones, shape, channels=channels)


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
    if progress:
        progress(total=len(jobs))
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
    shape, crops = load_cached_crops(cache_dir, sample)
    return place_crops(crops, shape)


def load_cached_crops(cache_dir: str | Path, sample: Sample) -> tuple[tuple[int, int], BoneCrops]:
    """``((H, W), bone crops)`` from the mask cache, without a full-size mask."""
    path = mask_path(cache_dir, sample)
    if not path.is_file():
        raise HandsegError("not in the mask cache (run `handseg prep json2npy`)", path)
    try:
        shape, _, bones = unpack_crops(np.load(path))
    except ValueError as e:
        raise HandsegError(f"corrupt cache file ({e})", path) from None
    return shape, bones


def load_sample(cache_dir: str | Path, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """One training sample from the prep cache: ``(image (H, W) uint8, masks (29, H, W) bool)``."""
    return np.asarray(load_cached_image(cache_dir, sample)), load_cached_masks(cache_dir, sample)


def default_cache_dir(data_dir: str | Path) -> Path:
    """Where ``prep`` puts a folder's cache unless told otherwise: ``DATA/cache``."""
    return Path(data_dir) / "cache"


def find_cache(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The mask cache to train from: ``cache_dir`` or ``DATA/cache``, if it holds masks; else None."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_dir)
    return cache if (cache / MASKS).is_dir() else None


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
