"""train --batch-size auto: the largest batch that fits, under a simulated memory limit, with a margin."""

from __future__ import annotations

import json

import pytest
import torch

from handseg.training import batchsize
from handseg.training.batchsize import MARGIN, auto_batch_size, search_batch_size, trial_fits
from tests.conftest import run_cli


def _limited(limit: int, calls: list):
    def fits(batch: int) -> bool:
        calls.append(batch)
        return batch <= limit

    return fits


@pytest.mark.parametrize("limit, largest", [(1, 1), (12, 12), (16, 16), (100, 100), (300, 256)])
def test_search_finds_the_largest_batch_that_fits(limit, largest):
    calls: list = []
    chosen, found = search_batch_size(_limited(limit, calls), limit=256)
    assert found == largest and chosen == max(1, int(largest * MARGIN))
    assert len(calls) <= 2 * 9 + 1  # doubling then bisection: logarithmic, not a scan


def test_nothing_fits():
    with pytest.raises(MemoryError):
        search_batch_size(lambda b: False)


def test_real_trial_steps_under_a_simulated_memory_limit(monkeypatch):
    """The real model, loss and optimizer step on CPU; the 'device' runs out of memory above 6 inputs."""
    import segmentation_models_pytorch as smp

    real_randn = torch.randn

    def randn(*shape, **kwargs):
        if shape and shape[0] > 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_randn(*shape, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    steps = []

    def make_model():
        steps.append(1)
        return smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=29)

    fits = trial_fits(make_model, torch.nn.BCEWithLogitsLoss(), 64, 1, "cpu")
    assert fits(2) and fits(6) and not fits(7)
    said: list = []
    monkeypatch.setattr(batchsize, "MAX_BATCH", 64)
    choice = auto_batch_size(fits, "cuda:0", n_images=40, log=said.append)  # the search as on a GPU
    assert choice == {"batch_size": int(6 * MARGIN), "largest_fit": 6, "margin": MARGIN, "device": "cuda:0"}
    assert "the largest batch that fitted" in said[0]
    with pytest.raises(ValueError):  # another error is not taken for running out of memory
        trial_fits(lambda: (_ for _ in ()).throw(ValueError("bug")), None, 32, 1, "cpu")(1)


def test_train_batch_size_auto_on_cpu_says_so_and_records_it(synth_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, said, err = run_cli(["train", "--data", synth_data / "train", "--arch", "unet", "--encoder", "resnet18",
                               "--encoder-weights", "none", "--size", 64, "--epochs", 1, "--batch-size", "auto",
                               "--workers", 0, "--device", "cpu", "--augment", "light", "--fold", -1, "--out", out],
                              capsys)
    assert code == 0, err
    assert "--batch-size auto on CPU: 4" in " ".join(said.split())
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["options"]["batch_size"] == 4
    assert doc["batch_size_auto"] == {"batch_size": 4, "largest_fit": None, "margin": None, "device": "cpu"}


def test_batch_size_takes_a_number_or_auto(capsys):
    code, _, err = run_cli(["train", "--batch-size", "lots"], capsys)
    assert code == 2 and "--batch-size: expected an integer, got 'lots'" in err
