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
from handseg.core.postprocess import keep_largest_classes, label_components
from handseg.core.rle import Runs, crop_to_runs, runs_to_rle, vote_runs
from handseg.core.submission import (
    PredictionSet,
    check_same_images,
    read_predictions,
    submission_order,
    write_predictions,
)

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


PROBS_FORMATS = ("packed", "dense")
"""``packed``: each class's bounding box (handseg's own, memory-mappable, a crop at a time);
``dense``: a plain ``(29, H, W)`` uint8 array (p * 255) that ``numpy.load`` reads without handseg."""


class ProbMap:
    """One image's stored probabilities (either format); ``crop(c)`` gives ``(uint8 crop, row0, col0)``
    or None."""

    def __init__(self, path: Path):
        from handseg.core.data import check_image_size

        self.path = path
        self.array = None
        try:
            buf = np.load(path, mmap_mode="r", allow_pickle=False)
            if buf.ndim == 3 and buf.dtype == np.uint8:  # a dense map
                self.array = buf
                self.channels, height, width = buf.shape
            else:
                self.crops = cropfile.CropFile.parse(buf, PROBS_MAGIC)
                self.crops.validate(_row_bytes)
                self.channels, height, width = self.crops.channels, self.crops.height, self.crops.width
        except (ValueError, OSError, EOFError) as e:
            raise HandsegError(f"not a handseg probability map ({str(e).splitlines()[0][:120]})", path) from None
        if self.channels != NUM_CLASSES:
            raise HandsegError(f"probability map has {self.channels} classes, not {NUM_CLASSES}", path)
        check_image_size(height, width, path)
        self._shape = (height, width)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def crop(self, c: int):
        if self.array is not None:
            box = cropfile.bbox(self.array[c])
            if box is None:
                return None
            r0, r1, c0, c1 = box
            return np.asarray(self.array[c, r0:r1, c0:c1]), r0, c0
        got = self.crops.block(c, _row_bytes)
        return None if got is None else got[:3]

    def dense(self) -> np.ndarray:
        """All classes as ``(C, H, W)`` float32 in [0, 1]."""
        if self.array is not None:
            return np.asarray(self.array, dtype=np.float32) / 255.0
        out = np.zeros((self.channels, *self.shape), dtype=np.float32)
        for c in range(self.channels):
            got = self.crop(c)
            if got is not None:
                crop, r0, c0 = got
                out[c, r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop / 255.0
        return out


def write_probs(path: Path, quantised: np.ndarray, fmt: str = "packed") -> None:
    """Write one image's ``(29, H, W)`` uint8 map (see :func:`quantise_probs`) atomically, in ``fmt``."""
    from handseg.core.files import atomic_open

    if fmt not in PROBS_FORMATS:
        raise HandsegError(f"unknown probability format {fmt!r}; valid: {', '.join(PROBS_FORMATS)}")
    with atomic_open(path, "wb") as f:
        np.save(f, pack_probs(quantised) if fmt == "packed" else np.ascontiguousarray(quantised), allow_pickle=False)


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


def _check_fits(sets: list[PredictionSet], shapes: dict[str, tuple[int, int]]) -> None:
    from handseg.core.metrics import check_fits

    for s in sets:
        check_fits(s, shapes)


def hard_vote(csvs: list[Path], out: Path, min_votes: int | None = None,
              progress: Callable[[], None] | None = None, data: Path | None = None,
              keep_largest: Sequence[bool] | None = None) -> int:
    """Pixel-wise majority (or ``min_votes``) of several CSVs, computed on runs; returns images written.

    Rows follow the submission order (see :func:`~handseg.core.submission.submission_order`),
    whatever the inputs' order; with the images' sizes known, every run is checked against its image.
    ``keep_largest`` (one flag per class) keeps only the largest component of the flagged classes'
    voted masks (see :mod:`handseg.core.postprocess`); it needs the images' sizes (``data``, or the
    data folder the inputs' manifests name).

    Raises:
        HandsegError: fewer than two inputs, a bad CSV, different image sets, a bad ``min_votes``,
            runs past an image's end, or an order that cannot be known.
    """
    if len(csvs) < 2:
        raise HandsegError("a vote needs at least two CSVs")
    k = min_votes if min_votes is not None else len(csvs) // 2 + 1
    if not 1 <= k <= len(csvs):
        raise HandsegError(f"--min-votes must be between 1 and {len(csvs)}, got {k}")
    sets = [read_predictions(p) for p in csvs]
    for s in sets[1:]:
        check_same_images(sets[0], s)
    order, shapes = submission_order([s.images for s in sets], csvs, data)
    _check_fits(sets, shapes)
    post = _keep_largest_runs(keep_largest, shapes)
    if progress:
        progress(total=len(order))

    def rows():
        for image in order:
            voted = [vote_runs([s.runs[image][c] for s in sets], k) for c in range(NUM_CLASSES)]
            yield image, [runs_to_rle(r) for r in post(image, voted)]
            if progress:
                progress()

    return write_predictions(out, rows())


def check_weights(weights: list[float] | None, n: int) -> list[float]:
    """One finite, non-negative weight per input, not all zero (default: equal weights)."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise HandsegError(f"--weights has {len(weights)} values for {n} inputs")
    if not all(np.isfinite(w) and w >= 0 for w in weights):
        raise HandsegError(f"--weights must be finite and not negative, got {','.join(f'{w:g}' for w in weights)}")
    if sum(weights) <= 0:
        raise HandsegError("--weights are all zero")
    return [float(w) for w in weights]


def check_threshold(threshold: float | list[float]) -> np.ndarray:
    """A threshold (or one per class) strictly between 0 and 1, as ``(29,)`` float64."""
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (NUM_CLASSES,))
    if not ((t > 0) & (t < 1)).all():
        raise HandsegError(f"--threshold must lie strictly between 0 and 1, got {np.unique(t)[0]:g}")
    return t


def soft_vote(folders: list[Path], out: Path, weights: list[float] | None = None,
              threshold: float | list[float] = DEFAULT_THRESHOLD, progress: Callable[[], None] | None = None,
              data: Path | None = None, keep_largest: Sequence[bool] | None = None) -> int:
    """Weighted mean of probability maps, thresholded per class; one class crop in memory at a time.

    ``keep_largest`` (one flag per class) keeps only the largest component of the flagged classes'
    masks (see :mod:`handseg.core.postprocess`), on the class's crop.

    Raises:
        HandsegError: fewer than two folders, bad weights or threshold, different image sets or
            sizes, a corrupt map, or an order that cannot be known.
    """
    if len(folders) < 2:
        raise HandsegError("a vote needs at least two probability folders")
    weights = check_weights(weights, len(folders))
    thresholds = check_threshold(threshold)
    indices = [read_probs_index(f) for f in folders]
    for f, idx in zip(folders[1:], indices[1:]):
        if set(idx) != set(indices[0]):
            raise HandsegError(f"different image sets from {folders[0]}", f)
    order, shapes = submission_order(indices, folders, data)
    total = float(sum(weights))
    if progress:
        progress(total=len(order))

    def rows():
        for image in order:
            maps = [ProbMap(Path(f) / probs_name(image)) for f in folders]
            shape = maps[0].shape
            for m in maps[1:]:
                if m.shape != shape:
                    raise HandsegError(f"{image}: size {m.shape} differs from {shape}", m.path)
            if image in shapes and shapes[image] != shape:
                raise HandsegError(f"{image}: the map is {shape[1]} x {shape[0]}, the image "
                                   f"{shapes[image][1]} x {shapes[image][0]}", maps[0].path)
            rles = []
            for c in range(NUM_CLASSES):
                crops = [(m.crop(c), w) for m, w in zip(maps, weights)]
                crops = [(g, w) for g, w in crops if g is not None and w > 0]
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


def classwise_vote(class_map: dict[str, Path], out: Path, data: Path | None = None,
                   keep_largest: Sequence[bool] | None = None) -> int:
    """Take each class from the CSV the map names for it (rows in the submission order; ``data``,
    ``keep_largest``: as in :func:`hard_vote`)."""
    sets: dict[Path, PredictionSet] = {}
    for p in dict.fromkeys(class_map.values()):
        sets[p] = read_predictions(p)
    first = next(iter(sets.values()))
    for s in sets.values():
        check_same_images(first, s)
    order, shapes = submission_order([s.images for s in sets.values()], list(sets), data)
    _check_fits(list(sets.values()), shapes)
    post = _keep_largest_runs(keep_largest, shapes)

    def rows():
        for image in order:
            picked = [sets[class_map[c]].runs[image][i] for i, c in enumerate(CLASSES)]
            yield image, [runs_to_rle(r) for r in post(image, picked)]

    return write_predictions(out, rows())


def _keep_largest_runs(keep_largest: Sequence[bool] | None, shapes: dict[str, tuple[int, int]]):
    """``(image, per-class runs) -> runs`` after the keep-largest step (the identity without one)."""
    if keep_largest is None or not any(keep_largest):
        return lambda image, runs: runs
    if len(keep_largest) != NUM_CLASSES:
        raise ValueError(f"need {NUM_CLASSES} keep-largest flags, got {len(keep_largest)}")
    if not shapes:
        raise HandsegError("--keep-largest on CSV rows needs the images' sizes: pass --data DIR (the images)")

    def post(image: str, runs: list[Runs]) -> list[Runs]:
        return keep_largest_classes(runs, shapes[image], keep_largest)

    return post
