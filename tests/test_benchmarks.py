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

    rows = train_throughput.main(["--size", "64", "--steps", "1", "--device", "cpu", "--configs", "unet/resnet34"])
    assert rows[0]["handseg_img_s"] > 0 and rows[0]["baseline_img_s"] > 0
