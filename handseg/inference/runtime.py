"""Where inference and training run: the device and the AMP dtype."""

from __future__ import annotations

from handseg.common.distributed import dist_env
from handseg.common.errors import HandsegError


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


def resolve_amp(amp: str, device: str):
    """The autocast dtype for ``--amp`` on ``device`` (``None``: fp32)."""
    import torch

    if amp == "off" or (amp == "auto" and not device.startswith("cuda")):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (device.startswith("cuda") and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16
