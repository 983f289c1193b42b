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

    rows = train_throughput.main(["--size", "64", "--image-size", "128", "--steps", "2", "--device", "cpu",
                                  "--configs", "unet/resnet34",
                                  "--workers", "1"])
    for key in ("baseline_img_s", "device_img_s", "handseg_img_s", "loader_img_s"):
        assert rows[0][key] > 0, key
    assert "handseg / on-device" in capsys.readouterr().out


@pytest.mark.slow
def test_predict_throughput_loops_predict_the_same_masks(tmp_path, capsys):
    import predict_throughput
    import torch

    from handseg.core.checkpoint import ModelCard, save_checkpoint
    from handseg.core.models import build_model

    # a random model whose head is not biased towards background, so its masks are not empty; the
    # images are the model's size, so neither loop resizes and their masks must agree
    model = build_model("unet", "resnet18", "none")
    for m in model.segmentation_head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.bias)
    save_checkpoint(tmp_path / "m.safetensors", model, ModelCard(arch="unet", encoder="resnet18", size=64))
    rows = predict_throughput.main(["--checkpoint", str(tmp_path / "m.safetensors"), "--image-size", "64",
                                    "--images", "3", "--device", "cpu"])
    assert [r["tta"] for r in rows] == ["none", "hflip"]
    for r in rows:
        assert r["images"] == 3 and r["baseline_img_s"] > 0 and r["handseg_img_s"] > 0
        assert r["agreement"] > 0.99
    assert "agreement" in capsys.readouterr().out


@pytest.mark.slow
def test_baseline_recipe_runs_tiny(capsys):
    import baseline_recipe

    r = baseline_recipe.main(["--budget", "1", "--image-size", "128", "--size", "64", "--ids", "3", "--test-ids", "1",
                              "--device", "cpu"])
    for recipe in ("baseline", "handseg"):
        assert r[recipe]["steps"] >= 1 and 0.0 <= r[recipe]["dice"] <= 1.0
    assert r["test_images"] == 2 and "official baseline" in capsys.readouterr().out
