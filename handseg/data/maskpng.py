"""Masks as images, for people outside the competition format: ``DIR/<stem>/<class>.png``, 0 or 255."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from handseg.common.constants import CLASSES
from handseg.common.errors import HandsegError
from handseg.data.images import image_size
from handseg.data.layout import Sample
from handseg.formats.rle import check_runs_fit, runs_to_mask
from handseg.formats.submission import PredictionSet


def write_mask_pngs(pred: PredictionSet, samples: dict[str, Sample], folder: Path,
                    progress: Callable[..., None] | None = None) -> int:
    """Write each image's 29 masks as 8-bit grey PNGs at the image's own size.

    Args:
        pred: the predictions (a CSV as read); every image must be in ``samples``.
        samples: image name -> its sample (for the image's size, read from its header).
        folder: where ``<stem>/<class>.png`` go; each PNG is ``(H, W)`` uint8, 255 inside the mask, else 0.
        progress: ``progress(total=n)`` once, then ``progress()`` per image.

    Returns:
        The number of images written.

    Raises:
        HandsegError: an image is not in ``samples``, two images share a stem (their folders would be
            one), or an RLE runs past its image's end.
    """
    stems: dict[str, str] = {}
    for name in pred.images:
        if name not in samples:
            raise HandsegError(f"image {name} is not in the data folder", pred.path)
        stem = Path(name).stem
        if stem in stems:
            raise HandsegError(f"images {stems[stem]} and {name} would share the mask folder {stem}/", pred.path)
        stems[stem] = name
    if progress is not None:
        progress(total=len(pred.images))
    for name in pred.images:
        shape = image_size(samples[name].image_path)
        target = folder / Path(name).stem
        target.mkdir(parents=True, exist_ok=True)
        for c, runs in zip(CLASSES, pred.runs[name]):
            check_runs_fit(runs, shape, f"{pred.path}: {name} {c}")
            mask = runs_to_mask(runs, shape).astype(np.uint8) * np.uint8(255)
            if not cv2.imwrite(str(target / f"{c}.png"), mask):
                raise HandsegError("could not write a mask PNG", target / f"{c}.png")
        if progress is not None:
            progress()
    return len(pred.images)
