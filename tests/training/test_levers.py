"""Training levers (issue 20): --init, --patience, --ema, each against an independent truth."""

import pytest
import torch

from handseg.common.errors import HandsegError
from handseg.inference.predictor import Predictor
from handseg.models.checkpoint import BEST, checkpoint_bytes, checkpoint_sha256, read_card
from handseg.training.config import TrainConfig
from handseg.training.loop import train

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
