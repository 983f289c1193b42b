"""Ensembles: hard votes on RLE runs, soft votes on probability maps, class-wise picks.

Probability maps (``predict --probs DIR``) are stored one ``.npy`` per image: a
:mod:`handseg.formats.cropfile` buffer holding each class's bounding box (where p >= 1/255) quantised to
uint8 (p * 255). They are memory-mappable, and a soft vote reads one class's crop at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.common.limits import check_image_size
from handseg.formats import cropfile
from handseg.formats.files import atomic_open, read_json

PROBS_MAGIC = 0x48535042  # "HSPB"
PROBS_INDEX = "index.json"


# ----------------------------------------------------------------------------------------------
# probability maps


def _row_bytes(width: int) -> int:
    return width


def quantise_probs(probs):
    """Probabilities to uint8 ``p * 255`` (rounded half to even, clipped): a numpy array or a torch
    tensor, which stays on its device."""
    q = (probs * 255.0).round().clip(0, 255)
    if isinstance(q, np.ndarray):
        return q.astype(np.uint8)
    return q.byte()  # a torch tensor (this module imports no torch)


def levels_inplace(probs):
    """Probabilities in [0, 1] (a float torch tensor or numpy array) turned, in place, into the levels
    :func:`quantise_probs` stores, ``round(255 p)``, held as floats: no copy of a 29-map image (half a
    gigabyte at 2048 px), and ``.to(uint8)`` of the result equals :func:`quantise_probs` of the input."""
    if isinstance(probs, np.ndarray):
        np.multiply(probs, 255.0, out=probs)
        return np.round(probs, out=probs)
    return probs.mul_(255.0).round_()


def pack_probs(probs: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float probabilities (or uint8 from :func:`quantise_probs`) -> the 1-D uint8 buffer
    described above."""
    q = probs if probs.dtype == np.uint8 else quantise_probs(probs)
    blocks = []
    for c in range(q.shape[0]):
        box = cropfile.bbox(q[c])
        if box is not None:
            r0, r1, c0, c1 = box
            blocks.append((c, q[c, r0:r1, c0:c1], r0, c0, c1 - c0))
    return cropfile.pack(blocks, q.shape[1:], q.shape[0], PROBS_MAGIC)


PROBS_FORMATS = ("packed", "dense")
"""``packed``: each class's bounding box (handseg's own, memory-mappable, a crop at a time);
``dense``: a plain ``(29, H, W)`` uint8 array (p * 255) that ``numpy.load`` reads without handseg."""


class ProbMap:
    """One image's stored probabilities (either format); ``crop(c)`` gives ``(uint8 crop, row0, col0)``
    or None."""

    def __init__(self, path: Path):

        self.path = path
        self.array = None
        try:
            buf = np.load(path, mmap_mode="r", allow_pickle=False)
            if buf.ndim == 3 and buf.dtype == np.uint8:  # a dense map
                self.array = buf
                self.channels, height, width = buf.shape
            elif not (buf.ndim == 1 and buf.dtype == np.uint8):  # neither format: say what a map is
                raise HandsegError(f"not a handseg probability map: it holds a {buf.dtype} array of shape "
                                   f"{' x '.join(map(str, buf.shape)) or 'scalar'}; a handseg map is uint8, "
                                   f"{NUM_CLASSES} x H x W (dense) or a packed crop file (1-D uint8)", path)
            else:
                self.crops = cropfile.CropFile.parse(buf, PROBS_MAGIC)
                self.crops.validate(_row_bytes)
                self.channels, height, width = self.crops.channels, self.crops.height, self.crops.width
        except (ValueError, OSError, EOFError) as e:
            raise HandsegError(f"not a handseg probability map ({str(e).splitlines()[0][:120]})", path) from None
        if self.channels != NUM_CLASSES:
            raise HandsegError(f"probability map has {self.channels} classes, not {NUM_CLASSES}", path)
        check_image_size(height, width, path)
        self._shape = (height, width)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def crop(self, c: int):
        if self.array is not None:
            box = cropfile.bbox(self.array[c])
            if box is None:
                return None
            r0, r1, c0, c1 = box
            return np.asarray(self.array[c, r0:r1, c0:c1]), r0, c0
        got = self.crops.block(c, _row_bytes)
        return None if got is None else got[:3]

    def dense(self) -> np.ndarray:
        """All classes as ``(C, H, W)`` float32 in [0, 1]."""
        if self.array is not None:
            return np.asarray(self.array, dtype=np.float32) / 255.0
        out = np.zeros((self.channels, *self.shape), dtype=np.float32)
        for c in range(self.channels):
            got = self.crop(c)
            if got is not None:
                crop, r0, c0 = got
                out[c, r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop / 255.0
        return out


def write_probs(path: Path, quantised: np.ndarray, fmt: str = "packed") -> None:
    """Write one image's ``(29, H, W)`` uint8 map (see :func:`quantise_probs`) atomically, in ``fmt``."""

    if fmt not in PROBS_FORMATS:
        raise HandsegError(f"unknown probability format {fmt!r}; valid: {', '.join(PROBS_FORMATS)}")
    with atomic_open(path, "wb") as f:
        np.save(f, pack_probs(quantised) if fmt == "packed" else np.ascontiguousarray(quantised), allow_pickle=False)


def probs_name(image_name: str) -> str:
    return Path(image_name).stem + ".npy"


def read_probs_index(folder: Path) -> list[str]:
    """The image names of a probability folder, in submission order."""
    index = Path(folder) / PROBS_INDEX
    if not index.is_file():
        raise HandsegError(f"not a probability folder (no {PROBS_INDEX}; made by `predict --probs`)", folder)
    doc = read_json(index, "probability index")
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise HandsegError('no "images" list (made by `predict --probs`?)', index)
    odd = next((n for n in images if not (isinstance(n, str) and n)), None)
    if odd is not None or len(set(images)) != len(images):
        what = f"{odd!r:.40} is not an image name" if odd is not None else "an image is listed twice"
        raise HandsegError(f'"images" must list each image name once as text: {what}', index)
    for name in images:
        if not (Path(folder) / probs_name(name)).is_file():
            raise HandsegError(f"probability map for {name} is missing", folder)
    return images
