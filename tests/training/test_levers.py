"""Training levers (issue 20): --init, --patience, --ema, each against an independent truth."""

import numpy as np
import pytest
import torch

from handseg.common.errors import HandsegError
from handseg.inference.predictor import Predictor
from handseg.models.checkpoint import BEST, checkpoint_bytes, checkpoint_sha256, read_card
from handseg.training.config import TrainConfig
from handseg.training.loop import train
from handseg.training.schedule import lr_lambda

QUIET = {"log": lambda *a: None}


def _cfg(data, out, **kw):
    base = dict(data=data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64, epochs=1,
                batch_size=4, workers=0, device="cpu", out=out, lr=3e-3, augment="none")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def parent(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("parent") / "run"
    train(_cfg(synth_data, out, epochs=2), **QUIET)
    return out


def _image(synth_data):
    from handseg.data.images import read_image

    return read_image(next((synth_data / "test" / "DCM").rglob("*.png")))


def test_init_reproduces_the_parent_before_the_first_step(synth_data, parent, tmp_path, monkeypatch):
    import handseg.training.loop as loop

    # no optimizer step is taken: what the run saves is the model --init built
    monkeypatch.setattr(loop, "_step", lambda run, x, y, group, update: torch.zeros(()))
    child = tmp_path / "child"
    said = []
    train(_cfg(synth_data, child, init=parent, lr=5e-5), log=said.append)
    card = read_card(child / BEST)
    assert card.init_sha256 == checkpoint_sha256(parent / BEST) and card.init == str((parent / BEST).resolve())
    assert any(s.startswith("--init: every layer from") and "a fresh optimizer" in s for s in said)
    image = _image(synth_data)
    mine = Predictor.load([child], "cpu").probs(image)
    theirs = Predictor.load([parent], "cpu").probs(image)
    assert torch.equal(mine, theirs)


def test_init_trains_on_with_a_fresh_schedule(synth_data, parent, tmp_path):
    child = tmp_path / "child"
    result = train(_cfg(synth_data, child, init=parent, lr=5e-5, epochs=1), **QUIET)
    import csv

    rows = list(csv.DictReader(open(child / "metrics.csv")))
    assert result["steps"] == 2 and int(rows[0]["step"]) == 2  # counted from 0, not from the parent's 4 steps
    assert read_card(child).init_sha256 == checkpoint_sha256(parent / BEST)


def test_init_mismatch_names_the_first_layer_that_differs(synth_data, parent, tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(HandsegError, match="--init: the checkpoint's --encoder is 'resnet18', this run's 'resnet34'"):
        train(_cfg(synth_data, tmp_path / "a", init=parent, encoder="resnet34"), **QUIET)
    from handseg.models.checkpoint import load_checkpoint

    weights = load_file(str(parent / BEST))
    names = list(load_checkpoint(parent)[0].state_dict())  # the model's own order (the file's is alphabetical)
    first, later = names[len(names) // 3], names[2 * len(names) // 3]
    for name in (first, later):
        weights[name] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(checkpoint_bytes(weights, read_card(parent)))
    with pytest.raises(HandsegError, match=f"--init: layer {first} differs: shape \\[3, 3\\] in the checkpoint"):
        train(_cfg(synth_data, tmp_path / "b", init=bad), **QUIET)
    del weights[first], weights[later]
    bad.write_bytes(checkpoint_bytes(weights, read_card(parent)))
    with pytest.raises(HandsegError, match=f"--init: layer {first} differs: the checkpoint has no such layer"):
        train(_cfg(synth_data, tmp_path / "c", init=bad), **QUIET)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    with pytest.raises(HandsegError, match="--init starts a new run .* choose one"):
        train(_cfg(synth_data, tmp_path / "d", init=parent, resume=True), **QUIET)


# ---------------------------------------------------------------------------------------------- patience


def test_patience_stops_where_a_hand_made_sequence_says():
    from handseg.training.levers import Patience

    dice = [0.50, 0.60, 0.55, 0.60, 0.58, 0.61, 0.61, 0.60, 0.59]
    # patience 3: 0.55, 0.60 (not above 0.60), 0.58 -> stop after the 5th validation
    p = Patience(3)
    stop_at = next(i + 1 for i, d in enumerate(dice) if p.update(d, i + 1))
    assert stop_at == 5 and p.best == 0.60 and p.best_epoch == 2 and p.since_best == 3
    p = Patience(4)  # 0.61 at the 6th resets; 0.61, 0.60, 0.59 are three: no stop within the sequence
    assert not any(p.update(d, i + 1) for i, d in enumerate(dice))
    assert not any(Patience(None).update(d, i) for i, d in enumerate(dice))


def test_patience_stops_training_and_says_so(synth_data, tmp_path, monkeypatch):
    import csv

    import handseg.training.loop as loop

    sequence = iter([0.3, 0.5, 0.4, 0.45, 0.9, 0.9, 0.9, 0.9])

    def fake_validate(*args, **kwargs):
        return np.full(29, next(sequence))

    monkeypatch.setattr(loop, "validate", fake_validate)
    said = []
    out = tmp_path / "run"
    result = train(_cfg(synth_data, out, epochs=8, patience=2), log=said.append)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert result["epochs"] == 4 and len(rows) == 4 and result["best_dice"] == pytest.approx(0.5)
    assert any(s.startswith("early stop: validation Dice has not improved for 2 validations (--patience 2; best "
                            "0.5000 at epoch 2); stopping after epoch 4 of 8") for s in said)
    # the schedule was planned over 8 epochs (2 steps each), not re-planned
    lr_at_4 = float(rows[-1]["lr"])
    assert lr_at_4 == pytest.approx(3e-3 * lr_lambda(16, 16 // 20 + 1)(8), rel=1e-6)
    # a resume knows it stopped
    said.clear()
    assert train(_cfg(synth_data, out, epochs=8, patience=2, resume=True), log=said.append)["finished"]
    assert any("stopped early at epoch 4 (--patience 2)" in s for s in said)


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_is_the_hand_computed_average_on_a_tiny_model():
    from handseg.training.levers import Ema

    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    states = []
    for v in (1.0, 3.0, -2.0, 5.0):
        with torch.no_grad():
            model[0].weight.fill_(v)
            model[0].bias.fill_(2 * v)
            model[1].running_mean.fill_(v / 2)
            model[1].num_batches_tracked.fill_(int(v * 10))
        states.append(v)
        if len(states) == 1:
            ema = Ema(model, 0.75)
        else:
            ema.update(model)
    w0, w1, w2, w3 = states
    want = 0.75**3 * w0 + 0.75**2 * 0.25 * w1 + 0.75 * 0.25 * w2 + 0.25 * w3  # by hand
    got = ema.module.state_dict()
    assert torch.allclose(got["0.weight"], torch.full((1, 2), want))
    assert torch.allclose(got["0.bias"], torch.full((1,), 2 * want))
    assert torch.allclose(got["1.running_mean"], torch.full((1,), want / 2))
    assert int(got["1.num_batches_tracked"]) == 50  # counters are copied, not averaged
    assert model[0].weight.requires_grad and not ema.module[0].weight.requires_grad


def test_ema_run_saves_the_average_and_resume_continues_it(synth_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from handseg.training.levers import Ema

    seen = []
    original_init, original_update = Ema.__init__, Ema.update

    def record_init(self, model, decay):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        original_init(self, model, decay)

    def record_update(self, model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        original_update(self, model)

    monkeypatch.setattr(Ema, "__init__", record_init)
    monkeypatch.setattr(Ema, "update", record_update)
    out = tmp_path / "run"
    def interrupt(message):  # Ctrl-C once epoch 1 is saved (--max-steps would plan a shorter schedule)
        if message.startswith("epoch 1:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synth_data, out, epochs=2, ema=0.6), log=interrupt)
    assert len(seen) == 3  # the start and 2 steps
    last = load_file(str(out / "last.safetensors"))
    d = 0.6
    for name, w0 in seen[0].items():
        if w0.is_floating_point():
            want = d * d * w0 + d * (1 - d) * seen[1][name] + (1 - d) * seen[2][name]
            assert torch.allclose(last[name], want, atol=1e-6), name
    assert read_card(out / "last.safetensors").ema == 0.6

    # 1 epoch + resume 1 epoch == 2 epochs straight: the resume state carries the average and the weights
    # (as the resume test of test_trust: equal to float rounding)
    monkeypatch.setattr(Ema, "__init__", original_init)
    monkeypatch.setattr(Ema, "update", original_update)
    train(_cfg(synth_data, out, epochs=2, ema=0.6, resume=True), **QUIET)
    straight = tmp_path / "straight"
    train(_cfg(synth_data, straight, epochs=2, ema=0.6), **QUIET)
    a, b = load_file(str(out / "last.safetensors")), load_file(str(straight / "last.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], last[k]) for k in a)  # and it did train on
    with pytest.raises(HandsegError, match="trained with --ema 0.6, not none"):
        train(_cfg(synth_data, out, epochs=3, resume=True), **QUIET)
