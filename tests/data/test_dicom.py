"""DICOM X-rays through the optional ``handseg[dicom]`` extra: the modality rescale, the file's window,
MONOCHROME1 inversion, and predict on a folder of ``.dcm`` files; without pydicom, one line."""

import sys

import numpy as np
import pytest

from handseg.common.errors import HandsegError
from handseg.data.images import image_size, read_image
from tests.conftest import run_cli

pydicom = pytest.importorskip("pydicom")


def write_dicom(path, pixels: np.ndarray, bits_stored: int = 12, **tags) -> None:
    """A single-frame grey radiograph (explicit VR little endian) holding ``pixels`` (uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = tags.pop("PhotometricInterpretation", "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture(scope="module")
def trained_checkpoint(synth_data, tmp_path_factory):
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    out = tmp_path_factory.mktemp("dicom") / "run"
    train(TrainConfig(data=synth_data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64,
                      epochs=1, batch_size=4, workers=0, device="cpu", out=out, augment="none", lr=3e-3),
          log=lambda *a: None)
    return out


@pytest.fixture
def ramp():
    """A 12-bit ramp 0..4095 over 64 x 64 pixels."""
    return (np.arange(64 * 64).reshape(64, 64) * 4095 // (64 * 64 - 1)).astype(np.uint16)


def test_window_maps_the_files_display_range_to_8_bits(tmp_path, ramp):
    path = tmp_path / "a.dcm"
    write_dicom(path, ramp, WindowCenter=2048, WindowWidth=1024)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (64, 64)
    assert image_size(path) == (64, 64)
    # values at or below the window's bottom (1536) are black, at or above its top (2559) white
    assert (image[ramp <= 1535] == 0).all() and (image[ramp >= 2560] == 255).all()
    inside = (ramp > 1600) & (ramp < 2500)
    expected = np.rint((ramp[inside] - (2048 - 0.5 - 511.5)) / 1023 * 255)
    assert np.abs(image[inside].astype(int) - expected).max() <= 1


def test_rescale_then_own_range_and_monochrome1_inverted(tmp_path, ramp):
    plain, inverted = tmp_path / "plain.dcm", tmp_path / "inv.DCM"
    write_dicom(plain, ramp, RescaleSlope=2, RescaleIntercept=-1000)
    write_dicom(inverted, ramp, PhotometricInterpretation="MONOCHROME1")
    a, b = read_image(plain), read_image(inverted)
    assert a.min() == 0 and a.max() == 255  # no window: the image's own range after the rescale
    assert np.abs(a.astype(int) - np.rint(ramp / 4095 * 255)).max() <= 1  # a linear rescale keeps the ramp
    assert np.array_equal(b, 255 - a)  # MONOCHROME1: bone dark in the file, bright here


def test_corrupt_multiframe_and_missing_extra_are_one_line(tmp_path, ramp, monkeypatch):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff")
    with pytest.raises(HandsegError, match="bad.dcm"):
        read_image(bad)
    frames = tmp_path / "frames.dcm"
    write_dicom(frames, np.concatenate([ramp, ramp]), NumberOfFrames=2)
    with pytest.raises(HandsegError, match="2 frames"):
        read_image(frames)
    good = tmp_path / "good.dcm"
    write_dicom(good, ramp)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the extra were not installed
    with pytest.raises(HandsegError, match=r"handseg\[dicom\]") as err:
        read_image(good)
    assert "good.dcm" in str(err.value) and "\n" not in str(err.value)


def test_predict_reads_a_folder_of_dicom_files(synth_data, trained_checkpoint, tmp_path, capsys):
    """The test split's PNGs re-stored as 8-bit-in-16 DICOMs with a full-range window predict the same
    masks as the PNGs themselves."""
    import csv
    import json

    from handseg.data.layout import discover

    pngs, dicoms = tmp_path / "pngs", tmp_path / "dicoms" / "nested"
    pngs.mkdir()
    dicoms.mkdir(parents=True)
    for s in discover(synth_data / "test")[:2]:
        pixels = read_image(s.image_path)
        (pngs / s.image_path.name).write_bytes(s.image_path.read_bytes())
        write_dicom(dicoms / f"{s.image_path.stem}.dcm", pixels, bits_stored=8, WindowCenter=128, WindowWidth=256)
    low = tmp_path / "low.json"
    low.write_text(json.dumps([0.05] * 29))  # an undertrained model: a low threshold so that masks are not empty
    rows = {}
    for name, folder in (("png", pngs), ("dcm", tmp_path / "dicoms")):
        code, _, err = run_cli(["predict", trained_checkpoint, "--data", folder, "-o", tmp_path / f"{name}.csv",
                                "--device", "cpu", "--thresholds", low], capsys)
        assert code == 0, err
        rows[name] = [(r["image_name"].rsplit(".", 1)[0], r["class"], r["rle"])
                      for r in csv.DictReader(open(tmp_path / f"{name}.csv"))]
    assert len(rows["dcm"]) == 2 * 29 and rows["dcm"] == rows["png"]
    assert any(rle for _, _, rle in rows["dcm"])  # not a comparison of empty masks


def test_a_voi_lut_is_applied_when_the_file_has_no_window(tmp_path, ramp):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    curve = np.sqrt(np.arange(4096) / 4095) * 65535  # a display curve: dark values spread out
    lut.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first value, bits
    lut.add_new(0x00283006, "US", curve.astype(np.uint16).tolist())  # LUT Data
    path = tmp_path / "lut.dcm"
    write_dicom(path, ramp, VOILUTSequence=Sequence([lut]))
    image = read_image(path)
    expected = np.rint(np.sqrt(ramp / 4095) * 255)
    assert image.min() == 0 and image.max() == 255
    assert np.abs(image.astype(int) - expected).max() <= 1
