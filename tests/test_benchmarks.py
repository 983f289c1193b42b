"""The benchmark scripts run (tiny sizes, CPU) and their two implementations agree; no timing asserts."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_rle_and_loading_benchmarks_run(capsys):
    import bench_loading
    import bench_rle

    assert len(bench_rle.main(["--size", "128", "--repeat", "1"])) == 5
    assert len(bench_loading.main(["--size", "128", "--images", "2", "--repeat", "1"])) == 1
    assert "speed-up" in capsys.readouterr().out


def test_vote_benchmark_agrees_with_baseline(capsys):
    import bench_vote

    bench_vote.main(["--images", "4", "--size", "128", "--baseline-images", "2"])  # asserts equal votes
    assert "3-CSV hard vote" in capsys.readouterr().out


@pytest.mark.slow
def test_train_throughput_runs_tiny_on_cpu(capsys):
    import train_throughput

    rows = train_throughput.main(["--size", "64", "--image-size", "128", "--steps", "1", "--batch", "4",
                                  "--device", "cpu", "--configs", "unet/resnet18", "--workers", "1",
                                  "--baseline-workers", "1"])
    r = rows[0]
    assert r["workers"] == 1 and r["baseline_workers"] == 1 and r["batch"] == 4
    for key in ("baseline_img_s", "device_img_s", "handseg_img_s", "baseline_loader_img_s", "handseg_loader_img_s",
                "baseline_gib", "device_gib", "handseg_gib"):
        assert r[key] > 0, key
    # both loaders train on the same bones: the seed-style masks (PNG + JSON, fillPoly, nearest resize)
    # and handseg's (prep cache, area resize) of the same images overlap except at the edges
    assert r["mask_agreement"] > 0.8
    # the default run: fold 0 validated, so validation took time; the parts add up to the call's wall time
    wall = r["wall"]
    assert wall["epochs"] == 2 and r["epoch_steps"] >= 2
    assert wall["loops"] > 0 and wall["val"] > 0 and wall["save"] > 0  # each epoch copies a checkpoint
    assert wall["loops"] + wall["val"] + wall["save"] + wall["other"] == pytest.approx(wall["seconds"])
    out = capsys.readouterr().out
    assert "handseg / on-device" in out and "training loops" in out


def test_train_throughput_baseline_dataset_decodes_png_and_json(synth_data):
    import numpy as np
    import train_throughput
    from bench_loading import baseline_load

    from handseg.data.layout import discover

    samples = discover(synth_data / "train", labels="required")
    data = train_throughput.BaselineDataset(samples, 64, length=len(samples) + 1)
    x, y = data[len(samples)]  # item n is sample 0 again
    image, masks = baseline_load(samples[0].image_path, samples[0].label_path)
    assert x.shape == (1, 64, 64) and y.shape == (29, 64, 64)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # a class present at full size is present after the resize, in the same place (top or bottom half)
    for c in range(29):
        rows = np.flatnonzero(masks[c].any(axis=1))
        small = np.flatnonzero(y[c].numpy().any(axis=1))
        assert abs(rows.mean() / image.shape[0] - small.mean() / 64) < 0.05, c


def _unbiased_checkpoint(path, size: int):
    """A random UNet whose head is not biased towards background, so its masks are not empty."""
    import torch

    from handseg.models.build import build_model
    from handseg.models.checkpoint import ModelCard, save_checkpoint

    torch.manual_seed(0)
    model = build_model("unet", "resnet18", "none")
    for m in model.segmentation_head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.bias)
    save_checkpoint(path, model, ModelCard(arch="unet", encoder="resnet18", size=size))
    return path


@pytest.mark.slow
def test_predict_throughput_loops_predict_the_same_masks(tmp_path, capsys):
    import predict_throughput

    ckpt = _unbiased_checkpoint(tmp_path / "m.safetensors", 64)
    # images larger than the model: both loops resize down (INTER_AREA) and the logits back up
    info = predict_throughput.main(["--checkpoint", str(ckpt), "--image-size", "96", "--images", "3", "--batch", "2",
                                    "--baseline-workers", "1", "--tta", "--device", "cpu", "--no-onnx"])
    rows = info["rows"]
    assert info["trained"] is None and [r["tta"] for r in rows] == ["none", "hflip"]
    for r in rows:
        assert r["images"] == 3 and r["baseline_img_s"] > 0 and r["handseg_img_s"] > 0
        assert r["handseg_pixels"] > 0  # not two empty CSVs agreeing
        assert r["agreement"] > 0.99
        assert r["pieces_agree"] == pytest.approx(1.0)  # the pieces, timed alone, make the same CSV
        assert set(r["pieces"]) == {"load", "decode", "forward", "runs", "rle", "csv"}
        assert r["onnx"] is None  # --no-onnx: onnxruntime is tested in a child process below
        assert all(v >= 0 for v in r["pieces"].values())
        assert 0.0 <= r["truth_dice"] <= 1.0
    out = capsys.readouterr().out
    assert "agreement" in out and "sum of the pieces" in out


@pytest.mark.slow
def test_predict_throughput_trains_a_model_when_given_none(capsys):
    import predict_throughput

    info = predict_throughput.main(["--arch", "unet", "--encoder", "resnet18", "--size", "64", "--image-size", "128",
                                    "--images", "2", "--batch", "2", "--baseline-workers", "0", "--train-steps", "2",
                                    "--device", "cpu"])
    assert info["trained"]["steps"] == 2 and [r["tta"] for r in info["rows"]] == ["none"]
    assert info["rows"][0]["images"] == 2 and info["rows"][0]["agreement"] > 0.99
    assert "trained 2 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_baseline_recipe_runs_tiny(capsys):
    import baseline_recipe

    r = baseline_recipe.main(["--budget", "1", "--image-size", "128", "--size", "64", "--ids", "3", "--test-ids", "1",
                              "--baseline-workers", "1", "--device", "cpu"])
    for recipe in ("baseline", "handseg"):
        assert r[recipe]["steps"] >= 1 and 0.0 <= r[recipe]["dice"] <= 1.0
    assert r["baseline_workers"] == 1 and r["test_images"] == 2 and "official baseline" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu(capsys):
    import gpu_check

    r = gpu_check.main(["--tiny", "--device", "cpu"])
    assert set(r["train"]) == {"unet/resnet18"} and set(r["predict"]) == {"resize", "hflip", "crop"}
    t = r["train"]["unet/resnet18"]
    assert t["img_s"] > 0 and 0 < t["loop_share"] < 1
    assert all(p["img_s"] > 0 for p in r["predict"].values())
    assert r["batch_size_auto"]["batch_size"] == 4 and r["batch_size_auto"]["device"] == "cpu"
    assert r["goals"] == {k: "n/a on CPU" for k in gpu_check.GOALS}
    assert '"batch_size_auto"' in capsys.readouterr().out


def test_levers_benchmark_runs_tiny(capsys):
    import levers

    rows = levers.main(["--epochs", "1", "--ids", "5", "--held-out-ids", "1", "--image-size", "96"])
    assert [r["run"] for r in rows] == ["baseline", "--preprocess clahe", "--ema 0.9", "--patience 2",
                                        "--init baseline, lr / 10", "--roi carpals, beside baseline"]
    assert all(0.0 <= r["held_out"] <= 1.0 and 0.0 <= r["carpals"] <= 1.0 and r["steps"] >= 1 for r in rows)
    assert "| run | steps | best val Dice | held-out Dice | vs baseline | held-out carpals |" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_throughput_runs_onnxruntime_beside_torch(tmp_path):
    """In a child process: onnxruntime's threads stay out of this one, whose later tests fork workers."""
    import importlib.util
    import re
    import subprocess

    if not importlib.util.find_spec("onnxruntime"):
        pytest.skip("the optional extra handseg[onnx] is not installed")
    ckpt = _unbiased_checkpoint(tmp_path / "m.safetensors", 64)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "predict_throughput.py"
    done = subprocess.run([sys.executable, str(script), "--checkpoint", str(ckpt), "--image-size", "96", "--images",
                           "3", "--batch", "2", "--baseline-workers", "0", "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    onnx_row = re.compile(r"\| none \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \| [0-9.]+ / [0-9.]+ \([0-9.]+x\) \|")
    rows = [line for line in done.stdout.splitlines() if onnx_row.match(line)]
    assert len(rows) == 1, done.stdout  # the onnxruntime table's row
    assert float(rows[0].rstrip(" |").split("|")[-1]) > 0.999  # the same masks as torch
