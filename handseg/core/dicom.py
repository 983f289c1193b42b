"""DICOM X-rays (``.dcm``/``.dicom``), read as a radiologist's viewer shows them, through the optional
``handseg[dicom]`` extra (pydicom).

The stored values go through the modality transform (``RescaleSlope``/``RescaleIntercept`` or a
modality LUT), then the file's own display window: its first ``WindowCenter``/``WindowWidth`` pair
(the DICOM linear function), else its VOI LUT, else the image's own range. ``MONOCHROME1`` images
(bone dark) are inverted so that bone is bright, as in the competition's PNGs. The result is the
``(H, W)`` uint8 image every other reader gives; how each file was windowed is said once per kind.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from handseg.core.errors import HandsegError

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
    from handseg.core.data import check_image_size

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
    from handseg.core.notices import notice

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
