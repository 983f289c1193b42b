"""Shared fixtures: tiny synthetic data sets made once per session with the real generator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HANDSEG_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    """Each test says its notes afresh (notes are said once per process otherwise), and decides threads
    as on a quiet machine: what other jobs do to the machine's load does not change a test's thread count
    (nor the order its sums run in). Tests of the load rule set it themselves."""
    from handseg.common import notices, threads

    notices.reset()
    threads.reset()
    monkeypatch.setattr(threads, "_sample_load", lambda: None)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """6 train IDs + 2 test IDs at 128 px (train/, test/, test_gt/, meta_data.xlsx)."""
    from handseg.data.synth import make_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    make_dataset(out, ids=6, test_ids=2, size=128, seed=7)
    return out


def train_tiny(data: Path, out: Path, **options) -> Path:
    """Train the tests' tiny model (UNet/ResNet18 at 64 px, one epoch on the CPU) into ``out``."""
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    cfg = dict(data=data, arch="unet", encoder="resnet18", encoder_weights="none", size=64, epochs=1, batch_size=4,
               workers=0, device="cpu", out=out, augment="none")
    train(TrainConfig(**{**cfg, **options}), log=lambda *a: None)
    return out


def run_cli(args: list[str], capsys=None) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process; returns (exit code, stdout, stderr)."""
    from handseg.cli import main

    code = main([str(a) for a in args])
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_default_val_fold(train_dir: Path, dest: Path) -> Path:
    """Copy the labelled images of train's default validation split (fold 0 of 5 seeded folds) to ``dest``."""
    import shutil

    from handseg.data.kfold import make_splits

    val = [im["path"] for im in make_splits(train_dir, n_folds=5, seed=0)["images"] if im["fold"] == 0]
    for rel in val:
        for sub, ext in (("DCM", ".png"), ("outputs_json", ".json")):
            src = train_dir / sub / rel.replace(".png", ext)
            (dest / sub / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / sub / src.parent.name / src.name)
    return dest
