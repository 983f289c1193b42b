"""Sliding windows: a crop-trained model run over a full-resolution image in overlapping windows, their
logits blended with a Gaussian weight (highest at each window's centre)."""

from __future__ import annotations


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


def sliding_window_logits(model, x, window: int, stride: int | None = None, batch: int = 4, dtype=None,
                          pad: list[float] | None = None):
    """Logits of a full-resolution image from overlapping ``window`` crops, Gaussian-blended.

    Args:
        x: ``(1, C, H, W)`` input; images smaller than the window are padded at the bottom and right.
        batch: windows per forward pass.
        pad: the value of each of the ``C`` channels beyond the image
            (:func:`~handseg.inference.predictor.pad_values`: as in training); default 0.
    Returns:
        ``(1, K, H, W)`` float32 logits.
    """
    import torch

    stride = stride or window // 2
    _, _, h, w = x.shape
    ph, pw = max(window - h, 0), max(window - w, 0)
    if ph or pw:
        fill = torch.as_tensor(pad if pad is not None else [0.0] * x.shape[1], dtype=x.dtype, device=x.device)
        padded = fill.view(1, -1, 1, 1).expand(1, x.shape[1], h + ph, w + pw).clone()
        padded[..., :h, :w] = x
        x = padded
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
