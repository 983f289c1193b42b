"""torchrun with two CPU processes (gloo): training shards the data and reduces its metrics across
ranks, and a sharded predict writes the same CSV as one process."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from handseg.data.images import image_size
from handseg.data.kfold import make_splits
from handseg.data.layout import discover
from handseg.formats.probs import ProbMap
from handseg.formats.rle import runs_to_mask
from handseg.formats.submission import read_predictions
from handseg.inference.run import PredictConfig, run_predictions
from handseg.models.checkpoint import read_card
from tests.conftest import copy_default_val_fold

pytestmark = pytest.mark.slow


def _torchrun(args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HANDSEG_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "handseg", *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_training_shards_data_and_reduces_validation(synth_data, tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(["train", "--data", synth_data / "train", "--arch", "unet", "--encoder", "resnet18",
                      "--encoder-weights", "none", "--size", "64", "--epochs", "2", "--batch-size", "2",
                      "--lr", "3e-3", "--workers", "0", "--device", "cpu", "--augment", "none", "--out", run],
                     tmp_path)
    assert proc.stdout.count("handseg train") == 1  # rank 0 alone prints

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    n_train = manifest["train_images"]
    n_val = sum(im["fold"] == 0 for im in make_splits(synth_data / "train", n_folds=5, seed=0)["images"])
    assert manifest["val_images"] == n_val and n_val >= 2  # both ranks validate something
    # DistributedSampler: each rank sees ceil(n/2) images, batches of 2, last partial batch dropped
    steps_per_epoch = math.ceil(n_train / 2) // 2
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [steps_per_epoch, 2 * steps_per_epoch]

    # the validation Dice reduced over both ranks equals one process validating every image
    card = read_card(run / "last.safetensors")
    fold = copy_default_val_fold(synth_data / "train", tmp_path / "fold0")
    single = run_predictions([run / "last.safetensors"], fold, tmp_path / "single.csv",
                             config=PredictConfig(device="cpu"))
    assert card.score == pytest.approx(single.dice["identity"], rel=1e-6, abs=1e-9)
    # the out-of-fold maps are written by both ranks inside the process group, each validation image once
    assert (run / "oof" / "manifest.json").is_file()
    assert len(json.loads((run / "oof" / "index.json").read_text())["images"]) == n_val
    assert len(list((run / "oof").glob("*.npy"))) == n_val
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no partial folder left behind


def test_torchrun_predict_writes_the_single_process_csv(synth_data, tmp_path):
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    ckpt = tmp_path / "ckpt"
    train(TrainConfig(data=synth_data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64,
                      epochs=1, batch_size=4, workers=0, device="cpu", out=ckpt, augment="none", lr=3e-3),
          log=lambda *a: None)
    # three images: the shards are uneven (2 + 1)
    data = tmp_path / "three"
    for s in discover(synth_data / "test")[:3]:
        dest = data / "DCM" / s.image_path.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.image_path, dest / s.image_path.name)

    single = tmp_path / "single.csv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's processes run one intra-op thread each: the same summation order
    try:
        run_predictions([ckpt / "last.safetensors"], data, single, probs_dir=tmp_path / "p1",
                        config=PredictConfig(device="cpu"))
    finally:
        torch.set_num_threads(threads)
    _torchrun(["predict", ckpt, "--data", data, "-o", tmp_path / "ddp.csv", "--probs", tmp_path / "p2",
               "--device", "cpu"], tmp_path)
    a, b = read_predictions(single), read_predictions(tmp_path / "ddp.csv")
    assert a.images == b.images  # same rows, same order
    # a pixel whose probability sits on the threshold may flip if the summation order differs after all
    for image in a.images:
        shape = image_size(next(data.rglob(image)))
        for c in range(len(a.runs[image])):
            ma, mb = runs_to_mask(a.runs[image][c], shape), runs_to_mask(b.runs[image][c], shape)
            assert np.count_nonzero(ma != mb) <= 2, (image, c)
    for f in sorted((tmp_path / "p1").glob("*.npy")):
        pa, pb = ProbMap(f).dense(), ProbMap(tmp_path / "p2" / f.name).dense()
        assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1.5 / 255
    manifest = json.loads((tmp_path / "ddp.manifest.json").read_text())
    assert manifest["images"] == 3 and manifest["stage"] == "predict"
