"""Pseudo labels: test predictions turned into a labelled data set that ``train --extra`` accepts.

The output has the competition layout (``DCM/`` + ``outputs_json/``, one polygon per class, from
the largest contour of each predicted mask) and an exact prep cache of the predicted masks
(``cache/masks``), which training prefers over the polygons.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASSES, DEFAULT_THRESHOLD, IMAGES_DIR, LABELS_DIR, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.common.notices import notice
from handseg.data.cache import MASKS, cache_entry, mask_path, pack_crops
from handseg.data.images import image_size
from handseg.data.labels import polygon_document
from handseg.data.layout import Sample, discover
from handseg.ensemble.masks import level_cuts
from handseg.formats.files import MANIFEST_NAME, atomic_open, atomic_write_json, read_json, sidecar_manifest_path
from handseg.formats.probs import ProbMap, probs_name, read_probs_index
from handseg.formats.recipe import read_recipe
from handseg.formats.rle import check_runs_fit, runs_to_crop
from handseg.formats.submission import read_predictions
from handseg.models.checkpoint import read_card, resolve_checkpoint
from handseg.models.context import resolve_context


@dataclass
class PseudoResult:
    kept: list[str]
    dropped: dict[str, str]
    cache_entries: list[dict]
    """The mask cache's manifest records (what each cache file was made from)."""
    min_confidence: float | None = None
    """The confidence gate applied (None: none, as for a CSV)."""


DEFAULT_MIN_CONFIDENCE = 0.9
"""The confidence gate with probability maps when none is given: a weak model's labels (a mean probability
over its bone pixels below 0.9) would teach the next model its own mistakes."""


def mask_polygon(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray | None:
    """The largest outer contour of a mask as dense ``(N, 2)`` int32 points (x, y; shifted by the
    crop's ``offset`` = (row0, col0)), or None if empty."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    biggest = max(contours, key=cv2.contourArea)
    if len(biggest) < 3:
        return None
    return (biggest.reshape(-1, 2) + np.array([offset[1], offset[0]])).astype(np.int32)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def pseudo_origin(source: str | Path) -> list[dict] | None:
    """The runs whose predictions ``source`` (a CSV or a probability folder) holds, from its handseg manifest:
    ``[{"run", "fold", "splits"}]`` (``fold``/``splits`` as each run's manifest gives them, else None), or
    None when the source does not say (no manifest, or made by a command that does not name its models).
    ``train --fold K --extra`` reads it back (:func:`~handseg.training.dataset.check_extra_origin`)."""

    source = Path(source)
    manifest = source / MANIFEST_NAME if source.is_dir() else sidecar_manifest_path(source)
    if not manifest.is_file():
        return None
    doc = read_json(manifest, "manifest")
    options = doc.get("options") if isinstance(doc, dict) and isinstance(doc.get("options"), dict) else {}
    if isinstance(options.get("checkpoints"), list):
        checkpoints = [Path(str(c)) for c in options["checkpoints"]]
    elif isinstance(options.get("recipe"), str) and Path(options["recipe"]).is_file():
        checkpoints = [Path(r) for c in read_recipe(options["recipe"]).configs for r in c.checkpoints]
    else:
        return None
    runs = list(dict.fromkeys(run for c in checkpoints for run in _runs_behind(c)))
    out = []
    for run in runs:
        doc = read_json(run / MANIFEST_NAME, "manifest") if (run / MANIFEST_NAME).is_file() else {}
        opts = doc.get("options") if isinstance(doc, dict) and isinstance(doc.get("options"), dict) else {}
        inputs = doc.get("inputs") if isinstance(doc, dict) and isinstance(doc.get("inputs"), dict) else {}
        fold = opts.get("fold")
        out.append({"run": str(run), "fold": fold if isinstance(fold, int) and not isinstance(fold, bool) else None,
                    "splits": inputs.get("splits") if isinstance(inputs.get("splits"), str) else None})
    return out


def _runs_behind(checkpoint: Path) -> list[Path]:
    """The run of a checkpoint (a run folder or a checkpoint file) and, for a cascade or a ROI model, its
    stage-1 runs: their maps went into its predictions, so they count among the models that made them."""
    run = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        path = resolve_checkpoint(checkpoint)
        card = read_card(path)
        stage1 = resolve_context(card.context, path, card.context_sha256) if card.context else []
    except HandsegError:
        return [run]  # not readable here: the run alone, which then says what it can
    return [run, *(Path(os.path.normpath(p)).parent for p in stage1)]


def make_pseudo(source: Path, data: Path, out: Path, min_confidence: float | None = None,
                progress: Callable[[], None] | None = None) -> PseudoResult:
    """Write pseudo labels for the images of ``data`` from a CSV or a probability folder into ``out``.

    Images are dropped when a class is empty (a training image has all 29 bones) or, with
    probabilities, when the mean confidence over predicted bone pixels is below ``min_confidence``
    (``None``: :data:`DEFAULT_MIN_CONFIDENCE`; ``0`` turns the gate off). A CSV has no confidence: only
    the 29-bone rule applies. Each class is handled inside its bounding box (never 29 full-size float maps).

    Raises:
        HandsegError: a prediction names an image that is not in ``data``, does not fit its image's
            size (an RLE past the end, a map of another size), or the source is unreadable.
    """

    samples = discover(data, labels="ignore", role="test")
    by_name = {s.name: s for s in samples}
    from_probs = Path(source).is_dir()
    if from_probs:
        names = read_probs_index(source)
        min_confidence = DEFAULT_MIN_CONFIDENCE if min_confidence is None else min_confidence
    else:
        if min_confidence is not None:
            raise HandsegError("--min-confidence needs probability maps (predict --probs DIR), not a CSV", source)
        preds = read_predictions(source)
        names = preds.images
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise HandsegError(f"{len(unknown)} predicted images are not in {data} (e.g. {unknown[0]})", source)
    shapes = {name: image_size(by_name[name].image_path) for name in names}
    cuts = level_cuts(np.full(NUM_CLASSES, DEFAULT_THRESHOLD))
    if from_probs:
        cuts = level_cuts(_recorded_thresholds(Path(source)))
    if not from_probs:  # every RLE is checked before anything is written
        for name in names:
            for c, runs in enumerate(preds.runs[name]):
                check_runs_fit(runs, shapes[name], f"{source} ({name} / {CLASSES[c]})")
    kept, dropped, entries = [], {}, []
    if progress:
        progress(total=len(names))
    for name in names:
        s, shape = by_name[name], shapes[name]
        crops: list[tuple[int, np.ndarray, int, int]] = []  # (class, bool crop, row0, col0)
        if from_probs:
            pm = ProbMap(Path(source) / probs_name(name))
            if pm.shape != shape:
                raise HandsegError(f"{name}: probability map is {pm.shape[1]} x {pm.shape[0]}, the image "
                                   f"{shape[1]} x {shape[0]}", pm.path)
            fg_sum, fg_count = 0.0, 0
            for c in range(NUM_CLASSES):
                got = pm.crop(c)
                if got is not None:
                    q, r0, c0 = got
                    m = q > cuts[c]
                    fg_sum += float(q[m].sum(dtype=np.int64)) / 255.0
                    fg_count += int(m.sum())
                    crops.append((c, m, r0, c0))
            confidence = fg_sum / fg_count if fg_count else 0.0
            if min_confidence is not None and confidence < min_confidence:
                dropped[name] = f"confidence {confidence:.3f} < {min_confidence}"
                _progress(progress)
                continue
        else:
            for c in range(NUM_CLASSES):
                got = runs_to_crop(preds.runs[name][c], shape)
                if got is not None:
                    crops.append((c, *got))
        polygons = {}
        for c, crop, r0, c0 in crops:
            poly = mask_polygon(crop, (r0, c0))
            if poly is not None:
                polygons[CLASSES[c]] = poly
        missing = [c for c in CLASSES if c not in polygons]
        if missing:
            dropped[name] = f"no prediction for {', '.join(missing[:3])}"
            _progress(progress)
            continue
        image = out / IMAGES_DIR / s.folder / s.name
        label = out / LABELS_DIR / s.folder / f"{s.stem}.json"
        _link_or_copy(s.image_path, image)
        atomic_write_json(label, polygon_document(polygons, f"{s.stem}.png", f"pseudo/{s.folder or s.patient}"))
        target = mask_path(out / "cache", s)
        with atomic_open(target, "wb") as f:
            np.save(f, pack_crops(crops, shape), allow_pickle=False)
        entries.append(cache_entry(MASKS, Sample(s.patient, image, label, s.folder), target, shape))
        kept.append(s.rel)
        _progress(progress)
    if not kept:
        first = next(iter(dropped.items()), ("", ""))
        raise HandsegError(f"no image passed (all {len(dropped)} dropped, e.g. {first[0]}: {first[1]}); nothing to "
                           "train on", source)
    return PseudoResult(kept, dropped, entries, min_confidence)


def _recorded_thresholds(folder: Path) -> np.ndarray:
    """The per-class thresholds a probability folder's predict used (its manifest), else 0.5: pseudo
    labels cut the maps where the submission would."""

    manifest = folder / MANIFEST_NAME
    thresholds = None
    if manifest.is_file():
        doc = read_json(manifest, "manifest")
        thresholds = (doc.get("options") or {}).get("thresholds") if isinstance(doc, dict) else None
    if not (isinstance(thresholds, list) and len(thresholds) == NUM_CLASSES
            and all(isinstance(t, int | float) and 0 < t < 1 for t in thresholds)):
        return np.full(NUM_CLASSES, 0.5)
    if any(t != 0.5 for t in thresholds):
        notice("pseudo-thresholds", f"pseudo labels use the per-class thresholds {folder} was predicted with "
                                    f"({min(thresholds):.2f}..{max(thresholds):.2f})")
    return np.asarray(thresholds, dtype=np.float64)


def _progress(progress):
    if progress:
        progress()
