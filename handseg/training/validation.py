"""Validation during training: the leaderboard Dice of the fold, exactly as ``predict`` would score it."""

from __future__ import annotations

import numpy as np

from handseg.common.constants import DICE_EPS, NUM_CLASSES
from handseg.common.distributed import Dist, all_reduce_sum
from handseg.data.labels import BoneCrops
from handseg.inference.predictor import Predictor
from handseg.models.checkpoint import ModelCard
from handseg.training.dataset import Item, load_item_crops


def dice_sums_from_crops(pred, crops: BoneCrops):
    """Leaderboard Dice per class of ``pred`` ``(K, H, W)`` bool (a tensor, on any device) against
    ground truth given as bone crops: ``(K,)`` float64 on ``pred``'s device. The truth is never made
    at full size: each class is compared inside its bounding box only."""
    import torch


    device = pred.device
    pred_area = pred.sum(dim=(1, 2), dtype=torch.float64)
    inter = torch.zeros(pred.shape[0], dtype=torch.float64, device=device)
    truth_area = torch.zeros(pred.shape[0], dtype=torch.float64, device=device)
    for c, crop, r0, c0 in crops:
        t = torch.from_numpy(np.ascontiguousarray(crop)).to(device, non_blocking=True)
        h, w = t.shape
        inter[c] += (pred[c, r0 : r0 + h, c0 : c0 + w] & t).sum(dtype=torch.float64)
        truth_area[c] += t.sum(dtype=torch.float64)
    return (2.0 * inter + DICE_EPS) / (truth_area + pred_area + DICE_EPS)


def validate(model, card: ModelCard, items: list[Item], device: str, dtype, d: Dist, batch: int = 4,
             context=None) -> np.ndarray:
    """Leaderboard Dice per class over the validation items, at each image's full size: ``(29,)``.

    Predictions go through :class:`~handseg.inference.predictor.Predictor`, exactly as ``predict`` makes
    them (with ``unify_hands``, the hand's side comes from the prediction, never from the labels),
    ``batch`` images per forward pass; images and labels come from the prep cache; the Dice is summed
    on the device (a cascade's stage 2 gets the images' stage-1 maps from ``context``, out-of-fold
    where stage 1 provides them), and under torchrun
    each rank validates its share and the sums are reduced.
    """
    import torch


    model.eval()
    predictor = Predictor([model], [card], device, dtype, batch)
    thresholds = torch.as_tensor(card.thresholds, dtype=torch.float32, device=device).view(-1, 1, 1)
    sums = torch.zeros(NUM_CLASSES + 1, dtype=torch.float64, device=device)
    mine = items[d.rank :: d.world]
    group = 1 if card.crop else max(1, batch)  # several images per forward pass (sliding windows batch windows)
    for start in range(0, len(mine), group):
        chunk = mine[start : start + group]
        loaded = [load_item_crops(item) for item in chunk]
        contexts = None
        if context is not None:
            contexts = [context.full(item.sample.name, image.shape) for item, (image, _) in zip(chunk, loaded)]
        probs = predictor.predict([image for image, _ in loaded], contexts=contexts)
        for (_, crops), p in zip(loaded, probs):
            sums[:NUM_CLASSES] += dice_sums_from_crops(p > thresholds, crops)
            sums[NUM_CLASSES] += 1
        del probs
    all_reduce_sum(sums, d)
    model.train()
    count = max(float(sums[NUM_CLASSES]), 1.0)
    return (sums[:NUM_CLASSES] / count).cpu().numpy()
