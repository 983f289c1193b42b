"""predict / tta / vote / pseudo against direct computations."""

import json

import numpy as np
import pytest
import torch

from handseg.common.errors import HandsegError
from handseg.data.images import read_image
from handseg.data.layout import discover
from handseg.ensemble.votes import hard_vote, soft_vote
from handseg.formats.probs import ProbMap, pack_probs
from handseg.formats.rle import rle_decode
from handseg.formats.submission import read_predictions, write_predictions
from handseg.models.checkpoint import load_checkpoint
from handseg.training.config import TrainConfig
from handseg.training.loop import train
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = []
    for fold in (0, 1):
        cfg = TrainConfig(data=synth_data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64,
                          epochs=1, batch_size=4, workers=0, device="cpu", out=base / f"f{fold}", fold=fold,
                          augment="none")
        train(cfg, log=lambda *a: None)
        out.append(base / f"f{fold}")
    return out


def test_predict_rows_order_and_fold_average(runs, synth_data, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    code, _, err = run_cli(["predict", *runs, "--data", synth_data / "test", "-o", out, "--probs", tmp_path / "probs",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    lines = out.read_text().splitlines()
    samples = discover(synth_data / "test")
    assert len(lines) == 1 + 29 * len(samples)
    assert [ln.split(",")[0] for ln in lines[1::29]] == [s.name for s in samples]  # basenames, sorted by ID/path
    # direct computation: mean of the two models' sigmoid(resize_back(model(resize(x)))) > 0.5, where the
    # input resize is training's (cv2 INTER_AREA on the uint8 image) and the way back is bilinear
    import cv2
    import torch.nn.functional as F

    s = samples[0]
    image = read_image(s.image_path)
    small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    x = ((torch.from_numpy(small).float() / 255 - 0.449) / 0.226)[None, None]
    probs = 0
    for r in runs:
        model, card = load_checkpoint(r)
        with torch.no_grad():
            logits = model(x)
            probs = probs + F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False).sigmoid()
    expected = (probs / 2)[0].numpy() > 0.5
    preds = read_predictions(out)
    got = np.stack([rle_decode(preds.rle(s.name, c), image.shape) for c in range(29)])
    assert (got != expected).mean() < 1e-4  # identical but for float rounding at the threshold
    stored = ProbMap(tmp_path / "probs" / f"{s.stem}.npy").dense()
    assert np.abs(stored - (probs / 2)[0].numpy()).max() <= 0.5 / 255 + 1e-6
    manifest = json.loads((tmp_path / "pred.manifest.json").read_text())
    assert manifest["stage"] == "predict" and len(manifest["options"]["checkpoints"]) == 2


def test_tta_reports_each_transform_and_tune_writes_thresholds(runs, synth_data, tmp_path, capsys):
    code, out, err = run_cli(["tta", runs[0], "--data", synth_data / "test_gt", "-o", tmp_path / "t.csv",
                              "--transforms", "hflip,vflip,scale:0.8,1.2", "--merge", "gmean", "--device", "cpu"],
                             capsys)
    assert code == 0, err
    for name in ("identity", "hflip", "vflip", "scale0.8", "scale1.2", "merged"):
        assert name in out
    code, out, err = run_cli(["predict", runs[0], "--data", synth_data / "test_gt", "-o", tmp_path / "v.csv",
                              "--tune-thresholds", "--device", "cpu"], capsys)
    assert code == 0, err
    thr = json.loads((tmp_path / "v.thresholds.json").read_text())
    assert len(thr) == 29 and all(0.2 <= v <= 0.8 for v in thr.values())
    assert "Dice on labelled data (thresholds tuned on these same images: optimistic)" in " ".join(out.split())
    code, _, err = run_cli(["tta", runs[0], "--data", synth_data / "test", "--transforms", "spin"], capsys)
    assert code == 2 and "unknown TTA transform 'spin'" in err


def test_missing_checkpoint_is_an_error(tmp_path, synth_data, capsys):
    code, _, err = run_cli(["predict", tmp_path / "nope", "--data", synth_data / "test", "-o", tmp_path / "p.csv"],
                           capsys)
    assert code == 2 and "nope: checkpoint not found" in err
    assert not (tmp_path / "p.csv").exists()


def _csv(path, rles_by_image):
    write_predictions(path, [(im, r + [""] * (29 - len(r))) for im, r in rles_by_image.items()])


def test_hard_vote_by_hand(tmp_path, capsys):
    # one 1x10 image; finger-1 masks A = 0..4, B = 3..7, C = 4..9 (0-indexed); finger-2 empty in two of three
    _csv(tmp_path / "a.csv", {"x.png": ["1 5", "1 2"]})
    _csv(tmp_path / "b.csv", {"x.png": ["4 5", ""]})
    _csv(tmp_path / "c.csv", {"x.png": ["5 6", ""]})
    files = [tmp_path / f"{n}.csv" for n in "abc"]
    code, _, err = run_cli(["vote", "hard", *files, "-o", tmp_path / "v.csv"], capsys)
    assert code == 0, err
    v = read_predictions(tmp_path / "v.csv")
    assert v.rle("x.png", 0) == "4 5" and v.rle("x.png", 1) == ""
    hard_vote(files, tmp_path / "v1.csv", min_votes=1)
    v1 = read_predictions(tmp_path / "v1.csv")
    assert v1.rle("x.png", 0) == "1 10" and v1.rle("x.png", 1) == "1 2"
    hard_vote(files, tmp_path / "v3.csv", min_votes=3)
    assert read_predictions(tmp_path / "v3.csv").rle("x.png", 0) == "5 1"
    _csv(tmp_path / "d.csv", {"y.png": ["1 5"]})
    code, _, err = run_cli(["vote", "hard", files[0], tmp_path / "d.csv", "-o", tmp_path / "bad.csv"], capsys)
    assert code == 2 and "different image sets" in err and not (tmp_path / "bad.csv").exists()
    code, _, err = run_cli(["vote", "hard", *files, "--min-votes", 4, "-o", tmp_path / "bad.csv"], capsys)
    assert code == 2 and "--min-votes" in err


def _probs_dir(folder, arrays):
    folder.mkdir()
    for name, p in arrays.items():
        np.save(folder / f"{name}.npy", pack_probs(p))
    (folder / "index.json").write_text(json.dumps({"images": [f"{n}.png" for n in arrays]}))


def test_soft_vote_by_hand(tmp_path):
    a = np.zeros((29, 2, 4), np.float32)
    b = np.zeros((29, 2, 4), np.float32)
    a[0, 0] = [0.9, 0.9, 0.2, 0.0]
    b[0, 0] = [0.0, 0.6, 0.6, 0.0]
    _probs_dir(tmp_path / "pa", {"x": a})
    _probs_dir(tmp_path / "pb", {"x": b})
    soft_vote([tmp_path / "pa", tmp_path / "pb"], tmp_path / "s.csv")  # means 0.45 0.75 0.4 0 -> pixel 2 only
    assert read_predictions(tmp_path / "s.csv").rle("x.png", 0) == "2 1"
    soft_vote([tmp_path / "pa", tmp_path / "pb"], tmp_path / "w.csv", weights=[3, 1])  # .675 .825 .3 0
    assert read_predictions(tmp_path / "w.csv").rle("x.png", 0) == "1 2"
    soft_vote([tmp_path / "pa", tmp_path / "pb"], tmp_path / "t.csv", threshold=0.35)
    assert read_predictions(tmp_path / "t.csv").rle("x.png", 0) == "1 3"


def test_classwise_vote(tmp_path, capsys):
    _csv(tmp_path / "a.csv", {"x.png": ["1 2"] * 29})
    _csv(tmp_path / "b.csv", {"x.png": ["5 1"] * 29})
    (tmp_path / "map.json").write_text(json.dumps({"default": "a.csv", "Lunate": "b.csv"}))
    code, _, err = run_cli(["vote", "classwise", "--map", tmp_path / "map.json", "-o", tmp_path / "c.csv"], capsys)
    assert code == 0, err
    c = read_predictions(tmp_path / "c.csv")
    assert c.rle("x.png", 0) == "1 2" and c.rle("x.png", 24) == "5 1"  # Lunate is class 25 (index 24)
    (tmp_path / "bad.json").write_text(json.dumps({"Lunate": "b.csv"}))
    code, _, err = run_cli(["vote", "classwise", "--map", tmp_path / "bad.json"], capsys)
    assert code == 2 and "default" in err


def test_pseudo_labels_reload_as_training_data(synth_data, tmp_path, capsys):
    from handseg.data.labels import class_masks, read_polygons
    from handseg.formats.rle import rle_encode

    gt = synth_data / "test_gt"
    rows = [(s.name, [rle_encode(m) for m in class_masks(read_polygons(s.label_path), read_image(s.image_path).shape)])
            for s in discover(gt, labels="required")]
    write_predictions(tmp_path / "p.csv", rows)
    code, _, err = run_cli(["pseudo", tmp_path / "p.csv", "--data", synth_data / "test", "--out", tmp_path / "ps"],
                           capsys)
    assert code == 0, err
    labelled = discover(tmp_path / "ps", labels="required")
    assert len(labelled) == len(rows)
    from handseg.data.cache import load_cached_masks

    for s, (_, rles) in zip(labelled, rows):
        cached = load_cached_masks(tmp_path / "ps" / "cache", s)
        assert all(np.array_equal(cached[c], rle_decode(rles[c], cached.shape[1:])) for c in range(29))
        poly = class_masks(read_polygons(s.label_path), cached.shape[1:])
        assert (poly == cached).mean() > 0.99  # the polygons are the masks' outlines
    cfg = TrainConfig(data=synth_data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64,
                      epochs=1, batch_size=4, workers=0, device="cpu", out=tmp_path / "r", augment="none",
                      extra=[tmp_path / "ps"])
    assert train(cfg, log=lambda *a: None)["steps"] == 3  # 9-10 train + 4 pseudo images
    with pytest.raises(HandsegError, match="--min-confidence needs probability maps"):
        from handseg.ensemble.pseudo import make_pseudo

        make_pseudo(tmp_path / "p.csv", synth_data / "test", tmp_path / "ps2", min_confidence=0.9)


def test_batch_size_reaches_the_sliding_window(synth_data, tmp_path, capsys, monkeypatch):
    import handseg.inference.predictor as inference

    cfg = TrainConfig(data=synth_data / "train", arch="unet", encoder="resnet18", encoder_weights="none", crop=64,
                      epochs=1, batch_size=4, workers=0, device="cpu", out=tmp_path / "crop", augment="none")
    train(cfg, log=lambda *a: None)
    seen = []
    original = inference.sliding_window_logits

    def spy(*args, **kwargs):
        seen.append(kwargs["batch"])
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_logits", spy)
    for b in (1, 3):
        code, _, err = run_cli(["predict", tmp_path / "crop", "--data", synth_data / "test",
                                "-o", tmp_path / f"b{b}.csv", "--batch-size", b, "--device", "cpu"], capsys)
        assert code == 0, err
    assert set(seen) == {1, 3}
    # 128 px images, 64 px windows at stride 32: the batch size must not change the result
    assert (tmp_path / "b1.csv").read_text() == (tmp_path / "b3.csv").read_text()


def test_device_hand_side_matches_hand_side(synth_data):
    from handseg.data.anatomy import hand_side
    from handseg.data.labels import class_masks, read_polygons
    from handseg.inference.predictor import _is_left_hand

    sides = []
    for s in discover(synth_data / "train")[:6]:
        masks = class_masks(read_polygons(s.label_path), read_image(s.image_path).shape)
        side = hand_side(masks=masks)
        sides.append(side)
        assert _is_left_hand(torch.from_numpy(masks).float()) == (side == "left")
    assert {"left", "right"} <= set(sides)
    assert not _is_left_hand(torch.zeros(29, 8, 8))  # no fingers: no flip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_on_gpu_agrees_with_cpu(runs, synth_data, tmp_path):
    """The device path (AMP, channels_last, thresholds and runs on the GPU) against the CPU path."""
    from handseg.analysis.metrics import dice_scores
    from handseg.formats.tta import parse_transforms
    from handseg.inference.run import PredictConfig, run_predictions

    for amp in (False, True):
        run_predictions(runs, synth_data / "test", tmp_path / "cpu.csv", tmp_path / "pc", PredictConfig(device="cpu"))
        run_predictions(runs, synth_data / "test", tmp_path / "gpu.csv", tmp_path / "pg",
                        PredictConfig(transforms=parse_transforms(""), device="cuda", amp=amp))
        report = dice_scores(read_predictions(tmp_path / "cpu.csv"), read_predictions(tmp_path / "gpu.csv"))
        assert report.dice.mean() > (0.999 if not amp else 0.95)
        for f in (tmp_path / "pc").glob("*.npy"):
            diff = np.abs(ProbMap(f).dense() - ProbMap(tmp_path / "pg" / f.name).dense()) * 255
            assert diff.max() <= (1.01 if not amp else 8.01)  # uint8 steps


def test_dense_probability_maps_load_without_handseg_and_vote_like_packed(runs, synth_data, tmp_path, capsys):
    for fmt in ("packed", "dense"):
        code, _, err = run_cli(["predict", runs[0], "--data", synth_data / "test", "-o", tmp_path / f"{fmt}.csv",
                                "--probs", tmp_path / fmt, "--probs-format", fmt, "--device", "cpu"], capsys)
        assert code == 0, err
    for f in sorted((tmp_path / "packed").glob("*.npy")):
        plain = np.load(tmp_path / "dense" / f.name)  # numpy alone reads it
        assert plain.dtype == np.uint8 and plain.shape[0] == 29
        assert np.array_equal(plain, np.rint(ProbMap(f).dense() * 255).astype(np.uint8))
    soft_vote([tmp_path / "packed", tmp_path / "dense"], tmp_path / "mixed.csv")
    soft_vote([tmp_path / "packed", tmp_path / "packed"], tmp_path / "same.csv")
    assert (tmp_path / "mixed.csv").read_text() == (tmp_path / "same.csv").read_text()


def test_sliding_windows_pad_as_training_crops_do():
    """An image smaller than the window: beyond its edge the image channels hold a black pixel normalised
    (training's crop window is uint8 zeros) and a cascade's context channels 0 (render_context), whatever
    the image's own minimum is."""
    from handseg.inference.predictor import pad_values, sliding_window_logits
    from handseg.models.checkpoint import ModelCard
    from handseg.training.dataset import DEFAULT_NORM

    card = ModelCard(arch="unet", encoder="resnet18", size=64, crop=64, in_channels=30, context=["stage1.safetensors"])
    x = torch.full((1, 30, 40, 50), 0.7)  # bright everywhere: its minimum is not black
    seen = []

    def model(crops):
        seen.append(crops.clone())
        return torch.zeros(crops.shape[0], 29, *crops.shape[-2:])

    sliding_window_logits(model, x, 64, pad=pad_values(card))
    (crop,) = seen[0]
    black = (0.0 - DEFAULT_NORM["mean"]) / DEFAULT_NORM["std"]
    assert torch.all(crop[:, :40, :50] == 0.7)
    assert torch.allclose(crop[0, 40:], torch.tensor(black)) and torch.allclose(crop[0, :, 50:], torch.tensor(black))
    assert not crop[1:, 40:].any() and not crop[1:, :, 50:].any()
