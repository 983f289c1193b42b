"""The container behind the mask cache and the probability maps: per-class bounding-box crops.

One 1-D uint8 ``.npy`` per image: an int64 header ``[magic, version, C, H, W]``, then ``C`` records
``[row0, col0, height, width, offset]`` (height 0: the class is empty), then the crops' bytes.
What a crop's bytes are (bits packed 8 a byte, or uint8 values) is up to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEADER, RECORD = 5, 5


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row0, row1, col0, col1)`` (ends exclusive) of the non-zero pixels of a 2-D array, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def pack(blocks: list[tuple[int, np.ndarray, int, int, int]], shape: tuple[int, int], channels: int,
         magic: int) -> np.ndarray:
    """Build the buffer from ``(class, stored uint8 block (h, row bytes), row0, col0, width)`` tuples."""
    header = np.zeros(HEADER + RECORD * channels, dtype=np.int64)
    header[:HEADER] = (magic, 1, channels, shape[0], shape[1])
    parts, offset = [], 0
    for c, block, r0, c0, width in blocks:
        header[HEADER + RECORD * c : HEADER + RECORD * (c + 1)] = (r0, c0, block.shape[0], width, offset)
        parts.append(block.ravel())
        offset += block.size
    return np.concatenate([header.view(np.uint8), *parts])


@dataclass
class CropFile:
    """A parsed buffer; ``block(c, row_bytes)`` returns ``(stored block, row0, col0, width)`` or None."""

    channels: int
    height: int
    width: int
    records: np.ndarray
    data: np.ndarray

    @classmethod
    def parse(cls, buf: np.ndarray, magic: int) -> CropFile:
        """Raises ValueError if ``buf`` is not a crop file with this magic number."""
        if buf.size < HEADER * 8:
            raise ValueError("file too short")
        head = np.asarray(buf[: HEADER * 8]).view(np.int64)
        if head[0] != magic or head[1] != 1:
            raise ValueError("wrong magic number or version")
        channels, height, width = (int(v) for v in head[2:5])
        if not (0 < channels <= 1024 and height > 0 and width > 0):
            raise ValueError(f"bad header ({channels} channels, {width} x {height})")
        end = (HEADER + RECORD * channels) * 8
        if buf.size < end:
            raise ValueError("file too short for its header")
        records = np.asarray(buf[HEADER * 8 : end]).view(np.int64).reshape(channels, RECORD)
        return cls(channels, height, width, records, buf[end:])

    def validate(self, row_bytes) -> None:
        """Check every record against the image and the data (a crafted file must not make a reader
        index outside either). Raises ValueError."""
        r0, c0, h, w, offset = (self.records[:, i] for i in range(RECORD))
        stride = np.array([row_bytes(int(v)) for v in w], dtype=np.int64)
        used = h > 0
        bad = (h < 0) | (used & ((r0 < 0) | (c0 < 0) | (w <= 0) | (r0 + h > self.height) | (c0 + w > self.width)
                                 | (offset < 0) | (offset + h * stride > self.data.size)))
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            raise ValueError(f"record of channel {c} lies outside the image or the file")

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def block(self, c: int, row_bytes) -> tuple[np.ndarray, int, int, int] | None:
        r0, c0, h, w, offset = (int(v) for v in self.records[c])
        if h == 0:
            return None
        stride = row_bytes(w)
        return np.asarray(self.data[offset : offset + h * stride]).reshape(h, stride), r0, c0, w
