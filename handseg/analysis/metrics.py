"""The leaderboard metric: Dice per image and class, averaged over images, then over classes.

Dice is ``(2|y&p| + 1e-4) / (|y| + |p| + 1e-4)`` (an image where both masks are empty scores 1).
Scores are computed on runs, so comparing two 288-image CSVs at 2048 px never builds a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASSES, DICE_EPS, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data.images import image_size
from handseg.data.labels import class_runs, read_polygons
from handseg.data.layout import discover
from handseg.formats.rle import Runs, intersection_area
from handseg.formats.submission import PredictionSet, check_same_images


@dataclass
class DiceReport:
    """Dice of one prediction against a reference, per image and class."""

    images: list[str]
    dice: np.ndarray
    """``(n_images, 29)`` float64."""
    truth_area: np.ndarray
    """``(n_images, 29)`` int64: pixels in the reference mask."""
    pred_area: np.ndarray
    """``(n_images, 29)`` int64: pixels in the predicted mask."""

    @property
    def per_class(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(CLASSES, self.dice.mean(axis=0))}

    @property
    def mean_dice(self) -> float:
        return float(self.dice.mean(axis=0).mean())

    @property
    def empty_classes(self) -> list[str]:
        """Classes with no predicted pixel on any image: where the reference is empty too their Dice is 1,
        which says nothing about a model (two empty CSVs score 1.0 everywhere)."""
        return [c for c, area in zip(CLASSES, self.pred_area.sum(axis=0)) if area == 0]

    @property
    def reference_empty_classes(self) -> list[str]:
        """Classes with no pixel in the reference on any image."""
        return [c for c, area in zip(CLASSES, self.truth_area.sum(axis=0)) if area == 0]

    def to_json(self) -> dict:
        return {"mean_dice": self.mean_dice, "per_class": self.per_class}


def dice_value(intersection, truth_area, pred_area):
    """The leaderboard Dice from pixel counts (scalars or arrays): 1 when both masks are empty."""
    return (2.0 * intersection + DICE_EPS) / (truth_area + pred_area + DICE_EPS)


def dice_from_runs(truth: Runs, pred: Runs) -> float:
    """Leaderboard Dice of two masks given as runs, without building either mask."""
    return float(dice_value(intersection_area(truth, pred), int(truth[1].sum()), int(pred[1].sum())))


def dice_scores(truth: PredictionSet, pred: PredictionSet, progress: Callable[[], None] | None = None) -> DiceReport:
    """Score ``pred`` against ``truth`` (the reference). Both must cover the same images.

    Raises:
        HandsegError: the image sets differ.
    """
    check_same_images(truth, pred)
    n = len(truth.images)
    dice = np.empty((n, NUM_CLASSES))
    t_area = np.empty((n, NUM_CLASSES), dtype=np.int64)
    p_area = np.empty((n, NUM_CLASSES), dtype=np.int64)
    for i, image in enumerate(truth.images):
        t_runs, p_runs = truth.runs[image], pred.runs[image]
        for c in range(NUM_CLASSES):
            yt, yp = t_runs[c], p_runs[c]
            t_area[i, c] = yt[1].sum()
            p_area[i, c] = yp[1].sum()
            dice[i, c] = dice_value(intersection_area(yt, yp), t_area[i, c], p_area[i, c])
        if progress is not None:
            progress()
    return DiceReport(list(truth.images), dice, t_area, p_area)


def dice_masks(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Leaderboard Dice of ``(C, H, W)`` bool masks: ``(C,)`` float64."""
    t = truth.reshape(truth.shape[0], -1)
    p = pred.reshape(pred.shape[0], -1)
    return dice_value(np.logical_and(t, p).sum(axis=1), t.sum(axis=1), p.sum(axis=1))


def ground_truth(data_dir: str | Path, progress: Callable[[], None] | None = None) -> PredictionSet:
    """Ground-truth runs of a labelled folder (``DCM/`` + ``outputs_json/``) at each PNG's size.

    Raises:
        HandsegError: the folder is not a labelled data set, or a label file is bad.
    """
    samples = discover(data_dir, labels="required")
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        raise HandsegError("two images share a basename; CSV rows could not tell them apart", data_dir)
    gt = PredictionSet(Path(data_dir))
    for s in samples:
        shape = gt.shapes[s.name] = image_size(s.image_path)
        gt.images.append(s.name)
        gt.runs[s.name] = class_runs(read_polygons(s.label_path), shape, s.label_path)
        if progress is not None:
            progress()
    return gt
