"""The cascade (issue 10): stage 1's maps as extra input channels of a full-resolution crop model."""

import json
import shutil

import numpy as np
import pytest
import torch

from handseg.common.errors import HandsegError
from handseg.data.layout import discover
from handseg.inference.cascade import ContextSource, build_context, render_context
from handseg.training.config import TrainConfig
from handseg.training.dataset import Item, SegmentationDataset
from handseg.training.loop import train
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _cfg(data, out, **kw):
    base = dict(data=data, arch="unet", encoder="resnet18", encoder_weights="none", size=64, epochs=1, batch_size=4,
                workers=0, device="cpu", out=out, lr=3e-3, augment="none")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def stage1(synth_data, tmp_path_factory):
    """Two stage-1 folds (64 px whole images) of a 2-fold split, each with its out-of-fold maps."""
    base = tmp_path_factory.mktemp("cascade")
    data = base / "data" / "train"
    shutil.copytree(synth_data / "train", data)
    from handseg.data.kfold import make_splits

    splits = base / "splits.json"
    splits.write_text(json.dumps(make_splits(data, n_folds=2, seed=0)))
    runs = []
    for fold in (0, 1):
        train(_cfg(data, base / f"low_f{fold}", splits=splits, fold=fold), log=lambda *a: None)
        runs.append(base / f"low_f{fold}")
    return data, splits, runs


def test_context_is_out_of_fold_and_aligned_with_the_crop(stage1, tmp_path):
    data, splits, runs = stage1
    samples = discover(data, labels="required")
    source = build_context(runs, samples, tmp_path / "cache", device="cpu")
    assert source.out_of_fold == len(samples) and source.in_sample == 0  # every image held out by one fold
    held_out = {n for r in runs for n in json.loads((r / "oof" / "index.json").read_text())["images"]}
    assert all(source.where[s.name].parent.parent in runs for s in samples) and held_out == {s.name for s in samples}

    # a training sample's 29 extra channels are the stage-1 map of exactly the crop's window
    cfg = _cfg(data, tmp_path / "x", crop=64, context=runs)
    dataset = SegmentationDataset([Item(samples[0], None)], cfg, train=True, in_channels=30, context=source)
    dataset.augment = None
    seen = []
    original = dataset.window
    dataset.window = lambda *a: seen.append(original(*a)) or seen[-1]
    x, _ = dataset[0]
    (r, c), = seen
    full = source.full(samples[0].name, (128, 128))
    assert x.shape == (30, 64, 64)
    assert torch.equal(x[1:], torch.from_numpy(full[:, r : r + 64, c : c + 64]).float() / 255)
    # mirrored (unify hands): the context is mirrored with the image
    flipped = render_context(source.crops(samples[0].name), (r, 128 - c - 64, 64), flip_width=128)
    assert np.array_equal(flipped, full[:, r : r + 64, c : c + 64][:, :, ::-1].transpose(1, 2, 0))


def test_images_no_fold_held_out_get_the_stage1_mean_once(stage1, tmp_path, synth_data):
    data, _, runs = stage1
    extra = discover(synth_data / "test_gt", labels="required")
    first = build_context(runs, extra, tmp_path / "cache", device="cpu")
    assert first.in_sample == len(extra) and first.out_of_fold == 0
    folder = next((tmp_path / "cache" / "context").iterdir())
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    again = build_context(runs, extra, tmp_path / "cache", device="cpu")  # cached: nothing predicted again
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")} == stamp
    assert again.where == first.where


def test_cascade_trains_predicts_once_per_image_and_names_missing_stage1(stage1, synth_data, tmp_path, capsys,
                                                                        monkeypatch):
    data, splits, runs = stage1
    stage2 = []
    for fold in (0, 1):
        out = tmp_path / f"cascade_f{fold}"
        code, _, err = run_cli(["train", "--data", data, "--splits", splits, "--fold", fold, "--arch", "unet",
                                "--encoder", "resnet18", "--encoder-weights", "none", "--crop", 64, "--epochs", 1,
                                "--batch-size", 4, "--workers", 0, "--device", "cpu", "--augment", "light",
                                "--context", *runs, "--out", out], capsys)
        assert code == 0, err
        stage2.append(out)
    from handseg.models.checkpoint import read_card

    card = read_card(stage2[0])
    assert card.in_channels == 30 and card.crop == 64 and len(card.context) == 2
    assert card.context_tta == ["identity"]  # the stage-1 maps' TTA: predict runs stage 1 with it
    assert (stage2[0] / "oof" / "manifest.json").is_file()

    # the held-out images again, as training's oof/ made them (stage 1 out-of-fold, not the mean of all folds)
    code, _, err = run_cli(["predict", stage2[0], "--splits", splits, "--fold", 0, "-o", tmp_path / "f0.csv",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "f0.csv").read_bytes() == (stage2[0] / "oof" / "oof.csv").read_bytes()
    # select on the cascade's folds, and predict --recipe --oof reproduces its cv_dice
    recipe = tmp_path / "recipe.json"
    code, _, err = run_cli(["select", *stage2, "-o", recipe, "-j", 1], capsys)
    assert code == 0, err
    code, _, err = run_cli(["predict", "--recipe", recipe, "--oof", "--data", data, "-o", tmp_path / "oof.csv",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    reported = json.loads((tmp_path / "oof.manifest.json").read_text())["dice"]
    assert reported == pytest.approx(json.loads(recipe.read_text())["cv_dice"], abs=1e-9)

    # predict RUN runs stage 1 then stage 2 with no flags; stage 1 once per image for both stage-2 folds
    import handseg.inference.predictor as inference

    calls = []
    real = inference.Predictor.predict

    def counting(self, images, *a, **k):
        if not any(c.context for c in self.cards):
            calls.append(len(images))
        return real(self, images, *a, **k)

    monkeypatch.setattr(inference.Predictor, "predict", counting)
    test = synth_data / "test"
    code, _, err = run_cli(["predict", *stage2, "--data", test, "-o", tmp_path / "p.csv", "--device", "cpu",
                            "--batch-size", 2], capsys)
    assert code == 0, err
    assert sum(calls) == len(discover(test))
    monkeypatch.setattr(inference.Predictor, "predict", real)

    # exported with its stage 1, the cascade predicts the same elsewhere
    code, _, err = run_cli(["export", stage2[0], "-o", tmp_path / "cascade.zip"], capsys)
    assert code == 0, err
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "cascade.zip").rename(moved / "cascade.zip")
    assert run_cli(["predict", moved / "cascade.zip", "--data", test, "-o", moved / "z.csv", "--device", "cpu"],
                   capsys)[0] == 0
    assert run_cli(["predict", stage2[0], "--data", test, "-o", tmp_path / "d.csv", "--device", "cpu"],
                   capsys)[0] == 0
    assert (moved / "z.csv").read_bytes() == (tmp_path / "d.csv").read_bytes()

    # a stage-2 run whose stage 1 went missing: one line naming it
    lone = tmp_path / "lone"
    shutil.copytree(stage2[0], lone)
    (runs[0] / "best.safetensors").rename(runs[0] / "best.moved")
    try:
        code, _, err = run_cli(["predict", lone, "--data", test, "-o", tmp_path / "q.csv", "--device", "cpu"], capsys)
    finally:
        (runs[0] / "best.moved").rename(runs[0] / "best.safetensors")
    assert code == 2 and err.count("\n") == 1 and "names the stage-1 checkpoint" in err and "which is missing" in err


def test_a_validation_image_without_out_of_fold_stage1_context_is_refused(stage1, tmp_path, capsys):
    """Stage 2's fold 1 with only stage 1's fold 0: fold 1's images would get context from a model that
    trained on them. Refused in one line naming the stage-1 fold that is missing."""
    data, splits, runs = stage1
    out = tmp_path / "c1"
    code, _, err = run_cli(["train", "--data", data, "--splits", splits, "--fold", 1, "--arch", "unet", "--encoder",
                            "resnet18", "--encoder-weights", "none", "--crop", 64, "--epochs", 1, "--workers", 0,
                            "--device", "cpu", "--context", runs[0], "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "has no out-of-fold stage-1 map: it is in fold 1 of" in err and "give stage 1's fold-1 run" in err
    assert not out.exists()


def test_context_needs_crops_and_whole_image_stage1(stage1, tmp_path):
    data, _, runs = stage1
    with pytest.raises(HandsegError, match="--context needs --crop"):
        _cfg(data, tmp_path / "a", context=runs).validated()
    crop_run = tmp_path / "crop"
    train(_cfg(data, crop_run, crop=64, fold=-1), log=lambda *a: None)
    with pytest.raises(HandsegError, match="stage 1 must see whole images"):
        train(_cfg(data, tmp_path / "b", crop=64, context=[crop_run]), log=lambda *a: None)


def test_a_context_source_places_each_stored_crop_and_names_a_missing_image(tmp_path):
    from handseg.formats.probs import write_probs

    level = np.zeros((29, 6, 8), dtype=np.uint8)
    level[3, 1:3, 2:5] = 200
    level[28, 5, 7] = 9
    write_probs(tmp_path / "a.npy", level, "packed")
    source = ContextSource(where={"a.png": tmp_path / "a.npy"})
    np.testing.assert_array_equal(source.full("a.png", (6, 8)), level)
    assert [c for c, *_ in source.crops("a.png")] == [3, 28]
    with pytest.raises(HandsegError, match="no stage-1 context for b.png"):
        source.full("b.png", (6, 8))


def test_the_cascade_proxy_benchmark_runs_tiny(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import cascade_proxy

    r = cascade_proxy.main(["--image-size", "64", "--size", "32", "--stage1", "32", "--crop", "32", "--ids", "3",
                            "--test-ids", "1", "--budget", "1", "--encoder", "resnet18", "--workers", "0",
                            "--device", "cpu"])
    for recipe in ("resize", "cascade"):
        assert 0.0 <= r[recipe]["dice"] <= 1.0 and len(r[recipe]["per_class"]) == 29
    assert "finger mean" in capsys.readouterr().out


def test_stage_2_starts_from_a_stage_1_checkpoint_with_zero_context_filters(tmp_path):
    """``--encoder-weights runs/low_f0/best.safetensors`` for a stage 2: the X-ray filters of the first
    convolution are stage 1's, the 29 context filters start at zero, every other encoder tensor is copied."""
    from safetensors.torch import save_file

    from handseg.models.build import build_model
    from handseg.models.context import CONTEXT_CHANNELS

    stage1 = build_model("unet", "resnet18", "none", in_channels=1, size=64)
    path = tmp_path / "stage1.safetensors"
    save_file({k: v.contiguous() for k, v in stage1.state_dict().items()}, str(path))
    stage2 = build_model("unet", "resnet18", str(path), in_channels=1 + CONTEXT_CHANNELS, size=64)
    first = stage2.encoder.conv1.weight
    assert first.shape[1] == 1 + CONTEXT_CHANNELS
    assert torch.equal(first[:, :1], stage1.encoder.conv1.weight) and not first[:, 1:].any()
    assert torch.equal(stage2.encoder.layer4[1].conv2.weight, stage1.encoder.layer4[1].conv2.weight)
