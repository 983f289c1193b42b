"""The TTA spec: transform names, parsing ``--transforms`` and the names manifests record (no torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from handseg.common.errors import HandsegError

MERGES = ("mean", "gmean", "max")


@dataclass(frozen=True)
class Transform:
    """A test-time transform: ``flip`` is a ttach flip (``hflip``/``vflip``) or None; ``scale`` a
    factor on the model's input size (resize models) or on the image (sliding-window models)."""

    name: str
    flip: str | None = None
    scale: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.flip is None and self.scale == 1.0


IDENTITY = Transform("identity")


def parse_transforms(spec: str) -> list[Transform]:
    """``"hflip,vflip,scale:0.8,1.2"`` -> identity, hflip, vflip, scale 0.8, scale 1.2.

    The identity is always first. Numbers after ``scale:`` continue the scale list. Scales apply to
    every model: a resize model runs at its size times the scale, a sliding-window model on the image
    scaled by it.
    """
    out = [IDENTITY]
    in_scale = False
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.startswith("scale:"):
            in_scale, token = True, token.split(":", 1)[1]
        if in_scale and _is_number(token):
            s = float(token)
            if not 0.25 <= s <= 4:
                raise HandsegError(f"scale {s} out of range 0.25..4")
            if s != 1.0 and all(t.scale != s for t in out):
                out.append(Transform(f"scale{s:g}", scale=s))
            continue
        in_scale = False
        if token in ("hflip", "vflip"):
            if all(t.flip != token for t in out):
                out.append(Transform(token, flip=token))
        else:
            raise HandsegError(f"unknown TTA transform {token!r}; valid: hflip, vflip, scale:S1,S2,...")
    return out


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def tta_option(transforms: Sequence[str]) -> str:
    """Transform names as manifests record them (``["identity", "hflip", "scale0.8", "scale1.2"]``) -> the
    ``--transforms`` value that makes them again (``"hflip,scale:0.8,1.2"``; ``""``: the identity alone)."""
    flips = [t for t in transforms if t in ("hflip", "vflip")]
    scales = [t[len("scale"):] for t in transforms if t.startswith("scale")]
    unknown = [t for t in transforms if t not in ("identity", "hflip", "vflip") and not t.startswith("scale")]
    if unknown:
        raise HandsegError(f"unknown TTA transform {unknown[0]!r} in the recipe")
    return ",".join(flips + ([f"scale:{','.join(scales)}"] if scales else []))
