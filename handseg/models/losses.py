"""Multi-label segmentation losses, from one registry, combinable with weights: smp's Dice, Jaccard,
focal, Tversky and Lovász losses, plus BCE and our boundary-weighted BCE.

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


def _smp(name: str):
    """One of segmentation_models_pytorch's losses in multi-label mode, built once (they hold no state
    that training changes)."""
    from segmentation_models_pytorch import losses as smp_losses

    if name not in _SMP_CACHE:
        multilabel = smp_losses.MULTILABEL_MODE
        _SMP_CACHE[name] = {
            "dice": lambda: smp_losses.DiceLoss(multilabel, from_logits=True, smooth=SMOOTH),
            "jaccard": lambda: smp_losses.JaccardLoss(multilabel, from_logits=True, smooth=SMOOTH),
            "focal": lambda: smp_losses.FocalLoss(multilabel, alpha=0.25, gamma=2.0),
            "tversky": lambda: smp_losses.TverskyLoss(multilabel, from_logits=True, smooth=SMOOTH, alpha=0.3,
                                                      beta=0.7),
            "lovasz": lambda: smp_losses.LovaszLoss(smp_losses.BINARY_MODE, from_logits=True),
        }[name]()
    return _SMP_CACHE[name]


_SMP_CACHE: dict = {}


def _per_class(name: str, logits, target, class_weights):
    """smp's loss of each class on its own channel, then the (weighted) class mean. Without weights the
    loss runs on all channels at once where smp's own multi-label mean is that same class mean."""
    fn = _smp(name)
    if class_weights is None and name != "lovasz":
        return fn(logits, target)
    import torch

    per_class = torch.stack([fn(logits[:, c:c + 1], target[:, c:c + 1]) for c in range(logits.shape[1])])
    return _class_mean(per_class, class_weights)


def dice_loss(logits, target, class_weights=None):
    """smp's soft Dice (smooth 1; a class absent from the whole batch adds no loss)."""
    return _per_class("dice", logits, target, class_weights)


def jaccard_loss(logits, target, class_weights=None):
    """smp's soft Jaccard (IoU), smooth 1."""
    return _per_class("jaccard", logits, target, class_weights)


def focal_loss(logits, target, class_weights=None):
    """smp's focal loss (gamma 2, alpha 0.25), averaged over pixels and classes."""
    return _per_class("focal", logits, target, class_weights)


def tversky_loss(logits, target, class_weights=None):
    """smp's Tversky loss with alpha 0.3, beta 0.7: missed bone pixels cost more than extra ones."""
    return _per_class("tversky", logits, target, class_weights)


def lovasz_loss(logits, target, class_weights=None):
    """smp's Lovász hinge, a surrogate of the Jaccard index, on each class's channel."""
    return _per_class("lovasz", logits, target, class_weights)


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
    "tversky": tversky_loss,
    "lovasz": lovasz_loss,
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
