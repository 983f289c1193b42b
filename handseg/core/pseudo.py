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

from handseg.core.cache import mask_path, pack_masks
from handseg.core.constants import CLASSES, IMAGES_DIR, LABELS_DIR, NUM_CLASSES
from handseg.core.data import discover, image_size, polygon_document
from handseg.core.errors import HandsegError
from handseg.core.files import atomic_open, atomic_write_json
from handseg.core.rle import runs_to_mask


@dataclass
class PseudoResult:
    kept: list[str]
    dropped: dict[str, str]


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The largest outer contour of a mask as dense ``(N, 2)`` int32 points, or None if empty."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    biggest = max(contours, key=cv2.contourArea)
    return biggest.reshape(-1, 2).astype(np.int32) if len(biggest) >= 3 else None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_pseudo(source: Path, data: Path, out: Path, min_confidence: float | None = None,
                progress: Callable[[], None] | None = None) -> PseudoResult:
    """Write pseudo labels for the images of ``data`` from a CSV or a probability folder.

    Images are dropped when a class is empty (a training image has all 29 bones) or, with
    probabilities, when the mean confidence over predicted bone pixels is below ``min_confidence``.
    """
    from handseg.core.ensemble import ProbMap, probs_name, read_probs_index
    from handseg.core.submission import read_predictions

    samples = discover(data, labels="ignore")
    by_name = {s.name: s for s in samples}
    from_probs = Path(source).is_dir()
    if from_probs:
        names = read_probs_index(source)
    else:
        preds = read_predictions(source)
        names = preds.images
        if min_confidence is not None:
            raise HandsegError("--min-confidence needs probability maps (predict --probs DIR), not a CSV", source)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise HandsegError(f"{len(unknown)} predicted images are not in {data} (e.g. {unknown[0]})", source)
    kept, dropped = [], {}
    if progress:
        progress(total=len(names))
    for name in names:
        s = by_name[name]
        shape = image_size(s.image_path)
        if from_probs:
            probs = ProbMap(Path(source) / probs_name(name)).dense()
            if probs.shape[1:] != shape:
                raise HandsegError(f"{name}: probability map is {probs.shape[1:]}, image is {shape}", source)
            masks = probs > 0.5
            fg = probs[masks]
            confidence = float(fg.mean()) if fg.size else 0.0
            if min_confidence is not None and confidence < min_confidence:
                dropped[name] = f"confidence {confidence:.3f} < {min_confidence}"
                _progress(progress)
                continue
        else:
            masks = np.zeros((NUM_CLASSES, *shape), dtype=bool)
            for c in range(NUM_CLASSES):
                runs_to_mask(preds.runs[name][c], shape, masks[c])
        polygons = {}
        for c, cname in enumerate(CLASSES):
            poly = mask_polygon(masks[c])
            if poly is not None:
                polygons[cname] = poly
        missing = [c for c in CLASSES if c not in polygons]
        if missing:
            dropped[name] = f"no prediction for {', '.join(missing[:3])}"
            _progress(progress)
            continue
        _link_or_copy(s.image_path, out / IMAGES_DIR / s.patient / s.name)
        atomic_write_json(out / LABELS_DIR / s.patient / f"{s.stem}.json",
                          polygon_document(polygons, f"{s.stem}.png", f"pseudo/{s.patient}"))
        with atomic_open(mask_path(out / "cache", s), "wb") as f:
            np.save(f, pack_masks(masks), allow_pickle=False)
        kept.append(s.rel)
        _progress(progress)
    return PseudoResult(kept, dropped)


def _progress(progress):
    if progress:
        progress()
