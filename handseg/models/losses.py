"""Multi-label segmentation losses, from one registry, combinable with weights.

Every loss takes logits and targets of shape ``(N, C, H, W)`` and optional per-class weights
``(C,)``; a spec such as ``bce:0.5,dice:0.5`` builds a weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from handseg.common.errors import HandsegError

SMOOTH = 1.0


def _class_mean(per_class, class_weights):
    if class_weights is None:
        return per_class.mean()
    return (per_class * class_weights).sum() / class_weights.sum()


def bce_loss(logits, target, class_weights=None):
    import torch.nn.functional as F

    per_class = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(0, 2, 3))
    return _class_mean(per_class, class_weights)


def dice_loss(logits, target, class_weights=None):
    p = logits.sigmoid()
    inter = (p * target).sum(dim=(0, 2, 3))
    total = p.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    return _class_mean(1.0 - (2.0 * inter + SMOOTH) / (total + SMOOTH), class_weights)


def jaccard_loss(logits, target, class_weights=None):
    p = logits.sigmoid()
    inter = (p * target).sum(dim=(0, 2, 3))
    union = p.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3)) - inter
    return _class_mean(1.0 - (inter + SMOOTH) / (union + SMOOTH), class_weights)


def focal_loss(logits, target, class_weights=None, gamma: float = 2.0, alpha: float = 0.25):
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = (-bce).exp()
    a_t = alpha * target + (1 - alpha) * (1 - target)
    per_class = (a_t * (1 - p_t) ** gamma * bce).mean(dim=(0, 2, 3))
    return _class_mean(per_class, class_weights)


def boundary_loss(logits, target, class_weights=None, width: int = 5, boost: float = 4.0):
    """BCE weighted towards each bone's boundary band (the morphological gradient of the target),
    where neighbouring bones meet and Dice is won or lost."""
    import torch.nn.functional as F

    pad = width // 2
    dilated = F.max_pool2d(target, width, stride=1, padding=pad)
    eroded = -F.max_pool2d(-target, width, stride=1, padding=pad)
    weight = 1.0 + boost * (dilated - eroded)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per_class = (bce * weight).sum(dim=(0, 2, 3)) / weight.sum(dim=(0, 2, 3))
    return _class_mean(per_class, class_weights)


LOSSES: dict[str, Callable] = {
    "bce": bce_loss,
    "dice": dice_loss,
    "focal": focal_loss,
    "jaccard": jaccard_loss,
    "iou": jaccard_loss,
    "boundary": boundary_loss,
}


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"bce:0.5,dice:0.5"`` -> ``[("bce", 0.5), ("dice", 0.5)]``; a bare name has weight 1.

    Raises:
        HandsegError: unknown loss name (the message lists the valid ones) or a bad weight.
    """
    terms = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip().lower()
        if name not in LOSSES:
            raise HandsegError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise HandsegError(f"loss weight {weight!r} in {spec!r} is not a number") from None
        if not (math.isfinite(w) and w > 0):
            raise HandsegError(f"loss weight {weight!r} in {spec!r} must be a positive number")
        terms.append((name, w))
    if not terms:
        raise HandsegError(f"empty loss spec {spec!r}")
    return terms


def build_loss(spec: str, class_weights=None) -> Callable:
    """A callable ``loss(logits, target)`` for the spec, with optional per-class weights ``(C,)``."""
    terms = [(LOSSES[name], w) for name, w in parse_loss_spec(spec)]

    def loss(logits, target):
        weights = class_weights.to(logits.device) if class_weights is not None else None
        return sum(w * fn(logits.float(), target.float(), weights) for fn, w in terms)

    return loss
