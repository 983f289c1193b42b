"""ROI models (issue 20, ``train --roi``): the box from the labels in training and from stage 1 at
prediction, only the ROI classes replaced, select choosing per class, export and resume."""

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from handseg.common import notices
from handseg.common.constants import CARPALS, CLASS_INDEX, CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data.images import resize_image
from handseg.data.layout import discover
from handseg.data.roi import crops_bounds, cut_box, roi_box, roi_indices
from handseg.formats.probs import ProbMap, probs_name, read_probs_index
from handseg.inference.predictor import Predictor
from handseg.models.checkpoint import ModelCard, read_card
from handseg.models.plan import DEFAULT_NORM
from handseg.training.config import TrainConfig
from handseg.training.dataset import Item, SegmentationDataset, load_item, unpack_mask_bits
from handseg.training.loop import train
from tests.conftest import run_cli

CARPAL_IDX = roi_indices(list(CARPALS))
OTHER_IDX = [i for i in range(NUM_CLASSES) if i not in CARPAL_IDX]


def _cfg(data, out, **kw):
    base = dict(data=data, arch="unet", encoder="resnet18", encoder_weights="none", size=64, epochs=1, batch_size=4,
                workers=0, device="cpu", out=out, lr=3e-3, augment="none")
    base.update(kw)
    return TrainConfig(**base)


def test_roi_options_are_checked(tmp_path):
    with pytest.raises(HandsegError, match="--roi needs --context"):
        _cfg(tmp_path, tmp_path / "o", roi="carpals").validated()
    with pytest.raises(HandsegError, match="--crop .* does not go with it"):
        _cfg(tmp_path, tmp_path / "o", roi="carpals", crop=64, context=[tmp_path]).validated()
    with pytest.raises(HandsegError, match="unknown class or group 'wrist'"):
        _cfg(tmp_path, tmp_path / "o", roi="wrist", context=[tmp_path]).validated()
    with pytest.raises(HandsegError, match="--roi-margin sets the box of a --roi model"):
        _cfg(tmp_path, tmp_path / "o", roi_margin=0.3).validated()
    with pytest.raises(HandsegError, match="--context needs --crop .* or --roi"):
        _cfg(tmp_path, tmp_path / "o", context=[tmp_path]).validated()
    cfg = _cfg(tmp_path, tmp_path / "o", roi="Lunate,Scaphoid", context=[tmp_path]).validated()
    assert cfg.roi == ["Scaphoid", "Lunate"] and cfg.to_json()["roi"] == ["Scaphoid", "Lunate"]
    with pytest.raises(ValueError, match="needs its stage-1 runs"):
        ModelCard.from_dict({"arch": "unet", "encoder": "x", "size": 64, "roi": ["Lunate"], "roi_margin": 0.1})
    with pytest.raises(ValueError, match="roi must be"):
        ModelCard.from_dict({"arch": "unet", "encoder": "x", "size": 64, "roi": ["Wrist"], "roi_margin": 0.1,
                             "context": ["s1"]})


def test_training_crops_the_box_around_the_roi_classes_from_the_labels(synth_data, tmp_path):
    samples = discover(synth_data / "train", labels="required")
    cfg = _cfg(synth_data / "train", tmp_path / "o", roi="carpals", context=[tmp_path], size=96).validated()
    data = SegmentationDataset([Item(s, None) for s in samples[:2]], cfg, train=False)
    for i, sample in enumerate(samples[:2]):
        image, masks = load_item(Item(sample, None))
        from handseg.training.dataset import load_item_crops

        _, crops = load_item_crops(Item(sample, None))
        box = roi_box(crops_bounds(crops, CARPAL_IDX), cfg.roi_margin)
        rows = np.flatnonzero(masks[CARPAL_IDX].any(axis=(0, 2)))
        cols = np.flatnonzero(masks[CARPAL_IDX].any(axis=(0, 1)))
        assert box[0] < rows[0] and rows[-1] < box[0] + box[2] and box[1] < cols[0] and cols[-1] < box[1] + box[2]
        x, packed = data[i]
        want = resize_image(cut_box(image, box), (96, 96)).astype(np.float32) / 255
        assert torch.allclose(x[0], (torch.from_numpy(want) - DEFAULT_NORM["mean"]) / DEFAULT_NORM["std"], atol=1e-6)
        got = unpack_mask_bits(packed[None])[0].numpy() > 0
        for c in range(NUM_CLASSES):  # the masks are the full-size masks' box, resized as training resizes masks
            cut = cut_box(masks[c].astype(np.uint8) * 255, box)
            expect = cv2.resize(cut, (96, 96), interpolation=cv2.INTER_AREA) > 127
            assert (got[c] != expect).mean() < 0.002, CLASSES[c]
        assert got[CARPAL_IDX].any(axis=(1, 2)).sum() >= 6
    # in training the box is jittered: another seed, another box, the carpals still inside
    jittered = SegmentationDataset([Item(samples[0], None)], cfg, train=True, seed=3)
    x_train, packed_train = jittered[0]
    assert not torch.equal(x_train, data[0][0])
    assert (unpack_mask_bits(packed_train[None])[0][CARPAL_IDX].sum() > 0).item()


class _Recorder(torch.nn.Module):
    """A model that records its inputs and answers logit 2 everywhere."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.full((x.shape[0], NUM_CLASSES, *x.shape[-2:]), 2.0)


def _roi_card(size=64):
    return ModelCard(arch="unet", encoder="stub", size=size, in_channels=1 + NUM_CLASSES, context=["s1"],
                     roi=list(CARPALS), roi_margin=0.15)


def test_prediction_takes_the_box_from_stage_1s_masks_and_gives_only_roi_classes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 100), dtype=np.uint8)
    context = np.zeros((NUM_CLASSES, 120, 100), dtype=np.uint8)
    context[CLASS_INDEX["Scaphoid"], 60:80, 30:50] = 200  # stage 1 sees a scaphoid here
    context[CLASS_INDEX["Lunate"], 70:75, 55:60] = 128  # and, just above the cut (q > 127.5), a lunate
    context[CLASS_INDEX["Capitate"], 0:10, 0:10] = 127  # below the cut: not part of the box
    context[CLASS_INDEX["finger-3"], 5:40, 10:90] = 255  # not a ROI class
    context[CLASS_INDEX["Scaphoid"], 115, 95] = 255  # a stray pixel: not the scaphoid's largest component
    model = _Recorder()
    probs = Predictor([model], [_roi_card()], "cpu").predict([image], contexts=[context])[0]

    box = roi_box((60, 80, 30, 60), 0.15)
    x = model.seen[0][0]
    want = (torch.from_numpy(resize_image(cut_box(image, box), (64, 64))).float() / 255 - DEFAULT_NORM["mean"]) \
        / DEFAULT_NORM["std"]
    assert torch.allclose(x[0], want, atol=1e-6)
    ctx = torch.nn.functional.interpolate(torch.from_numpy(cut_box(context.transpose(1, 2, 0), box).transpose(2, 0, 1))
                                          .float()[None] / 255, size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(x[1:], ctx, atol=1e-6)

    inside = np.zeros((120, 100), dtype=bool)
    r, c, side = box
    inside[max(r, 0) : r + side, max(c, 0) : c + side] = True
    p = probs.numpy()
    assert np.allclose(p[CARPAL_IDX][:, inside], 1 / (1 + np.exp(-2.0)), atol=1e-6)
    assert not p[CARPAL_IDX][:, ~inside].any() and not p[OTHER_IDX].any()


def test_a_unified_roi_model_sees_left_hands_mirrored_by_stage_1s_side():
    """--unify-hands: training mirrors left hands from the labels; prediction from stage 1's fingers (a ROI
    model's own maps have none), so the box and the image are those of the mirrored hand."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (120, 100), dtype=np.uint8)
    context = np.zeros((NUM_CLASSES, 120, 100), dtype=np.uint8)
    context[CLASS_INDEX["finger-1"], 10:20, 80:90] = 255  # the thumb right of the little finger: a left hand
    context[CLASS_INDEX["finger-16"], 10:20, 5:15] = 255
    context[CLASS_INDEX["Scaphoid"], 60:80, 30:50] = 255
    card = _roi_card()
    card.unify_hands = True
    model = _Recorder()
    probs = Predictor([model], [card], "cpu").predict([image], contexts=[context])[0].numpy()
    box = roi_box((60, 80, 50, 70), 0.15)  # the scaphoid of the mirrored hand
    want = (torch.from_numpy(resize_image(cut_box(np.ascontiguousarray(image[:, ::-1]), box), (64, 64))).float() / 255
            - DEFAULT_NORM["mean"]) / DEFAULT_NORM["std"]
    assert len(model.seen) == 1 and torch.allclose(model.seen[0][0, 0], want, atol=1e-6)
    inside = np.zeros((120, 100), dtype=bool)
    r, c, side = box
    inside[max(r, 0) : r + side, max(c, 0) : c + side] = True
    assert np.array_equal(probs[CLASS_INDEX["Scaphoid"]] > 0, inside[:, ::-1])  # mirrored back


def test_without_roi_classes_in_stage_1_the_roi_classes_are_stage_1s(capsys):
    notices.reset()
    image = np.zeros((64, 64), dtype=np.uint8)
    context = np.zeros((NUM_CLASSES, 64, 64), dtype=np.uint8)
    context[CLASS_INDEX["Lunate"], 10:20, 10:20] = 100  # below the cut: no box
    model = _Recorder()
    probs = Predictor([model], [_roi_card()], "cpu").predict([image], contexts=[context])[0]
    assert not model.seen  # nothing to run the model on
    assert torch.allclose(probs, torch.from_numpy(context * np.isin(np.arange(NUM_CLASSES), CARPAL_IDX)[:, None, None])
                          .float() / 255)
    assert "stage 1 found none of the ROI model's classes" in capsys.readouterr().err


def test_roi_models_replace_only_their_classes_of_the_whole_hand_models():
    class Const(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x):
            return torch.full((x.shape[0], NUM_CLASSES, *x.shape[-2:]), self.value)

    image = np.zeros((64, 64), dtype=np.uint8)
    context = np.zeros((NUM_CLASSES, 64, 64), dtype=np.uint8)
    context[CLASS_INDEX["Hamate"], 20:40, 20:40] = 255
    whole = ModelCard(arch="unet", encoder="stub", size=64)
    whole.thresholds = [0.3] * NUM_CLASSES
    roi = _roi_card()
    roi.thresholds = [0.7] * NUM_CLASSES
    predictor = Predictor([Const(1.0), Const(-1.0), Const(3.0)], [whole, whole, roi], "cpu")
    p = predictor.predict([image], contexts=[context] * 3)[0]
    assert torch.allclose(p[OTHER_IDX], torch.full_like(p[OTHER_IDX], 0.5))  # the whole-hand models' mean
    assert torch.allclose(p[CARPAL_IDX, 32, 32], torch.sigmoid(torch.tensor(3.0)))  # the ROI model alone
    assert np.allclose(predictor.thresholds[OTHER_IDX], 0.3) and np.allclose(predictor.thresholds[CARPAL_IDX], 0.7)


@pytest.mark.slow
def test_roi_runs_end_to_end(synth_data, tmp_path, capsys):
    """Stage 1 (two folds), a carpal ROI model (two folds): predict replaces only the carpals, its OOF maps hold
    only them, select chooses per class, the recipe and its zip agree, and --resume keeps --roi."""
    data = tmp_path / "data" / "train"
    shutil.copytree(synth_data / "train", data)
    from handseg.data.kfold import make_splits

    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps(make_splits(data, n_folds=2, seed=0)))
    low = [tmp_path / f"low_f{f}" for f in (0, 1)]
    wrist = [tmp_path / f"wrist_f{f}" for f in (0, 1)]
    for f in (0, 1):
        train(_cfg(data, low[f], splits=splits, fold=f, epochs=2), log=lambda *a: None)
    for f in (0, 1):
        train(_cfg(data, wrist[f], splits=splits, fold=f, roi="carpals", context=low).validated(), log=lambda *a: None)
    card = read_card(wrist[0] / "best.safetensors")
    assert card.roi == list(CARPALS) and card.roi_margin == 0.15
    for name in read_probs_index(wrist[0] / "oof"):  # its out-of-fold maps hold its own classes only
        m = ProbMap(wrist[0] / "oof" / probs_name(name))
        assert all(m.crop(c) is None for c in OTHER_IDX)
    metrics = pd.read_csv(wrist[0] / "metrics.csv")
    assert metrics["finger-1"].isna().all() and metrics["Lunate"].notna().all()  # its own classes are scored

    test = synth_data / "test"
    csv = {k: tmp_path / f"{k}.csv" for k in ("whole", "both", "roi")}
    assert run_cli(["predict", low[0], "--data", test, "-o", csv["whole"], "--device", "cpu"])[0] == 0
    code, _, err = run_cli(["predict", low[0], wrist[0], "--data", test, "-o", csv["both"], "--device", "cpu"], capsys)
    assert code == 0 and "wrist_f0 predicts carpals in place of the other models" in err
    from handseg.ensemble.pseudo import pseudo_origin

    # pseudo labels from it count its stage-1 runs among their makers (fold 1's saw fold 0's images)
    origin = {o["run"]: o["fold"] for o in pseudo_origin(csv["both"])}
    assert origin == {str(low[0]): 0, str(wrist[0]): 0, str(low[1]): 1}
    code, _, err = run_cli(["predict", wrist[0], "--data", test, "-o", csv["roi"], "--device", "cpu"], capsys)
    assert code == 0 and "only ROI models were given" in err
    a, b, r = (pd.read_csv(csv[k]).fillna("") for k in ("whole", "both", "roi"))
    carpal = a["class"].isin(CARPALS)
    assert (a.rle == b.rle)[~carpal].all()  # only the ROI classes change
    assert (b.rle == r.rle)[carpal].all() and (r.rle[~carpal] == "").all()

    recipe = tmp_path / "recipe.json"
    code, out, _ = run_cli(["select", *low, *wrist, "-o", recipe], capsys)
    assert code == 0 and "roi:carpals" in out and "ROI configurations" in out
    sub, zipped, model_zip = tmp_path / "sub.csv", tmp_path / "zip.csv", tmp_path / "m.zip"
    assert run_cli(["predict", "--recipe", recipe, "--data", test, "-o", sub, "--device", "cpu"])[0] == 0
    assert run_cli(["export", "--recipe", recipe, "-o", model_zip])[0] == 0
    assert run_cli(["predict", model_zip, "--data", test, "-o", zipped, "--device", "cpu"])[0] == 0
    assert sub.read_bytes() == zipped.read_bytes()
    import zipfile

    names = zipfile.ZipFile(model_zip).namelist()
    assert sum(n.startswith("stage1/") for n in names) <= 2  # each stage-1 checkpoint once, not once per fold

    code, _, err = run_cli(["train", "--data", data, "--splits", splits, "--fold", "0", "--arch", "unet", "--encoder",
                            "resnet18", "--encoder-weights", "none", "--size", "64", "--epochs", "2", "--workers",
                            "0", "--device", "cpu", "--out", wrist[0], "--resume", "--context", *low,
                            "--roi", "Lunate"], capsys)
    assert code == 2 and "--roi" in err
