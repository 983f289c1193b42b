"""Inference: from an X-ray to per-class probabilities at the image's own size.

A model trained on resized images sees the image resized to its size, and its logits are resized
back bilinearly (the leaderboard's convention) before the sigmoid. A model trained on crops runs as
a sliding window over the full image with Gaussian blending. With ``unify_hands`` the model knows
right hands only: a left hand (thumb right of the little finger in the first pass) is mirrored,
predicted and mirrored back. Several checkpoints are averaged in probability space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from handseg.core.checkpoint import ModelCard, load_checkpoint
from handseg.core.distributed import dist_env
from handseg.core.errors import HandsegError


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HandsegError(f"--device {device} asked for, but CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise HandsegError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    d = dist_env()
    if device == "cuda" and d.world > 1:
        device = f"cuda:{d.local_rank}"  # under torchrun: one GPU per process
    return device


def amp_dtype(device: str):
    """bf16 where the GPU supports it, else fp16; ``None`` (fp32) on CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def to_input(image: np.ndarray, card: ModelCard, device: str):
    """``(H, W)`` uint8 -> normalised ``(1, C, H, W)`` float tensor on ``device``."""
    import torch

    x = torch.from_numpy(np.array(image, copy=True)).to(device, non_blocking=True).float().div_(255.0)
    x = (x - card.norm["mean"]) / card.norm["std"]
    return x.expand(card.in_channels, *x.shape).unsqueeze(0)


def _round32(v: float) -> int:
    return max(32, int(round(v / 32.0)) * 32)


def resize_logits(model, x, size: int | tuple[int, int], out_hw: tuple[int, int], dtype=None, post=None):
    """Run ``model`` on ``x`` resized to ``size`` and resize the logits back to ``out_hw`` bilinearly.

    ``post`` (e.g. undoing a test-time flip) is applied to the logits at the model's resolution,
    before the resize, where it is cheapest."""
    import torch
    import torch.nn.functional as F

    hw = (size, size) if isinstance(size, int) else size
    xin = F.interpolate(x, size=hw, mode="bilinear", align_corners=False) if tuple(x.shape[-2:]) != hw else x
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(xin)
    logits = logits.float()
    if post is not None:
        logits = post(logits)
    if tuple(logits.shape[-2:]) != tuple(out_hw):
        logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
    return logits


def gaussian_window(size: int, sigma_scale: float = 0.125):
    import torch

    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * (size * sigma_scale) ** 2))
    w = torch.outer(g, g)
    return (w / w.max()).clamp_min(1e-3)


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride)) + [length - window]
    return sorted(set(starts))


def sliding_window_logits(model, x, window: int, stride: int | None = None, batch: int = 4, dtype=None):
    """Logits of a full-resolution image from overlapping ``window`` crops, Gaussian-blended.

    Args:
        x: ``(1, C, H, W)`` input; images smaller than the window are padded.
    Returns:
        ``(1, K, H, W)`` float32 logits.
    """
    import torch
    import torch.nn.functional as F

    stride = stride or window // 2
    _, _, h, w = x.shape
    ph, pw = max(window - h, 0), max(window - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="constant", value=float(x.min()))
    H, W = x.shape[-2:]
    weight = gaussian_window(window).to(x.device)
    acc = None
    norm = torch.zeros((1, 1, H, W), device=x.device)
    boxes = [(r, c) for r in _starts(H, window, stride) for c in _starts(W, window, stride)]
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        crops = torch.cat([x[..., r : r + window, c : c + window] for r, c in chunk])
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(crops).float()
        if acc is None:
            acc = torch.zeros((1, out.shape[1], H, W), device=x.device)
        for (r, c), o in zip(chunk, out):
            acc[0, :, r : r + window, c : c + window] += o * weight
            norm[0, 0, r : r + window, c : c + window] += weight
    return (acc / norm)[..., :h, :w]


def model_logits(model, card: ModelCard, x, out_hw: tuple[int, int], dtype=None, scale: float = 1.0,
                 batch: int = 4, post=None):
    """Logits at ``out_hw`` of one model for input ``x`` (resize or sliding window per the card),
    with ``post`` applied to the model's output (see :func:`resize_logits`)."""
    if card.crop:
        out = sliding_window_logits(model, x, card.crop, batch=batch, dtype=dtype)
        return out if post is None else post(out)
    return resize_logits(model, x, _run_side(model, card.size * scale), out_hw, dtype, post)


def _run_side(model, side: float) -> int:
    """The input side nearest ``side`` that the model takes: its encoder's multiple (and only its own
    size for encoders built for one size, see :class:`~handseg.core.models.ModelPlan`)."""
    from handseg.core.models import model_plan

    plan = model_plan(model)
    return _round32(side) if plan is None else plan.run_side(side)


@dataclass
class Predictor:
    """One or more checkpoints ready to predict; probabilities are averaged over them."""

    models: list
    cards: list[ModelCard]
    device: str
    dtype: object = None
    batch: int = 4
    """Sliding-window crops per forward pass (crop-trained models)."""

    @classmethod
    def load(cls, paths, device: str = "auto", amp: bool = True, batch: int = 4) -> Predictor:
        import torch

        device = pick_device(device)
        models, cards = [], []
        for p in paths:
            model, card = load_checkpoint(p, device)
            if device.startswith("cuda"):
                model = model.to(memory_format=torch.channels_last)
            models.append(model)
            cards.append(card)
        classes = {tuple(c.classes) for c in cards}
        if len(classes) > 1:
            raise HandsegError("checkpoints predict different class lists; they cannot be averaged")
        return cls(models, cards, device, amp_dtype(device) if amp else None, batch)

    @property
    def thresholds(self) -> np.ndarray:
        """Per-class thresholds: the mean of the checkpoints' own."""
        return np.mean([c.thresholds for c in self.cards], axis=0)

    def probs(self, image: np.ndarray, flip: str | None = None, scale: float = 1.0):
        """``(H, W)`` uint8 image -> ``(K, H, W)`` probabilities (a tensor on the device) at the
        image's size, averaged over the checkpoints.

        Args:
            flip: a test-time flip applied through ttach (``"hflip"`` or ``"vflip"``) and undone on
                the output.
            scale: factor on each model's input size (resize models only).
        """
        import torch

        total = None
        with torch.inference_mode():
            for model, card in zip(self.models, self.cards):
                p = self._logits(model, card, image, flip, scale).sigmoid_()
                if card.unify_hands and _is_left_hand(p[0]):
                    p = torch.flip(self._logits(model, card, image[:, ::-1], flip, scale).sigmoid_(), dims=[-1])
                total = p if total is None else total.add_(p)
        return total[0] if len(self.models) == 1 else total[0].div_(len(self.models))

    def _logits(self, model, card: ModelCard, image: np.ndarray, flip: str | None, scale: float):
        x = to_input(image, card, self.device)
        if flip is None:
            return model_logits(model, card, x, image.shape, self.dtype, scale, self.batch)
        transform = _ttach_flip(flip)
        return model_logits(model, card, transform.apply_aug_image(x, apply=True), image.shape, self.dtype, scale,
                            self.batch, post=lambda out: transform.apply_deaug_mask(out, apply=True))


def _is_left_hand(probs) -> bool:
    """:func:`~handseg.core.data.hand_side` of a prediction, on its device: the thumb tip (finger-1)
    right of the little-finger tip (finger-16). Only two numbers cross to the host."""
    import torch

    from handseg.core.constants import CLASS_INDEX
    from handseg.core.data import side_of

    masks = probs[[CLASS_INDEX["finger-1"], CLASS_INDEX["finger-16"]]] > 0.5
    cols = masks.sum(dim=1, dtype=torch.float64)  # (2, W) pixels per column
    counts = cols.sum(dim=1)
    if bool((counts == 0).any()):
        return False
    xs = torch.arange(cols.shape[1], dtype=torch.float64, device=cols.device)
    thumb_x, little_x = ((cols @ xs) / counts).tolist()
    return side_of(thumb_x, little_x) == "left"


def _ttach_flip(name: str):
    import ttach

    flips = {"hflip": ttach.HorizontalFlip, "vflip": ttach.VerticalFlip}
    if name not in flips:
        raise HandsegError(f"unknown flip {name!r}; valid: {', '.join(flips)}")
    return flips[name]()


def binarize(probs: np.ndarray, thresholds) -> np.ndarray:
    """``(K, H, W)`` probabilities -> bool masks with one threshold per class."""
    t = np.asarray(thresholds, dtype=np.float32).reshape(-1, 1, 1)
    return probs > t


def masks_to_runs(masks) -> list:
    """Runs (see :mod:`handseg.core.rle`) of each ``(K, H, W)`` bool mask of a tensor, computed where
    the tensor lives: on a GPU only the run boundaries are copied to the host. Equal to
    :func:`~handseg.core.rle.mask_to_runs` of each mask."""
    import torch

    k = masks.shape[0]
    flat = masks.reshape(k, -1)
    edge = torch.zeros((k, 1), dtype=torch.bool, device=flat.device)
    padded = torch.cat([edge, flat, edge], dim=1)
    # a change between neighbours is a run's first pixel or one past its last; they alternate
    cls, pos = (padded[:, 1:] != padded[:, :-1]).nonzero(as_tuple=True)
    counts = torch.bincount(cls, minlength=k).cpu().numpy()
    pos = pos.cpu().numpy().astype(np.int64, copy=False)
    runs, offset = [], 0
    for n in counts:
        p = pos[offset : offset + n]
        offset += n
        runs.append((p[0::2], p[1::2] - p[0::2]))
    return runs
