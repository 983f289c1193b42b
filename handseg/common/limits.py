"""Size limits the environment may set (HANDSEG_MAX_PIXELS, HANDSEG_MAX_ZIP_BYTES), checked before
anything large is decoded or unpacked."""

from __future__ import annotations

import os
from pathlib import Path

from handseg.common.constants import (
    DEFAULT_MAX_PIXELS,
)
from handseg.common.errors import HandsegError


def env_limit(name: str, default: int) -> int:
    """A size limit the environment may raise or lower (``HANDSEG_MAX_PIXELS``, ``HANDSEG_MAX_ZIP_BYTES``):
    its whole-number value, or ``default`` when unset.

    Raises:
        HandsegError: the variable is set to something other than a whole number.
    """
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise HandsegError(f"{name}={value!r} is not a whole number") from None


# ----------------------------------------------------------------------------------------------
# images


def max_pixels() -> int:
    """The largest image handseg reads, in pixels: ``HANDSEG_MAX_PIXELS`` (default 8192 x 8192).

    A small file can declare a huge image (a 429 KB PNG of 20000 x 20000); prediction allocates 29
    float maps of the image's size, so such files are refused before anything is decoded."""

    return env_limit("HANDSEG_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def check_image_size(height: int, width: int, path: str | Path) -> None:
    if height <= 0 or width <= 0:
        raise HandsegError(f"image header gives a size of {width} x {height}", path)
    if height * width > max_pixels():
        raise HandsegError(f"image is {width} x {height} pixels, more than the limit of {max_pixels():,} "
                           "(set HANDSEG_MAX_PIXELS to raise it)", path)
