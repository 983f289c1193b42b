"""Training on CPU at tiny sizes: the loss falls, checkpoints reload bit-identically, resume continues."""

import csv
import json

import pytest
import torch

from handseg.common.errors import HandsegError
from handseg.models.build import build_model
from handseg.models.checkpoint import load_checkpoint, read_card
from handseg.models.losses import build_loss, parse_loss_spec
from handseg.models.plan import resolve_arch, resolve_encoder
from handseg.training.config import TrainConfig
from handseg.training.loop import train
from tests.conftest import copy_default_val_fold


def _cfg(data, out, **kw):
    base = dict(data=data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64, epochs=2,
                batch_size=4, workers=0, device="cpu", out=out, lr=3e-3, augment="none", val_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_checkpoint_reloads_and_resume_continues(synth_data, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(synth_data, out, epochs=6), log=lambda *a: None)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(rows) == 6 and losses[-1] < losses[0]
    assert result["steps"] == 6 * 2  # 9-10 train images, batch 4, drop_last -> 2 steps an epoch
    assert 0.0 <= float(rows[-1]["val_dice"]) <= 1.0
    assert all(0.0 <= float(r["data_wait"]) <= 1.0 for r in rows)

    # the checkpoint describes its model and reloads bit-identically
    model, card = load_checkpoint(out)
    assert card.arch == "unet" and card.encoder == "resnet18" and card.size == 64 and len(card.classes) == 29
    from safetensors.torch import load_file

    saved = load_file(str(out / "last.safetensors"))
    model_last, _ = load_checkpoint(out / "last.safetensors")
    for k, v in model_last.state_dict().items():
        assert torch.equal(v, saved[k])

    # resume: two more epochs continue the step count and the metrics file
    train(_cfg(synth_data, out, epochs=8, resume=True), log=lambda *a: None)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert int(rows[-1]["step"]) == 16
    assert read_card(out / "last.safetensors").step == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["options"]["arch"] == "unet"

    with pytest.raises(HandsegError, match="--resume"):
        train(_cfg(synth_data, out), log=lambda *a: None)


def test_crop_training_and_unify_hands(synth_data, tmp_path):
    result = train(_cfg(synth_data, tmp_path / "crop", crop=64, epochs=1, unify_hands=True, augment="default"),
                   log=lambda *a: None)
    assert result["steps"] == 2
    card = read_card(tmp_path / "crop")
    assert card.crop == 64 and card.unify_hands


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(HandsegError, match="unknown architecture 'unet3'; valid: unet, unetplusplus"):
        resolve_arch("unet3")
    with pytest.raises(HandsegError, match="unknown encoder 'resnet_nope'.*any timm model name"):
        resolve_encoder("resnet_nope")
    with pytest.raises(HandsegError, match="unknown loss 'dicey'; valid: bce, dice, focal"):
        parse_loss_spec("bce:0.5,dicey:0.5")
    assert resolve_encoder("hrnet_w18_small") == "tu-hrnet_w18_small"
    assert resolve_encoder("resnet34") == "resnet34"
    assert resolve_arch("unet++") == "unetplusplus"


def test_losses_are_zero_ish_for_perfect_predictions_and_weighted():
    target = torch.zeros(1, 29, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    perfect = (target * 2 - 1) * 20
    for name in ("bce", "dice", "focal", "jaccard", "boundary"):
        assert build_loss(name)(perfect, target) < 1e-3, name
        assert build_loss(name)(-perfect, target) > 0.1, name
    combo = build_loss("bce:0.5,dice:0.5")(-perfect, target)
    parts = 0.5 * build_loss("bce")(-perfect, target) + 0.5 * build_loss("dice")(-perfect, target)
    assert combo == pytest.approx(parts)
    w = torch.zeros(29)
    w[0] = 1
    wrong_only_1 = perfect.clone()
    wrong_only_1[:, 1] *= -1
    assert build_loss("dice", w)(wrong_only_1, target) < 1e-3  # class 1 has weight 0


def test_local_encoder_weights_file(tmp_path):
    src = build_model("unet", "resnet18", "none")
    path = tmp_path / "resnet18.pth"
    torch.save(src.encoder.state_dict(), path)
    model = build_model("unet", "resnet18", str(path))
    assert torch.equal(model.encoder.conv1.weight, src.encoder.conv1.weight)
    bad = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(3)}, bad)
    with pytest.raises(HandsegError, match="weights do not fit encoder"):
        build_model("unet", "resnet18", str(bad))
    with pytest.raises(HandsegError, match="weights file not found"):
        build_model("unet", "resnet18", str(tmp_path / "missing.pth"))


def test_timm_encoder_builds_and_runs():
    model = build_model("unetplusplus", "hrnet_w18_small", "none").eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 64, 64))
    assert out.shape == (1, 29, 64, 64)


def test_nan_loss_stops_with_a_message(synth_data, tmp_path, monkeypatch):
    import handseg.models.losses as losses

    # through the registry, which build_loss reads when the run starts
    monkeypatch.setitem(losses.LOSSES, "bce", lambda logits, target, weights=None: logits.mean() * float("nan"))
    with pytest.raises(HandsegError, match="loss became nan at epoch 1"):
        train(_cfg(synth_data, tmp_path / "nan", epochs=1), log=lambda *a: None)
    with pytest.raises(HandsegError, match="--lr"):
        train(_cfg(synth_data, tmp_path / "nan2", lr=float("nan")), log=lambda *a: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_channels_last_on_gpu(synth_data, tmp_path):
    result = train(_cfg(synth_data, tmp_path / "gpu", device="cuda", amp="auto", epochs=1), log=lambda *a: None)
    assert result["steps"] >= 1


def test_workers_draw_different_crops_and_augmentations(synth_data):
    from torch.utils.data import DataLoader

    from handseg.data.layout import discover
    from handseg.training.dataset import Item, SegmentationDataset, seed_worker

    sample = discover(synth_data / "train", labels="required")[0]
    for augment, crop in (("none", 32), ("default", None)):
        cfg = TrainConfig(size=64, crop=crop, augment=augment, seed=0)
        dataset = SegmentationDataset([Item(sample, None)] * 4, cfg)
        generator = torch.Generator()
        generator.manual_seed(0)
        loader = DataLoader(dataset, batch_size=1, num_workers=2, worker_init_fn=seed_worker, generator=generator)
        first, second = [x for x, _ in loader][:2]  # batch 0 from worker 0, batch 1 from worker 1
        assert not torch.equal(first, second), augment


def test_validation_dice_equals_predict_on_the_fold(synth_data, tmp_path):
    from handseg.inference.run import PredictConfig, run_predictions

    out = tmp_path / "uh"
    train(_cfg(synth_data, out, epochs=1, unify_hands=True), log=lambda *a: None)
    last = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    fold = copy_default_val_fold(synth_data / "train", tmp_path / "fold0")
    result = run_predictions([out / "last.safetensors"], fold, tmp_path / "p.csv", config=PredictConfig(device="cpu"))
    assert result.dice["identity"] == pytest.approx(float(last["val_dice"]), abs=1e-6)


def test_a_run_that_cannot_start_leaves_no_folder(synth_data, tmp_path):
    with pytest.raises(HandsegError, match="weights file not found"):
        train(_cfg(synth_data, tmp_path / "never", encoder_weights=str(tmp_path / "missing.pth")), log=lambda *a: None)
    assert not (tmp_path / "never").exists()


def test_a_slow_loader_is_reported(synth_data, tmp_path, monkeypatch):
    import time

    import handseg.training.dataset as dataset

    real = dataset.load_item_crops

    def slow(item):
        time.sleep(0.6)  # far above a 64 px step, even on a loaded machine
        return real(item)

    monkeypatch.setattr(dataset, "load_item_crops", slow)
    said = []
    train(_cfg(synth_data, tmp_path / "slow", epochs=1), log=said.append)
    row = list(csv.DictReader(open(tmp_path / "slow" / "metrics.csv")))[0]
    assert float(row["data_wait"]) > 0.2
    assert any("waited for data" in line and "--workers" in line for line in said)


def test_metrics_from_an_older_version_are_rewritten_with_todays_columns(tmp_path):
    from handseg.training.records import METRIC_FIELDS, append_metrics

    old_fields = [f for f in METRIC_FIELDS if f != "data_wait"]
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({"epoch": 1, "step": 2, "train_loss": 0.5, "val_dice": 0.1})
    append_metrics(path, {"epoch": 2, "step": 4, "train_loss": 0.4, "data_wait": 0.05, "val_dice": 0.2})
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == METRIC_FIELDS
    assert [(r["epoch"], r["val_dice"], r["data_wait"]) for r in rows] == [("1", "0.1", ""), ("2", "0.2", "0.05")]


def test_a_corrupt_cache_file_is_named_and_leaves_no_run_folder(synth_data, tmp_path):
    import shutil

    import numpy as np

    from handseg.data.cache import build_cache

    shutil.copytree(synth_data / "train", tmp_path / "copy" / "train")
    data = tmp_path / "copy" / "train"
    build_cache("masks", data, data / "cache")
    bad = sorted((data / "cache" / "masks").rglob("*.npy"))[0]
    np.save(bad, np.arange(10, dtype=np.uint8))
    with pytest.raises(HandsegError, match="changed or truncated since prep") as err:
        train(_cfg(tmp_path / "copy", tmp_path / "run", epochs=1, fold=-1), log=lambda *a: None)
    assert bad.name in str(err.value)
    assert not (tmp_path / "run").exists()


def test_max_steps_plans_warm_up_and_cosine_over_the_steps_it_takes():
    """100 epochs of 10 steps cut at 43 steps: warm-up 3 steps (43 // 20 + 1), then the cosine reaches its
    floor (2% of --lr) at step 43 and is at half way (0.02 + 0.98 / 2) at step 3 + 20; not the schedule of
    1000 steps, which would still be warming up."""
    from handseg.training.schedule import planned_schedule

    f = planned_schedule(100, 10, max_steps=43)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0)
    assert f(23) == pytest.approx(0.51) and f(43) == pytest.approx(0.02)
    full = planned_schedule(100, 10)
    assert full(43) == pytest.approx(44 / 51) and full(1000) == pytest.approx(0.02)  # still warming up at 43


def test_training_takes_fewer_threads_on_a_busy_machine_and_its_resume_keeps_them(synth_data, tmp_path,
                                                                                   monkeypatch):
    from handseg.common import threads
    from handseg.training.state import find_resume, read_resume_header

    def saved_threads(run):
        return read_resume_header(find_resume(run)[0])["threads"]

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cpus", lambda *a, **k: 2)
    try:
        out = tmp_path / "run"
        monkeypatch.setattr(threads, "read_load", lambda: (1.9, 2))  # other work keeps both CPUs busy
        train(_cfg(synth_data, out, epochs=1), log=lambda *a: None)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["threads"]["intra_op"] == 1
        assert manifest["threads"]["busy"] == "other work busy on 1.9 of 2 CPUs"
        assert saved_threads(out) == 1

        # the machine is quiet now, yet the resumed run keeps its run's one thread (the same sums, in order)
        threads.reset()
        monkeypatch.setattr(threads, "read_load", lambda: (0.0, 2))
        train(_cfg(synth_data, out, epochs=2, resume=True), log=lambda *a: None)
        assert saved_threads(out) == 1
        resumed = json.loads((out / "manifest.json").read_text())["threads"]
        assert (resumed["intra_op"], resumed["busy"]) == (1, "kept from the run being resumed (1 intra-op thread)")

        # a fresh run on the quiet machine takes both; --threads overrides a resumed run's count
        threads.reset()
        train(_cfg(synth_data, tmp_path / "fresh", epochs=1), log=lambda *a: None)
        assert saved_threads(tmp_path / "fresh") == 2
        threads.reset()
        threads.set_override(2)
        train(_cfg(synth_data, out, epochs=3, resume=True), log=lambda *a: None)
        assert saved_threads(out) == 2
    finally:
        torch.set_num_threads(before)
