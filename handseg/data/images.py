"""X-ray images: PNG and JPEG headers and decoding (8 and 16 bits), DICOM through pydicom, resizing."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.common.errors import HandsegError
from handseg.common.limits import check_image_size
from handseg.common.notices import notice

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"


@dataclass(frozen=True)
class PngHeader:
    height: int
    width: int
    bit_depth: int
    significant_bits: int | None
    """From the ``sBIT`` chunk, when the file declares it (e.g. 12 for a 12-bit X-ray in 16 bits)."""


def read_png_header(data: bytes, path: str | Path, verify: bool = True) -> PngHeader:
    """Parse a PNG's chunks: size, bit depth, declared significant bits; with ``verify`` every chunk's
    CRC is checked and the file must end with ``IEND``, so a corrupt or truncated file is reported
    here in one line (instead of by the decoder's own messages on stderr)."""
    if data[:8] != _PNG_SIGNATURE:
        raise HandsegError("not a PNG file", path)
    pos, header, sbit, ended = 8, None, None, False
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            break
        body = data[pos + 8 : pos + 8 + length]
        if verify and zlib.crc32(kind + body) != int.from_bytes(data[end - 4 : end], "big"):
            raise HandsegError(f"corrupt PNG: the {kind.decode('latin-1')} chunk fails its checksum", path)
        if kind == b"IHDR":
            if length < 13:
                break
            width, height = struct.unpack(">II", body[:8])
            header = (height, width, body[8])
            if not verify:
                break
        elif kind == b"sBIT" and length >= 1:
            sbit = body[0]
        elif kind == b"IEND":
            ended = True
            break
        pos = end
    if header is None:
        raise HandsegError("corrupt PNG: no image header", path)
    if verify and not ended:
        raise HandsegError("truncated PNG: the file ends before its last chunk", path)
    check_image_size(header[0], header[1], path)
    return PngHeader(header[0], header[1], header[2], sbit)


def _jpeg_size(data: bytes, path: str | Path) -> tuple[int, int]:
    """``(H, W)`` from a JPEG's start-of-frame marker; the file must end with its end-of-image marker."""
    if b"\xff\xd9" not in data[-64:]:
        raise HandsegError("truncated JPEG: no end-of-image marker", path)
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            pos += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            check_image_size(height, width, path)
            return height, width
        pos += 2 + length
    raise HandsegError("corrupt JPEG: no frame header", path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise HandsegError("broken link: the image it points to does not exist", path) from None
        raise HandsegError("image not found", path) from None
    except IsADirectoryError:
        raise HandsegError("is a folder, not an image", path) from None
    except OSError as e:
        raise HandsegError(f"cannot read image ({e.strerror or e})", path) from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an X-ray as an ``(H, W)`` uint8 array.

    PNG (8 or 16 bits, grey or colour), JPEG, and DICOM (see :mod:`handseg.data.images`). Colour is
    converted to grey. A 16-bit image is
    scaled by its depth: the ``sBIT`` bits it declares, else the smallest of 8, 10, 12, 14 or 16 bits
    that holds its largest value (a 12-bit X-ray, 0..4095, becomes 0..255; ``>> 8`` would make it
    black); this is said once per run.

    Raises:
        HandsegError: the file is missing, a broken link, larger than :func:`max_pixels`, corrupt
            or truncated, or not a PNG/JPEG/DICOM (or DICOM without the ``dicom`` extra).
    """
    import cv2


    path = Path(path)
    data = _read_bytes(path)
    png = None
    if data[:8] == _PNG_SIGNATURE:
        png = read_png_header(data, path)
    elif data[:2] == _JPEG_SOI:
        _jpeg_size(data, path)
    elif is_dicom(data, path):
        return read_dicom(data, path)
    else:
        raise HandsegError("not a PNG, JPEG or DICOM image", path)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise HandsegError("cannot decode image (corrupt file)", path)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = _from_16_bit(image, png.significant_bits if png is not None else None, path)
    elif image.dtype != np.uint8:
        raise HandsegError(f"unsupported pixel type {image.dtype}", path)
    return image


def _from_16_bit(image: np.ndarray, significant_bits: int | None, path: Path) -> np.ndarray:

    top = int(image.max())
    if significant_bits and 8 <= significant_bits <= 16 and top < 2**significant_bits:
        bits, why = significant_bits, "declared"
    else:
        bits = next(b for b in (8, 10, 12, 14, 16) if top < 2**b)
        why = f"largest value {top}"
    scale = 255.0 / (2**bits - 1)
    notice(("16-bit", bits), f"16-bit images are scaled to 8 bits by their depth: {path.name} read as {bits}-bit "
                             f"({why}), values x {scale:.5g}")
    return np.rint(image.astype(np.float32) * scale).astype(np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image read from its header, without decoding the pixels (or checking the
    rest of the file: :func:`read_image` does that)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except FileNotFoundError:
        if path.is_symlink():
            raise HandsegError("broken link: the image it points to does not exist", path) from None
        raise HandsegError("image not found", path) from None
    if head[:8] == _PNG_SIGNATURE:
        header = read_png_header(head, path, verify=False)
        return header.height, header.width

    if is_dicom(head, path):
        return dicom_size(path)
    return read_image(path).shape  # type: ignore[return-value]


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The one resize of an X-ray to a model's input size, in training and in prediction alike:
    ``(H, W)`` uint8 -> ``(h, w)`` uint8 with area averaging (OpenCV ``INTER_AREA``, which interpolates
    bilinearly when enlarging)."""
    import cv2

    h, w = hw
    if image.shape == (h, w):
        return image
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_AREA)

DICOM_EXTENSIONS = (".dcm", ".dicom")
EXTRA_HINT = "reading DICOM needs the optional extra: pip install 'handseg[dicom]' (pydicom)"


def is_dicom(data: bytes, path: Path) -> bool:
    """A DICOM file by its ``DICM`` marker after the 128-byte preamble, or by its extension (files
    written without the preamble)."""
    return data[128:132] == b"DICM" or path.suffix.lower() in DICOM_EXTENSIONS


def _pydicom():
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        return None
    return pydicom, apply_modality_lut, apply_voi_lut


def _dataset(data: bytes | None, path: Path, header_only: bool = False):
    """The parsed file (``data``, or read from ``path`` when ``None``), its image size checked."""
    lib = _pydicom()
    if lib is None:
        raise HandsegError(EXTRA_HINT, path)
    pydicom = lib[0]
    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else str(path), stop_before_pixels=header_only,
                             force=True)
    except Exception as e:  # pydicom raises many kinds (InvalidDicomError, struct errors, EOF)
        raise HandsegError(f"corrupt DICOM: {str(e).splitlines()[0] if str(e) else type(e).__name__}", path) from None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise HandsegError("DICOM file holds no image (no Rows/Columns)", path)

    check_image_size(int(rows), int(cols), path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise HandsegError(f"DICOM file holds {int(ds.NumberOfFrames)} frames; handseg reads single radiographs",
                           path)
    return ds


def dicom_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from a DICOM header, without reading the pixels."""
    ds = _dataset(None, path, header_only=True)
    return int(ds.Rows), int(ds.Columns)


def _first(value) -> float:
    """The first of a multi-valued DICOM number (``WindowCenter`` may list several windows)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def read_dicom(data: bytes, path: Path) -> np.ndarray:
    """Decode a DICOM radiograph to ``(H, W)`` uint8 as described in the module docstring."""

    ds = _dataset(data, path)
    _, apply_modality_lut, apply_voi_lut = _pydicom()
    try:
        stored = ds.pixel_array
    except Exception as e:  # no pixel data, a compressed syntax without its decoder, truncated data
        raise HandsegError(f"cannot decode DICOM pixels: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           path) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if stored.ndim == 3:
        if photometric.startswith("MONOCHROME"):
            raise HandsegError(f"DICOM pixel array has shape {stored.shape}; expected one grey image", path)
        if stored.dtype != np.uint8:
            raise HandsegError(f"colour DICOM with {stored.dtype} samples; handseg reads grey radiographs and "
                               "8-bit colour", path)
        import cv2  # RGB or YBR colour: pydicom gives RGB by default

        return cv2.cvtColor(np.ascontiguousarray(stored), cv2.COLOR_RGB2GRAY)
    modality = np.asarray(apply_modality_lut(stored, ds))
    values = modality.astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) >= 1:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        # DICOM PS3.3 C.11.2.1.2.1 (LINEAR): the window's bottom and top values
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        how = f"its window (centre {center:g}, width {width:g})"
    elif "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(modality, ds), dtype=np.float64)  # the VOI LUT maps modality values
        low, high = float(values.min()), float(values.max())
        how = "its VOI LUT"
    else:
        low, high = float(values.min()), float(values.max())
        how = f"its own range ({low:g}..{high:g}; the file gives no window)"
    if not np.isfinite(values).all():
        raise HandsegError("DICOM pixel values are not finite after the rescale", path)
    scaled = (values - low) / max(high - low, 1e-12) if high > low else np.zeros_like(values)
    image = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":
        image = 255 - image
        how += ", inverted (MONOCHROME1)"
    notice(("dicom", how.split(" (")[0]), f"DICOM images are read through the modality rescale and {how}, "
                                          f"e.g. {path.name}")
    return image
