"""The levers of issue 20 end to end: each travels with the model, so every prediction path applies it."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from handseg.formats.probs import ProbMap, probs_name, read_probs_index
from handseg.models.checkpoint import BEST, read_card, with_card
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TINY = ["--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--size", 64, "--epochs", 1,
        "--batch-size", 4, "--lr", "3e-3", "--workers", 0, "--device", "cpu", "--augment", "none"]

def _maps(folder):
    return {name: ProbMap(folder / probs_name(name)).dense() for name in read_probs_index(folder)}

def test_preprocess_travels_with_the_model_through_every_path(synth_data, tmp_path, capsys):
    train = synth_data / "train"
    splits = tmp_path / "splits.json"
    assert run_cli(["kfold", "--data", train, "--folds", 2, "-o", splits], capsys)[0] == 0
    runs = []
    for fold in (0, 1):
        out = tmp_path / f"clahe_f{fold}"
        code, _, err = run_cli(["train", "--data", train, "--splits", splits, "--fold", fold, *TINY,
                                "--preprocess", "clahe:3:4", "--out", out], capsys)
        assert code == 0, err
        runs.append(out)
    card = read_card(runs[0])
    assert card.preprocess == "clahe:3:4"

    # predict RUN gives the fold's out-of-fold maps (written by training's OOF step) exactly
    code, _, err = run_cli(["predict", runs[0], "--data", train, "-o", tmp_path / "p0.csv", "--probs",
                            tmp_path / "p0", "--device", "cpu"], capsys)
    assert code == 0, err
    oof, full = _maps(runs[0] / "oof"), _maps(tmp_path / "p0")
    assert oof and all(np.array_equal(m, full[name]) for name, m in oof.items())

    # the same weights without the card's preprocess predict something else: the card is what applied it
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / BEST).write_bytes(with_card(runs[0] / BEST, replace(card, preprocess=None)))
    code, _, err = run_cli(["predict", plain, "--data", train, "-o", tmp_path / "q.csv", "--probs", tmp_path / "q",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    without = _maps(tmp_path / "q")
    assert any(not np.array_equal(m, full[name]) for name, m in without.items())

    # select on the OOF maps; predict --recipe --oof reproduces its Dice; a model zip predicts what the recipe does
    recipe = tmp_path / "recipe.json"
    code, _, err = run_cli(["select", *runs, "-o", recipe, "-j", 1], capsys)
    assert code == 0, err
    doc = json.loads(recipe.read_text())
    code, _, err = run_cli(["predict", "--recipe", recipe, "--oof", "--data", train, "-o", tmp_path / "oof.csv",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "oof.manifest.json").read_text())["dice"] == pytest.approx(doc["cv_dice"], abs=1e-9)
    code, _, err = run_cli(["predict", "--recipe", recipe, "--data", synth_data / "test", "-o", tmp_path / "r.csv",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", "--recipe", recipe, "-o", tmp_path / "model.zip"], capsys)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(tmp_path / "model.zip", elsewhere / "model.zip")
    code, _, err = run_cli(["predict", elsewhere / "model.zip", "--data", synth_data / "test", "-o",
                            elsewhere / "z.csv", "--device", "cpu"], capsys)
    assert code == 0, err
    assert (elsewhere / "z.csv").read_bytes() == (tmp_path / "r.csv").read_bytes()
