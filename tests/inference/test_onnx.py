"""ONNX export and onnxruntime prediction: the masks from an ONNX model zip agree with the runs'
(Dice >= 0.999) for a resize model with TTA, a crop model (sliding window) and a recipe."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.conftest import run_cli

# ONNX export and onnxruntime run in child processes only: torch.onnx loads onnxruntime, whose
# background thread can hold a lock when a later test forks DataLoader workers, which then hang
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")),
    reason="the optional extra handseg[onnx] is not installed")]


def _handseg(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "handseg", *map(str, args)], capture_output=True, text=True)


def _masks_dice(a, b) -> float:
    """Dice over every pixel of every image and class of two submission CSVs (same images)."""
    from handseg.formats.rle import rle_to_runs
    from handseg.formats.submission import read_predictions

    pa, pb = read_predictions(a), read_predictions(b)
    assert list(pa.images) == list(pb.images)
    inter = total = 0
    for image in pa.images:
        for c in range(29):
            ra, rb = rle_to_runs(pa.rle(image, c)), rle_to_runs(pb.rle(image, c))
            sa = set(np.concatenate([np.arange(s, s + n) for s, n in zip(*ra)] or [np.zeros(0, int)]).tolist())
            sb = set(np.concatenate([np.arange(s, s + n) for s, n in zip(*rb)] or [np.zeros(0, int)]).tolist())
            inter += len(sa & sb)
            total += len(sa) + len(sb)
    assert total > 0  # the models predict bones: an empty pair would agree trivially
    return 2 * inter / total


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    train = synth_data / "train"
    splits = tmp / "splits.json"
    assert run_cli(["kfold", "--data", train, "--folds", 2, "-o", splits])[0] == 0
    common = ["--data", train, "--splits", splits, "--arch", "unet", "--encoder", "resnet18", "--encoder-weights",
              "none", "--epochs", 1, "--batch-size", 4, "--lr", "3e-3", "--workers", 0, "--device", "cpu",
              "--augment", "none"]
    runs = {}
    for name, extra in (("r_f0", ["--size", 64, "--fold", 0]), ("r_f1", ["--size", 64, "--fold", 1]),
                        ("crop", ["--crop", 64, "--size", 128, "--fold", -1])):
        runs[name] = tmp / name
        assert run_cli(["train", *common, *extra, "--out", runs[name]])[0] == 0
    recipe = tmp / "recipe.json"
    assert run_cli(["select", runs["r_f0"], runs["r_f1"], "-o", recipe, "-j", 1])[0] == 0
    return tmp, runs, recipe


@pytest.mark.parametrize("case", ["resize", "crop", "recipe"])
def test_onnx_zip_predicts_the_masks_of_the_runs(case, trained, synth_data, capsys):
    tmp, runs, recipe = trained
    test = synth_data / "test"
    zip_path = tmp / f"{case}.zip"
    if case == "recipe":
        export, by_torch = ["--recipe", recipe], ["predict", "--recipe", recipe]
        by_onnx = ["predict", zip_path]
    else:
        members = [runs["r_f0"], runs["r_f1"]] if case == "resize" else [runs["crop"]]
        export = members
        # folds averaged with hflip TTA (resize), or a sliding window with hflip (crop)
        by_torch, by_onnx = ["tta", *members, "--transforms", "hflip"], ["tta", zip_path, "--transforms", "hflip"]
    done = _handseg(["export", *export, "--format", "onnx", "-o", zip_path])
    assert done.returncode == 0, done.stderr
    assert "ONNX graphs (opset 17)" in done.stdout
    with zipfile.ZipFile(zip_path) as z:
        index = json.loads(z.read("handseg_model.json"))
        assert all(m["onnx"]["file"] in z.namelist() and m["onnx"]["opset"] == 17 for m in index["models"])
    code, _, err = run_cli([*by_torch, "--data", test, "-o", tmp / f"{case}_torch.csv", "--device", "cpu"], capsys)
    assert code == 0, err
    done = _handseg([*by_onnx, "--data", test, "-o", tmp / f"{case}_onnx.csv", "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    assert "running the model zip's ONNX graphs with onnxruntime" in done.stderr
    assert _masks_dice(tmp / f"{case}_torch.csv", tmp / f"{case}_onnx.csv") >= 0.999


def test_without_onnxruntime_one_line_names_the_extra(trained, synth_data, tmp_path, monkeypatch, capsys):
    import sys

    tmp, runs, _ = trained
    zip_path = tmp_path / "m.zip"
    assert _handseg(["export", runs["r_f0"], "--format", "onnx", "-o", zip_path]).returncode == 0
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as where it is not installed
    code, _, err = run_cli(["predict", zip_path, "--data", synth_data / "test", "-o", tmp_path / "p.csv"], capsys)
    errors = [line for line in err.splitlines() if not line.startswith("handseg: note:")]  # a load note may come first
    assert code == 2 and errors == ["handseg: error: onnxruntime is not installed; ONNX models need the optional "
                                    "extra: pip install 'handseg[onnx]'"]
    assert not (tmp_path / "p.csv").exists()
