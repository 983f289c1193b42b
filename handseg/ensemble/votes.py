"""Prediction / submission CSVs: ``image_name,class,rle``, one row per image and class.

Rows are ordered by image (sorted by path relative to ``DCM/``) and, within an image, by the 29
classes in competition order. Reading is strict: a malformed RLE, unknown class, duplicate or
missing row is an error that names the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASS_INDEX, CLASSES, DEFAULT_THRESHOLD, MAX_WEIGHT_SUM, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.common.notices import notice
from handseg.data.images import image_size
from handseg.data.layout import discover
from handseg.ensemble.masks import (
    check_thresholds,
    cut_value,
    keep_largest_classes,
    largest_component,
    place_crop,
    soft_level,
    union_box,
)
from handseg.formats.files import MANIFEST_NAME, read_json, sidecar_manifest_path
from handseg.formats.probs import ProbMap, probs_name, read_probs_index
from handseg.formats.recipe import SOFT
from handseg.formats.rle import Runs, crop_to_runs, runs_to_rle, vote_runs
from handseg.formats.submission import PredictionSet, check_fits, check_same_images, read_predictions, write_predictions


def _recorded_data(source: Path) -> Path | None:
    """The data folder an input's manifest names (``pred.manifest.json`` beside a CSV, or a
    probability folder's ``manifest.json``), if it still exists."""

    manifest = source / MANIFEST_NAME if source.is_dir() else sidecar_manifest_path(source)
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", {}).get("data")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return Path(data) if data and Path(data).is_dir() else None


def submission_order(image_lists: list[list[str]], sources: list[Path], data: Path | None = None
                     ) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The order an ensemble writes its images in, and their sizes where known.

    The submission order (README, "Data format") sorts images by their path under ``DCM/``, which a CSV does not
    carry: it comes from ``data`` (the X-rays), else from the data folder an input's manifest names,
    else from the inputs themselves when they all agree. Sizes come from the images' headers, so
    every run can be checked against its image.

    Raises:
        HandsegError: the inputs disagree on the order and no data folder is known, or the data
            folder does not hold the same images.
    """

    names = set(image_lists[0])
    candidates = [(data, "--data")] if data is not None else []
    candidates += [(d, f"the manifest of {src}") for src in sources if (d := _recorded_data(src)) is not None]
    for folder, why in candidates:
        try:
            samples = discover(folder, labels="ignore", role="test")
        except HandsegError:
            if why == "--data":
                raise
            continue
        order = [s.name for s in samples]
        if set(order) == names and len(order) == len(names):
            return order, {s.name: image_size(s.image_path) for s in samples}
        if why == "--data":
            only = sorted(names - set(order)) or sorted(set(order) - names)
            raise HandsegError(f"holds other images than the inputs (e.g. {only[0]})", folder)
    if all(lst == image_lists[0] for lst in image_lists[1:]):

        notice("order-from-inputs", "no data folder is known (--data, or a manifest beside the inputs): rows follow "
                                    "the inputs' common order, and runs are not checked against image sizes")
        return list(image_lists[0]), {}
    raise HandsegError("the inputs list their images in different orders; pass --data DIR (the X-rays they "
                       "predict) so the output follows the submission order")


# ----------------------------------------------------------------------------------------------
# votes


def hard_vote(csvs: list[Path], out: Path, min_votes: int | None = None,
              progress: Callable[[], None] | None = None, data: Path | None = None,
              keep_largest: Sequence[bool] | None = None) -> int:
    """Pixel-wise majority (or ``min_votes``) of several CSVs, computed on runs; returns images written.

    Rows follow the submission order (see :func:`~handseg.ensemble.votes.submission_order`),
    whatever the inputs' order; with the images' sizes known, every run is checked against its image.
    ``keep_largest`` (one flag per class) keeps only the largest component of the flagged classes'
    voted masks (see :mod:`handseg.ensemble.masks`); it needs the images' sizes (``data``, or the
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
    for s in sets:
        check_fits(s, shapes)
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
    total = sum(float(w) for w in weights)
    if total > MAX_WEIGHT_SUM:
        raise HandsegError(f"--weights sum to {total:g}, more than {MAX_WEIGHT_SUM:g} (only their ratios matter: "
                           "scale them down)")
    return [float(w) for w in weights]


def soft_vote(folders: list[Path], out: Path, weights: list[float] | None = None,
              threshold: float | list[float] = DEFAULT_THRESHOLD, progress: Callable[[], None] | None = None,
              data: Path | None = None, keep_largest: Sequence[bool] | None = None) -> int:
    """Weighted mean of probability maps, thresholded per class; one class crop in memory at a time.

    ``keep_largest`` (one flag per class) keeps only the largest component of the flagged classes'
    masks (see :mod:`handseg.ensemble.masks`), on the class's crop.

    Raises:
        HandsegError: fewer than two folders, bad weights or threshold, different image sets or
            sizes, a corrupt map, or an order that cannot be known.
    """
    if len(folders) < 2:
        raise HandsegError("a vote needs at least two probability folders")
    weights = check_weights(weights, len(folders))
    thresholds = check_thresholds(threshold, option="--threshold")
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
                box = union_box([g for g, _ in crops])
                r0, c0 = box[0], box[2]
                level = soft_level([place_crop(g, box) for g, _ in crops], [w for _, w in crops])
                mask = level > cut_value(SOFT, thresholds[c], total)
                if keep_largest is not None and keep_largest[c]:
                    mask = largest_component(mask)
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
    for s in sets.values():
        check_fits(s, shapes)
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
