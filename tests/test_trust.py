"""Nothing wrong, incomplete or unsafe is produced silently (issue 9): each case against the rule it breaks."""

import json
import os
import pickle
import shutil
import zlib

import cv2
import numpy as np
import pytest
import torch

from handseg.common.constants import CLASS_INDEX, CLASSES
from handseg.common.errors import HandsegError
from handseg.data.cache import build_cache, check_cache_fresh
from handseg.data.images import read_image, resize_image
from handseg.data.labels import class_masks, read_polygons
from handseg.data.layout import discover
from handseg.formats.tta import IDENTITY, Transform
from handseg.inference.predictor import Predictor, to_input
from handseg.models.checkpoint import LAST, ModelCard
from handseg.training.config import TrainConfig
from handseg.training.loop import train


def _cfg(data, out, **kw):
    base = dict(data=data, arch="unet", encoder="resnet18", encoder_weights="none", size=64, epochs=2, batch_size=4,
                workers=0, device="cpu", out=out, lr=3e-3, augment="none")
    base.update(kw)
    return TrainConfig(**base)


def _copy_train(synth_data, tmp_path):
    dest = tmp_path / "data" / "train"
    shutil.copytree(synth_data / "train", dest)
    return dest


# ---------------------------------------------------------------------------------------------- 1: no pickle


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_state_holds_no_pickle_and_a_pickled_file_runs_no_code(synth_data, tmp_path):
    data = _copy_train(synth_data, tmp_path)
    out = tmp_path / "run"
    train(_cfg(data, out, epochs=1), log=lambda *a: None)
    names = sorted(p.name for p in out.iterdir())
    assert "resume-0001.safetensors" in names and not any(n.endswith(".pt") for n in names)
    with open(out / "resume-0001.safetensors", "rb") as f:
        assert b"\x80\x04" not in f.read(64)  # a safetensors header (JSON), not a pickle stream

    marker = tmp_path / "pwned"
    with open(out / "resume-0001.safetensors", "wb") as f:
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(HandsegError, match="not a handseg resume file"):
        train(_cfg(data, out, epochs=2, resume=True), log=lambda *a: None)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- 2: stale cache


def test_an_edited_label_with_an_older_mtime_is_rebuilt_by_prep_and_refused_by_train(synth_data, tmp_path):
    data = _copy_train(synth_data, tmp_path)
    first = build_cache("masks", data, data / "cache")
    assert first.written == len(first.samples)
    label = sorted((data / "outputs_json").rglob("*.json"))[0]
    before = label.stat()
    doc = json.loads(label.read_text())
    doc["annotations"][0]["points"] = [[x + 1, y] for x, y in doc["annotations"][0]["points"]]
    label.write_text(json.dumps(doc))
    os.utime(label, ns=(before.st_atime_ns - 10**12, before.st_mtime_ns - 10**12))  # older than the cache

    samples = discover(data, labels="required")
    with pytest.raises(HandsegError, match=f"{label.name}: changed since the cache was made"):
        check_cache_fresh(data / "cache", samples)
    with pytest.raises(HandsegError, match="changed since the cache was made"):
        train(_cfg(data, tmp_path / "run", epochs=1), log=lambda *a: None)
    again = build_cache("masks", data, data / "cache")
    assert again.written == 1 and again.skipped == len(samples) - 1
    check_cache_fresh(data / "cache", samples)


def test_a_truncated_image_cache_file_is_rebuilt_and_refused(synth_data, tmp_path):
    data = _copy_train(synth_data, tmp_path)
    build_cache("images", data, data / "cache")
    victim = sorted((data / "cache" / "images").rglob("*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(HandsegError, match="changed or truncated since prep"):
        check_cache_fresh(data / "cache", discover(data, labels="required"))
    # an image cache without a mask cache is used by train too (and so checked), not passed over
    with pytest.raises(HandsegError, match=f"{victim.name}: cache file was changed or truncated"):
        train(_cfg(data, tmp_path / "run", epochs=1), log=lambda *a: None)
    assert build_cache("images", data, data / "cache").written == 1


# ---------------------------------------------------------------------------------------------- 3: every image


def test_any_case_of_extension_jpeg_and_broken_links(synth_data, tmp_path):
    data = _copy_train(synth_data, tmp_path)
    pngs = sorted((data / "DCM").rglob("*.png"))
    upper = pngs[0].with_suffix(".PNG")
    pngs[0].rename(upper)
    jpg = pngs[1].with_suffix(".jpg")
    cv2.imwrite(str(jpg), cv2.imread(str(pngs[1]), cv2.IMREAD_GRAYSCALE))
    pngs[1].unlink()
    samples = discover(data, labels="required")  # the labels still find their images
    assert {upper.name, jpg.name} <= {s.name for s in samples}
    assert len(samples) == len(pngs)
    os.symlink(tmp_path / "nowhere.png", data / "DCM" / pngs[2].parent.name / "ghost.png")
    with pytest.raises(HandsegError, match="ghost.png: broken link"):
        discover(data, labels="optional")


def test_any_folder_of_xrays_flat_or_nested(synth_data, tmp_path):
    folder = tmp_path / "xrays"
    for i, s in enumerate(discover(synth_data / "test")):
        dest = folder / ("nested" if i % 2 else "") / s.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.image_path, dest)
    samples = discover(folder, role="test")
    assert sorted(s.name for s in samples) == sorted(s.name for s in discover(synth_data / "test"))
    with pytest.raises(HandsegError, match="no DCM/ folder here"):
        discover(folder, role="train")


# ---------------------------------------------------------------------------------------------- 5: polygons


def _square_doc(extra=None):
    anns = [{"label": c, "points": [[10, 10], [20, 10], [20, 20], [10, 20]]} for c in CLASSES]
    for label, points in (extra or {}).items():
        anns[CLASS_INDEX[label]]["points"] = points
    return {"annotations": anns}


def test_polygons_outside_the_image_or_absurd_are_errors_naming_file_and_class(tmp_path):
    import warnings

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(_square_doc({"Lunate": [[500, 500], [510, 500], [510, 510]]})))
    with pytest.raises(HandsegError, match="outside.json: class Lunate: the polygon lies outside the 64 x 64"):
        class_masks(read_polygons(outside), (64, 64), source=outside)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(_square_doc({"Radius": [[1e20, 10], [20, 10], [20, 20]]})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no numpy warning on the way
        with pytest.raises(HandsegError, match=r"huge.json: annotation 27 \(Radius\) has a coordinate out of range"):
            read_polygons(huge)


# ---------------------------------------------------------------------------------------------- 7: 16-bit


def test_12_bit_values_in_a_16_bit_png_are_scaled_by_their_depth(tmp_path, capsys):
    values = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    path = tmp_path / "xray12.png"
    cv2.imwrite(str(path), values)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.max() == 255
    assert np.array_equal(image, np.rint(values * (255 / 4095)).astype(np.uint8))
    read_image(path)
    err = capsys.readouterr().err
    assert err.count("read as 12-bit") == 1  # said once per run


def test_a_huge_declared_image_is_refused_before_decoding(tmp_path):
    import struct

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    with pytest.raises(HandsegError, match="bomb.png: image is 20000 x 20000 pixels, more than the limit"):
        read_image(path)


# ---------------------------------------------------------------------------------------------- 10, 12, 14: inference


class _RightHandStub(torch.nn.Module):
    """Perfect on right hands only: finger-1 where the image is 200, finger-16 where it is 100 (anywhere),
    Radius where it is 50 but only in the left half (a right hand's radius is on the thumb side)."""

    def forward(self, x):
        grey = x[:, :1] * 0.226 + 0.449  # undo the normalisation: [0, 1]
        out = torch.full((x.shape[0], 29, *x.shape[-2:]), -20.0)
        left = torch.arange(x.shape[-1]) < x.shape[-1] / 2
        for c, value, cond in ((0, 200, None), (15, 100, None), (CLASS_INDEX["Radius"], 50, left)):
            hit = (grey[:, 0] - value / 255).abs() < 0.5 / 255
            if cond is not None:
                hit = hit & cond
            out[:, c] = torch.where(hit, 20.0, -20.0)
        return out


def _hand(side):
    image = np.zeros((64, 64), np.uint8)
    image[10:20, 5:15] = 200  # thumb tip
    image[10:20, 45:55] = 100  # little finger tip
    image[40:50, 8:18] = 50  # radius, thumb side
    truth = np.zeros((29, 64, 64), bool)
    truth[0] = image == 200
    truth[15] = image == 100
    truth[CLASS_INDEX["Radius"]] = image == 50
    if side == "left":
        image, truth = image[:, ::-1].copy(), truth[:, :, ::-1].copy()
    return image, truth


@pytest.mark.parametrize("side", ["right", "left"])
def test_unify_hands_with_hflip_tta_sees_only_right_hands(side):
    card = ModelCard(arch="unet", encoder="stub", size=64, unify_hands=True)
    predictor = Predictor([_RightHandStub()], [card], "cpu")
    image, truth = _hand(side)
    merged = predictor.predict([image], [IDENTITY, Transform("hflip", flip="hflip")])[0]
    assert np.array_equal(merged.numpy() > 0.5, truth)


def test_training_and_prediction_feed_the_model_the_same_pixels(synth_data):
    from handseg.training.dataset import Item, SegmentationDataset

    sample = discover(synth_data / "train", labels="required")[0]
    cfg = TrainConfig(size=96, augment="none")
    x_train, _ = SegmentationDataset([Item(sample, None)], cfg, train=False)[0]
    image = read_image(sample.image_path)
    x_predict = to_input(resize_image(image, (96, 96)), ModelCard(arch="unet", encoder="x", size=96), "cpu")[0]
    assert torch.equal(x_train, x_predict)


def test_scale_tta_reaches_sliding_window_models(monkeypatch):
    import handseg.inference.predictor as inference

    seen = []
    original = inference.sliding_window_logits

    def spy(model, x, *args, **kwargs):
        seen.append(tuple(x.shape[-2:]))
        return original(model, x, *args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_logits", spy)
    card = ModelCard(arch="unet", encoder="stub", size=32, crop=32)
    predictor = Predictor([_RightHandStub()], [card], "cpu")
    image, _ = _hand("right")
    out = predictor.predict([image], [IDENTITY, Transform("scale0.5", scale=0.5), Transform("scale1.5", scale=1.5)])
    assert seen == [(64, 64), (32, 32), (96, 96)]
    assert out[0].shape == (29, 64, 64)


# ---------------------------------------------------------------------------------------------- 11: augmentation


@pytest.mark.parametrize("preset", ["light", "default", "strong"])
def test_augmentation_presets_keep_realistic_intensities(preset, synth_data):
    from handseg.training.dataset import augmenter

    image = resize_image(read_image(discover(synth_data / "train")[0].image_path), (128, 128))
    aug = augmenter(preset, unify_hands=False)
    aug.set_random_seed(0)
    mask = np.zeros((128, 128, 4), np.uint8)
    base_noise = np.abs(cv2.Laplacian(image.astype(np.float32), cv2.CV_32F)).mean()
    for _ in range(40):
        out = aug(image=image, mask=mask)["image"]
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert abs(float(out.mean()) - float(image.mean())) < 64  # brightness limits of 0.15-0.2 x 255
        # high-frequency energy: blur/contrast change it a little; 50-110 grey levels of noise would multiply it
        assert np.abs(cv2.Laplacian(out.astype(np.float32), cv2.CV_32F)).mean() < 3 * base_noise + 10


def test_strong_preset_noise_is_a_few_grey_levels():
    import albumentations as A

    from handseg.training.dataset import augmenter

    noise = next(t for t in augmenter("strong", False).transforms if isinstance(t, A.GaussNoise))
    flat = np.full((256, 256), 128, np.uint8)
    noisy = A.Compose([A.GaussNoise(std_range=noise.std_range, p=1.0)], seed=0)(image=flat)["image"]
    assert 1.5 < float(noisy.astype(np.float32).std()) < 10


# ---------------------------------------------------------------------------------------------- 13: accumulation


def test_accumulation_groups_average_what_they_took_and_the_schedule_counts_them(synth_data, tmp_path):
    from handseg.training.schedule import accumulation_groups

    assert accumulation_groups(5, 2) == [2, 2, 2, 2, 1]
    assert accumulation_groups(4, 4) == [4, 4, 4, 4]
    assert accumulation_groups(3, 1) == [1, 1, 1]
    data = _copy_train(synth_data, tmp_path)
    # 9-10 training images, batch 3, drop_last: 3 batches an epoch; accum 2 -> 2 optimizer steps an epoch
    result = train(_cfg(data, tmp_path / "acc", batch_size=3, accum=2, epochs=3, fold=-1), log=lambda *a: None)
    assert result["steps"] == 3 * 2
    import csv

    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "acc" / "metrics.csv"))]
    assert lrs[-1] == pytest.approx(3e-3 * 0.02, rel=1e-6)  # the floor is reached at the last step, not before
    assert lrs[0] > lrs[-1] * 5


# ---------------------------------------------------------------------------------------------- 17, 20: resume


def test_an_interrupted_save_keeps_last_and_resume_state_one_step(synth_data, tmp_path, monkeypatch):
    import handseg.training.state as state

    data = _copy_train(synth_data, tmp_path)
    out = tmp_path / "run"
    real = state.atomic_write_bytes

    def interrupted(path, payload):
        if path.name == LAST and b'\\"epoch\\": 2,' in payload[:8192]:
            raise KeyboardInterrupt  # Ctrl-C while epoch 2's weights are written
        return real(path, payload)

    monkeypatch.setattr(state, "atomic_write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, out, epochs=3), log=lambda *a: None)
    monkeypatch.setattr(state, "atomic_write_bytes", real)
    from handseg.models.checkpoint import read_card

    assert read_card(out / LAST).epoch == 1  # epoch 2 was lost, not half-saved
    assert not list(out.glob("*.tmp-*"))
    said = []
    result = train(_cfg(data, out, epochs=3, resume=True), log=said.append)
    assert any("epoch 2 of 3 next" in line for line in said)
    assert result["epochs"] == 2 and read_card(out / LAST).epoch == 3
    import csv

    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "metrics.csv"))] == [1, 2, 3]
    assert sorted(p.name for p in out.glob("resume-*")) == ["resume-0003.safetensors"]

    said.clear()
    result = train(_cfg(data, out, epochs=3, resume=True), log=said.append)
    assert result.get("finished") and any("nothing to do" in line and "all 3 epochs" in line for line in said)
    with pytest.raises(HandsegError, match="trained with --arch unet"):
        train(_cfg(data, out, epochs=4, resume=True, arch="fpn"), log=lambda *a: None)


def test_mismatched_or_corrupt_run_files_are_one_line(synth_data, tmp_path):
    data = _copy_train(synth_data, tmp_path)
    out = tmp_path / "run"
    train(_cfg(data, out, epochs=1), log=lambda *a: None)
    (out / "resume-0001.safetensors").rename(out / "resume-0007.safetensors")
    with pytest.raises(HandsegError, match="no resume state for epoch 1"):
        train(_cfg(data, out, epochs=2, resume=True), log=lambda *a: None)
    (out / "resume-0007.safetensors").rename(out / "resume-0001.safetensors")
    (out / LAST).write_bytes((out / LAST).read_bytes()[:1000])
    with pytest.raises(HandsegError, match="last.safetensors: not a safetensors checkpoint"):
        train(_cfg(data, out, epochs=2, resume=True), log=lambda *a: None)


def test_a_malformed_model_card_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from handseg.models.checkpoint import read_card

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"handseg": json.dumps({"arch": "unet", "size": "big"})})
    with pytest.raises(HandsegError, match="bad.safetensors: malformed model card"):
        read_card(path)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"handseg": "{not json"})
    with pytest.raises(HandsegError, match="malformed model card"):
        read_card(path)


# ---------------------------------------------------------------------------------------------- 6: values


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "--epochs: must be at least 1"),
    ("batch_size", 0, "--batch-size: must be at least 1"),
    ("size", "abc", "--size: expected an integer, got 'abc'"),
    ("workers", -3, "--workers: must be at least 0"),
    ("max_steps", 0, "--max-steps: must be at least 1"),
    ("lr", "nan", "--lr: must be a positive number"),
    ("loss", "bce:-1", "must be a positive number"),
    ("class_weights", "1,2", "--class-weights: needs 29 numbers"),
    ("augment", "wild", "--augment: unknown value 'wild'"),
])
def test_the_resolved_training_configuration_is_checked_in_one_place(field, value, message):
    with pytest.raises(HandsegError, match=message.replace("(", r"\(")):
        TrainConfig(**{field: value}).validated()


def test_a_resumed_run_trains_exactly_as_the_uninterrupted_one(synth_data, tmp_path):
    import csv

    data = _copy_train(synth_data, tmp_path)
    kw = dict(epochs=3, augment="default", workers=0)
    train(_cfg(data, tmp_path / "whole", **kw), log=lambda *a: None)
    # interrupted after epoch 2 (as Ctrl-C would; --max-steps would plan a shorter schedule, item 10)

    def interrupt(message):
        if message.startswith("epoch 2:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path / "parts", **kw), log=interrupt)
    train(_cfg(data, tmp_path / "parts", **kw, resume=True), log=lambda *a: None)
    whole = [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / "whole" / "metrics.csv"))]
    parts = [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / "parts" / "metrics.csv"))]
    assert parts == pytest.approx(whole, rel=1e-5)


def test_a_resume_that_fails_before_its_first_checkpoint_leaves_the_manifest_as_it_was(synth_data, tmp_path,
                                                                                       monkeypatch):
    import handseg.training.loop as loop

    data = _copy_train(synth_data, tmp_path)
    out = tmp_path / "run"
    train(_cfg(data, out, epochs=1), log=lambda *a: None)
    manifest = (out / "manifest.json").read_bytes()

    def broken(*args, **kwargs):
        assert (out / "manifest.json").read_bytes() != manifest  # the resumed run had written its own
        raise HandsegError("validation failed")

    monkeypatch.setattr(loop, "validate", broken)
    with pytest.raises(HandsegError, match="validation failed"):
        train(_cfg(data, out, epochs=2, resume=True), log=lambda *a: None)
    assert (out / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in out.glob("resume-*")) == ["resume-0001.safetensors"]
