"""Ensembles: hard votes on RLE runs, soft votes on probability maps, class-wise picks.

Probability maps (``predict --probs DIR``) are stored one ``.npy`` per image: a
:mod:`handseg.core.cropfile` buffer holding each class's bounding box (where p >= 1/255) quantised to
uint8 (p * 255). They are memory-mappable, and a soft vote reads one class's crop at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from handseg.core import cropfile
from handseg.core.constants import CLASS_INDEX, CLASSES, DEFAULT_THRESHOLD, NUM_CLASSES
from handseg.core.errors import HandsegError
from handseg.core.files import read_json
from handseg.core.postprocess import image_shapes, keep_largest_classes, label_components
from handseg.core.rle import Runs, check_runs_fit, crop_to_runs, runs_to_rle, vote_runs
from handseg.core.submission import PredictionSet, check_same_images, read_predictions, write_predictions

PROBS_MAGIC = 0x48535042  # "HSPB"
PROBS_INDEX = "index.json"


# ----------------------------------------------------------------------------------------------
# probability maps


def _row_bytes(width: int) -> int:
    return width


def quantise_probs(probs):
    """Probabilities to uint8 ``p * 255`` (rounded half to even, clipped): a numpy array or a torch
    tensor, which stays on its device."""
    q = (probs * 255.0).round().clip(0, 255)
    if isinstance(q, np.ndarray):
        return q.astype(np.uint8)
    import torch

    return q.to(torch.uint8)


def pack_probs(probs: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float probabilities (or uint8 from :func:`quantise_probs`) -> the 1-D uint8 buffer
    described above."""
    q = probs if probs.dtype == np.uint8 else quantise_probs(probs)
    blocks = []
    for c in range(q.shape[0]):
        box = cropfile.bbox(q[c])
        if box is not None:
            r0, r1, c0, c1 = box
            blocks.append((c, q[c, r0:r1, c0:c1], r0, c0, c1 - c0))
    return cropfile.pack(blocks, q.shape[1:], q.shape[0], PROBS_MAGIC)


class ProbMap:
    """One image's stored probabilities; ``crop(c)`` gives ``(uint8 crop, row0, col0)`` or None."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.crops = cropfile.CropFile.parse(np.load(path, mmap_mode="r"), PROBS_MAGIC)
        except (ValueError, OSError) as e:
            raise HandsegError(f"not a handseg probability map ({e})", path) from None
        self.channels = self.crops.channels

    @property
    def shape(self) -> tuple[int, int]:
        return self.crops.shape

    def crop(self, c: int):
        got = self.crops.block(c, _row_bytes)
        return None if got is None else got[:3]

    def dense(self) -> np.ndarray:
        """All classes as ``(C, H, W)`` float32 in [0, 1]."""
        out = np.zeros((self.channels, *self.shape), dtype=np.float32)
        for c in range(self.channels):
            got = self.crop(c)
            if got is not None:
                crop, r0, c0 = got
                out[c, r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop / 255.0
        return out


def probs_name(image_name: str) -> str:
    return Path(image_name).stem + ".npy"


def read_probs_index(folder: Path) -> list[str]:
    """The image names of a probability folder, in submission order."""
    index = Path(folder) / PROBS_INDEX
    if not index.is_file():
        raise HandsegError(f"not a probability folder (no {PROBS_INDEX}; made by `predict --probs`)", folder)
    doc = read_json(index, "probability index")
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise HandsegError('no "images" list (made by `predict --probs`?)', index)
    for name in images:
        if not (Path(folder) / probs_name(name)).is_file():
            raise HandsegError(f"probability map for {name} is missing", folder)
    return images


# ----------------------------------------------------------------------------------------------
# votes


def hard_vote(csvs: list[Path], out: Path, min_votes: int | None = None,
              progress: Callable[[], None] | None = None, keep_largest: Sequence[bool] | None = None,
              data: Path | None = None) -> int:
    """Pixel-wise majority (or ``min_votes``) of several CSVs, computed on runs; returns images written.

    ``keep_largest`` (one flag per class) keeps only the largest component of the flagged classes'
    voted masks (see :mod:`handseg.core.postprocess`); CSVs carry no image sizes, so it needs ``data``,
    a folder holding the images (``DCM/``), for their sizes.

    Raises:
        HandsegError: fewer than two inputs, a bad CSV, different image sets, or a bad ``min_votes``.
    """
    if len(csvs) < 2:
        raise HandsegError("a vote needs at least two CSVs")
    k = min_votes if min_votes is not None else len(csvs) // 2 + 1
    if not 1 <= k <= len(csvs):
        raise HandsegError(f"--min-votes must be between 1 and {len(csvs)}, got {k}")
    sets = [read_predictions(p) for p in csvs]
    for s in sets[1:]:
        check_same_images(sets[0], s)
    post = _csv_post_processing(sets[0].images, keep_largest, data, csvs[0])

    if progress:
        progress(total=len(sets[0].images))

    def rows():
        for image in sets[0].images:
            voted = [vote_runs([s.runs[image][c] for s in sets], k) for c in range(NUM_CLASSES)]
            yield image, [runs_to_rle(r) for r in post(image, voted)]
            if progress:
                progress()

    return write_predictions(out, rows())


def soft_vote(folders: list[Path], out: Path, weights: list[float] | None = None,
              threshold: float | list[float] = DEFAULT_THRESHOLD, progress: Callable[[], None] | None = None,
              keep_largest: Sequence[bool] | None = None) -> int:
    """Weighted mean of probability maps, thresholded per class; one class crop in memory at a time.

    ``keep_largest`` (one flag per class) keeps only the largest component of the flagged classes'
    masks (see :mod:`handseg.core.postprocess`), on the class's crop.
    """
    if len(folders) < 2:
        raise HandsegError("a vote needs at least two probability folders")
    weights = weights or [1.0] * len(folders)
    if len(weights) != len(folders):
        raise HandsegError(f"--weights has {len(weights)} values for {len(folders)} inputs")
    indices = [read_probs_index(f) for f in folders]
    for f, idx in zip(folders[1:], indices[1:]):
        if set(idx) != set(indices[0]):
            raise HandsegError(f"different image sets from {folders[0]}", f)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (NUM_CLASSES,))
    total = float(sum(weights))
    if progress:
        progress(total=len(indices[0]))

    def rows():
        for image in indices[0]:
            maps = [ProbMap(Path(f) / probs_name(image)) for f in folders]
            shape = maps[0].shape
            for m in maps[1:]:
                if m.shape != shape:
                    raise HandsegError(f"{image}: size {m.shape} differs from {shape}", m.path)
            rles = []
            for c in range(NUM_CLASSES):
                crops = [(m.crop(c), w) for m, w in zip(maps, weights)]
                crops = [(g, w) for g, w in crops if g is not None]
                if not crops:
                    rles.append("")
                    continue
                r0 = min(g[1] for g, _ in crops)
                c0 = min(g[2] for g, _ in crops)
                r1 = max(g[1] + g[0].shape[0] for g, _ in crops)
                c1 = max(g[2] + g[0].shape[1] for g, _ in crops)
                acc = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
                for (crop, cr, cc), w in crops:
                    acc[cr - r0 : cr - r0 + crop.shape[0], cc - c0 : cc - c0 + crop.shape[1]] += crop * (w / 255.0)
                mask = acc / total > thresholds[c]
                if keep_largest is not None and keep_largest[c]:
                    labels, _, kept, _ = label_components(mask)
                    if labels is not None:
                        mask = labels == kept
                rles.append(runs_to_rle(crop_to_runs(mask, r0, c0, shape[1])))
            yield image, rles
            if progress:
                progress()

    return write_predictions(out, rows())


def read_class_map(path: Path) -> dict[str, Path]:
    """``{"default": "a.csv", "Trapezium": "wrist.csv", ...}`` -> a CSV for every class.

    Relative CSV paths are taken relative to the map file.
    """
    doc = read_json(path, "class map")
    if not isinstance(doc, dict):
        raise HandsegError('class map must be an object like {"default": "a.csv", "Lunate": "b.csv"}', path)
    unknown = [k for k in doc if k != "default" and k not in CLASS_INDEX]
    if unknown:
        raise HandsegError(f"unknown class {unknown[0]!r} in class map", path)
    default = doc.get("default")
    missing = [c for c in CLASSES if c not in doc and default is None]
    if missing:
        raise HandsegError(f"class map gives no CSV for {', '.join(missing[:5])} (add \"default\")", path)
    base = Path(path).parent
    chosen = {c: Path(doc.get(c, default)) for c in CLASSES}
    return {c: p if p.is_absolute() else base / p for c, p in chosen.items()}


def classwise_vote(class_map: dict[str, Path], out: Path, keep_largest: Sequence[bool] | None = None,
                   data: Path | None = None) -> int:
    """Take each class from the CSV the map names for it (``keep_largest``, ``data``: as in :func:`hard_vote`)."""
    sets: dict[Path, PredictionSet] = {}
    for p in dict.fromkeys(class_map.values()):
        sets[p] = read_predictions(p)
    first = next(iter(sets.values()))
    for s in sets.values():
        check_same_images(first, s)
    post = _csv_post_processing(first.images, keep_largest, data, first.path)

    def rows():
        for image in first.images:
            picked = [sets[class_map[c]].runs[image][i] for i, c in enumerate(CLASSES)]
            yield image, [runs_to_rle(r) for r in post(image, picked)]

    return write_predictions(out, rows())


def _csv_post_processing(images: list[str], keep_largest: Sequence[bool] | None, data: Path | None,
                         where: Path | None):
    """``(image, per-class runs) -> runs`` after the keep-largest step (the identity without one)."""
    if keep_largest is None or not any(keep_largest):
        return lambda image, runs: runs
    if len(keep_largest) != NUM_CLASSES:
        raise ValueError(f"need {NUM_CLASSES} keep-largest flags, got {len(keep_largest)}")
    if data is None:
        raise HandsegError("--keep-largest on CSV rows needs the images' sizes: pass --data DIR (the images)")
    shapes = image_shapes(data, images)

    def post(image: str, runs: list[Runs]) -> list[Runs]:
        for r in runs:
            check_runs_fit(r, shapes[image], f"{where} ({image})")
        return keep_largest_classes(runs, shapes[image], keep_largest)

    return post
