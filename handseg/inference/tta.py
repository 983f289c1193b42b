"""Applying TTA transforms with ttach."""

from __future__ import annotations

from handseg.common.errors import HandsegError


def _ttach_flip(name: str):
    import ttach

    flips = {"hflip": ttach.HorizontalFlip, "vflip": ttach.VerticalFlip}
    if name not in flips:
        raise HandsegError(f"unknown flip {name!r}; valid: {', '.join(flips)}")
    return flips[name]()
