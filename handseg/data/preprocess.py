"""Deterministic pre-processing of every X-ray a model sees (``train --preprocess``), the one home of it.

The spec is recorded in the model card (``preprocess``), so every path that turns an image into
network input (training samples, validation, ``predict``, ``tta``, out-of-fold maps, a cascade's
stage 1, a model zip) applies exactly what the model was trained with. It runs on the uint8 image at
full resolution, after a ``--unify-hands`` mirror and before any resize, crop or sliding window.

Specs: ``clahe[:CLIP[:TILE]]`` (OpenCV CLAHE, clip limit ``CLIP`` (default 2), ``TILE x TILE`` tiles
(default 8)). ``None`` or ``""``: the image as read.
"""

from __future__ import annotations

import math

import numpy as np

from handseg.common.errors import HandsegError

CLAHE_CLIP, CLAHE_TILE = 2.0, 8
MAX_TILE = 64


def parse_preprocess(spec: str | None, flag: str = "--preprocess") -> str | None:
    """The canonical form of a spec (``"clahe"`` -> ``"clahe:2:8"``), or None for none.

    Raises:
        HandsegError: an unknown transform, or a clip limit / tile count out of range.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if not isinstance(spec, str):
        raise HandsegError(f"{flag}: expected clahe[:CLIP[:TILE]], got {spec!r}")
    parts = spec.strip().lower().split(":")
    if parts[0] != "clahe" or len(parts) > 3:
        raise HandsegError(f"{flag}: unknown pre-processing {spec!r}; valid: clahe[:CLIP[:TILE]] (e.g. clahe:2:8)")
    try:
        clip = float(parts[1]) if len(parts) > 1 else CLAHE_CLIP
        tile = float(parts[2]) if len(parts) > 2 else float(CLAHE_TILE)
    except ValueError:
        raise HandsegError(f"{flag}: {spec!r}: CLIP and TILE must be numbers (e.g. clahe:2:8)") from None
    if not (math.isfinite(clip) and clip > 0):
        raise HandsegError(f"{flag}: {spec!r}: the clip limit must be a positive number")
    if not (tile.is_integer() and 1 <= tile <= MAX_TILE):
        raise HandsegError(f"{flag}: {spec!r}: the tile count must be an integer from 1 to {MAX_TILE}")
    return f"clahe:{clip:g}:{int(tile)}"


def preprocess_image(image: np.ndarray, spec: str | None) -> np.ndarray:
    """``(H, W)`` uint8 -> ``(H, W)`` uint8 after the spec's transform (the image itself for none)."""
    spec = parse_preprocess(spec)
    if spec is None:
        return image
    import cv2

    _, clip, tile = spec.split(":")
    clahe = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(tile), int(tile)))
    return clahe.apply(np.ascontiguousarray(image, dtype=np.uint8))
