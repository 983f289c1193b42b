"""The prep cache: images as raw ``.npy`` and multi-label masks as packed per-bone crops.

Layout::

    CACHE/images/ID001/image1661130828152_R.npy    (H, W) uint8, memory-mappable
    CACHE/images/manifest.json
    CACHE/masks/ID001/image1661130828152_R.npy     packed masks (see below)
    CACHE/masks/manifest.json

A packed mask file is a :mod:`handseg.formats.cropfile` buffer whose crops are each class's bounding
box packed 8 pixels a byte along rows (``np.packbits(axis=1)``). A 2048 px sample is about 1-2 MB instead of
116 MB of bool, and unpacking touches only the bones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.common.notices import collect_only, drain, notice
from handseg.common.threads import budget as thread_budget
from handseg.data.images import image_size, read_image
from handseg.data.labels import BoneCrops, Polygons, place_crops, polygon_crops, read_polygons
from handseg.data.layout import Sample, discover
from handseg.formats import cropfile
from handseg.formats.files import MANIFEST_NAME, atomic_open, hold_output, release_output, write_manifest

MAGIC = 0x48534D4B  # "HSMK"
IMAGES = "images"
MASKS = "masks"


def _row_bytes(width: int) -> int:
    return (width + 7) // 8


def pack_polygons(polygons: Polygons, shape: tuple[int, int], source: str | Path | None = None) -> np.ndarray:
    """Rasterise polygons (as :func:`handseg.data.labels.class_masks` does) straight into the packed form."""
    blocks = [(c, np.packbits(crop, axis=1), r0, c0, crop.shape[1])
              for c, crop, r0, c0 in polygon_crops(polygons, shape, source)]
    return cropfile.pack(blocks, shape, NUM_CLASSES, MAGIC)


def pack_crops(crops: BoneCrops, shape: tuple[int, int], channels: int = NUM_CLASSES) -> np.ndarray:
    """Pack bone crops ``(class, (h, w) bool, row0, col0)`` (one per class) into the cache's 1-D form."""
    blocks = [(c, np.packbits(crop, axis=1), r0, c0, crop.shape[1]) for c, crop, r0, c0 in crops]
    return cropfile.pack(blocks, shape, channels, MAGIC)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Pack a ``(C, H, W)`` bool stack into the cache's 1-D uint8 form."""
    crops = []
    for c, m in enumerate(masks):
        box = cropfile.bbox(m)
        if box is not None:
            r0, r1, c0, c1 = box
            crops.append((c, m[r0:r1, c0:c1], r0, c0))
    return pack_crops(crops, masks.shape[1:], masks.shape[0])


def unpack_crops(buf: np.ndarray) -> tuple[tuple[int, int], int, BoneCrops]:
    """The cache's 1-D uint8 form as ``((H, W), channels, bone crops)``, touching only the bones.

    Raises:
        ValueError: ``buf`` is not a packed mask file.
    """
    try:
        crops = cropfile.CropFile.parse(buf, MAGIC)
        crops.validate(_row_bytes)
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
    return folder / sample.folder / f"{sample.stem}.npy"


def mask_path(cache_dir: str | Path, sample: Sample) -> Path:
    return _npy_bytes_path(Path(cache_dir) / MASKS, sample)


def image_path(cache_dir: str | Path, sample: Sample) -> Path:
    return _npy_bytes_path(Path(cache_dir) / IMAGES, sample)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


# ----------------------------------------------------------------------------------------------
# what a cache file was made from


def fingerprint(path: Path, previous: dict | None = None, always_hash: bool = False) -> dict:
    """``{"size", "mtime_ns", "sha256"}`` of a source file. With ``previous`` (its record in the cache
    manifest) and the same size and modification time, the recorded hash is reused without reading
    the file, unless ``always_hash`` (labels: small, and what people edit)."""
    st = path.stat()
    if (not always_hash and previous and previous.get("size") == st.st_size
            and previous.get("mtime_ns") == st.st_mtime_ns and previous.get("sha256")):
        return dict(previous)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}


def _sources(kind: str, sample: Sample, previous: dict | None) -> dict:
    prev = (previous or {}).get("sources", {})
    out = {"image": fingerprint(sample.image_path, prev.get("image"))}
    if kind == MASKS:
        out["label"] = fingerprint(sample.label_path, prev.get("label"), always_hash=True)
    return out


def _same_sources(a: dict, b: dict) -> bool:
    return {k: v.get("sha256") for k, v in a.items()} == {k: v.get("sha256") for k, v in b.items()}


def _fresh(target: Path, entry: dict | None, sources: dict) -> bool:
    """A cache file is up to date when it exists with the size recorded for it and was made from
    sources with the same content as today's."""
    return (entry is not None and target.is_file() and target.stat().st_size == entry.get("bytes")
            and _same_sources(entry.get("sources", {}), sources))


def cache_entry(kind: str, sample: Sample, target: Path, shape: tuple[int, int], previous: dict | None = None) -> dict:
    """The manifest record of one cache file: its image, size, the file's bytes and its sources."""
    return {"path": sample.rel, "shape": list(shape), "bytes": target.stat().st_size,
            "sources": _sources(kind, sample, previous)}


def read_cache_index(folder: Path) -> dict[str, dict]:
    """``{rel path: entry}`` from a cache folder's manifest (empty if there is none or it is unreadable)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    samples = doc.get("samples") if isinstance(doc, dict) else None
    return {e["path"]: e for e in samples or [] if isinstance(e, dict) and isinstance(e.get("path"), str)}


def _cache_one(args: tuple[str, Sample, Path, dict | None]) -> tuple[dict, bool, list]:

    kind, sample, target, previous = args
    sources = _sources(kind, sample, previous)
    if _fresh(target, previous, sources):
        return previous, False, drain()
    if kind == MASKS:
        shape = image_size(sample.image_path)
        _save_npy(target, pack_polygons(read_polygons(sample.label_path), shape, sample.label_path))
    else:
        image = read_image(sample.image_path)
        shape = image.shape
        _save_npy(target, image)
    entry = {"path": sample.rel, "shape": list(shape), "bytes": target.stat().st_size, "sources": sources}
    return entry, True, drain()


@dataclass
class CacheResult:
    folder: Path
    samples: list[dict]
    written: int
    skipped: int


def build_cache(kind: str, data_dir: str | Path, cache_dir: str | Path, workers: int = 1,
                progress: Callable[[], None] | None = None) -> CacheResult:
    """Fill ``cache_dir/{images|masks}`` for every sample of ``data_dir``; skip up-to-date files.

    A file is up to date when the manifest records it with the same bytes on disk, made from a
    label with the same content (SHA-256, always re-read) and an image with the same content (its
    hash is re-read when its size or modification time changed). The folder's manifest records
    each file's sources; it is written last.

    Args:
        kind: ``"masks"`` (needs labels) or ``"images"``.
        workers: processes to use (1 = in this process).
    """

    if kind not in (MASKS, IMAGES):
        raise ValueError(f"unknown cache kind {kind!r}")
    samples = discover(data_dir, labels="required" if kind == MASKS else "ignore")
    folder = Path(cache_dir) / kind
    fresh = hold_output(folder, deep=True)  # one prep per cache folder; a killed one's temporaries go
    try:
        return _fill_cache(kind, data_dir, folder, samples, workers, progress)
    finally:
        if fresh:
            release_output(folder)


def _fill_cache(kind: str, data_dir, folder: Path, samples: list, workers: int, progress) -> CacheResult:
    index = read_cache_index(folder)
    jobs = [(kind, s, _npy_bytes_path(folder, s), index.get(s.rel)) for s in samples]
    if progress:
        progress(total=len(jobs))
    results = []
    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=collect_only) as pool:
                for r in pool.map(_cache_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))):
                    results.append(r)
                    if progress:
                        progress()
        else:
            for job in jobs:
                results.append(_cache_one(job))
                if progress:
                    progress()
    except BaseException:
        if results:  # what finished stays usable; the rest is rebuilt next time
            done = {r[0]["path"] for r in results}
            kept = [r[0] for r in results] + [e for rel, e in index.items() if rel not in done]
            write_manifest(folder, f"prep-{kind}", {"workers": workers}, inputs={"data": str(data_dir)},
                           format="packed-bbox-v1" if kind == MASKS else "npy-uint8", samples=kept, complete=False)
        raise
    for _, _, notes in results:
        for key, text in notes:
            notice(key, text)
    written = sum(r[1] for r in results)
    entries = [r[0] for r in results]
    write_manifest(folder, f"prep-{kind}", {"workers": workers}, inputs={"data": str(data_dir)},
                   format="packed-bbox-v1" if kind == MASKS else "npy-uint8", samples=entries)
    return CacheResult(folder, entries, written, len(results) - written)


def check_cache_fresh(cache_dir: str | Path, samples: list[Sample]) -> set[str]:
    """Check the cache files of ``samples`` against what they were made from; returns the samples
    (by ``rel``) whose cache files can be used.

    A file made from other sources than today's, or changed since, is an error naming it; a file the
    manifest does not record (a prep that stopped midway, an older handseg) is not used, and the
    sample is read from its PNG and JSON (said once).

    Raises:
        HandsegError: naming the label or image that changed since ``handseg prep``, or the cache file
            that has another size than recorded.
    """

    usable = {s.rel for s in samples}
    for kind, command in ((MASKS, "json2npy"), (IMAGES, "png2npy")):
        folder = Path(cache_dir) / kind
        if not folder.is_dir():
            continue
        index = read_cache_index(folder)
        unrecorded = []
        for s in samples:
            target = _npy_bytes_path(folder, s)
            if not target.is_file():
                continue  # not cached: read from the PNG and JSON themselves
            entry = index.get(s.rel)
            if entry is None or "sources" not in entry:
                unrecorded.append(target)
                usable.discard(s.rel)
                continue
            if target.stat().st_size != entry.get("bytes"):
                raise HandsegError(f"cache file was changed or truncated since prep; run `handseg prep {command}` "
                                   "again", target)
            recorded = entry["sources"]
            for role, path in (("label", s.label_path), ("image", s.image_path)):
                if role in recorded and path is not None:
                    now = fingerprint(path, recorded[role], always_hash=role == "label")
                    if now.get("sha256") != recorded[role].get("sha256"):
                        raise HandsegError(f"changed since the cache was made; run `handseg prep {command}` "
                                           "again", path)
        if unrecorded:
            notice(("unrecorded", str(folder)), f"{len(unrecorded)} files of {folder} have no record of their "
                                                f"sources (a prep that stopped, or an older handseg) and are not "
                                                f"used; run `handseg prep {command}` again (e.g. {unrecorded[0].name})")
    return usable


def load_cached_image(cache_dir: str | Path, sample: Sample, mmap: bool = True) -> np.ndarray:
    """``(H, W)`` uint8 image from the cache (memory-mapped by default)."""
    path = image_path(cache_dir, sample)
    if not path.is_file():
        raise HandsegError("not in the image cache (run `handseg prep png2npy`)", path)
    try:
        image = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise HandsegError(f"corrupt cache file ({str(e).splitlines()[0][:100]}); run `handseg prep png2npy` "
                           "again", path) from None
    if image.dtype != np.uint8 or image.ndim != 2:
        raise HandsegError(f"cache file holds {image.dtype} {image.shape}, not an (H, W) uint8 image", path)
    return image


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
        shape, _, bones = unpack_crops(np.load(path, allow_pickle=False))
    except (ValueError, OSError, EOFError) as e:
        raise HandsegError(f"corrupt cache file ({e})", path) from None
    return shape, bones


def load_sample(cache_dir: str | Path, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """One training sample from the prep cache: ``(image (H, W) uint8, masks (29, H, W) bool)``."""
    return np.asarray(load_cached_image(cache_dir, sample)), load_cached_masks(cache_dir, sample)


def default_cache_dir(data_dir: str | Path) -> Path:
    """Where ``prep`` puts a folder's cache unless told otherwise: ``DATA/cache``."""
    return Path(data_dir) / "cache"


def find_cache(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The prep cache to train from: ``cache_dir`` or ``DATA/cache``, if it holds masks or images (either
    kind alone is used, the other read from the PNGs or JSONs); else None."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_dir)
    return cache if (cache / MASKS).is_dir() or (cache / IMAGES).is_dir() else None


def default_workers() -> int:
    """Worker processes for CPU-bound jobs (prep, select): the thread budget (usable CPUs or
    ``--threads``), at most 8."""
    return max(1, min(8, thread_budget()[0]))
