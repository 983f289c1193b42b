"""The one cut rule: predict, a map folder voted with itself, a recipe and the level rule agree everywhere."""

import json

import numpy as np
import pytest

from handseg.common.constants import NUM_CLASSES
from handseg.ensemble.masks import GRID, cut_value, level_cuts
from handseg.formats.probs import quantise_probs
from handseg.formats.recipe import SOFT, ClassRecipe, Recipe, RecipeConfig
from handseg.formats.submission import read_predictions
from handseg.selection.apply import apply_recipe
from tests.conftest import run_cli, train_tiny


def test_level_cuts_are_255_t_sum_w():
    assert level_cuts(0.5) == 127.5
    np.testing.assert_array_equal(level_cuts([0.2, 0.8], 3.0), [153.0, 612.0])
    assert cut_value(SOFT, 0.4, 2.0) == pytest.approx(204.0) and cut_value("config", 0.4) == pytest.approx(102.0)
    assert cut_value("hard", 2) == 1.5


def test_a_probability_on_a_level_boundary_is_cut_by_its_stored_level():
    # p = 0.4995 is stored as round(127.37) = 127, which is not above 127.5: not in the mask at t = 0.5,
    # although a float map read without handseg would not decide it differently (both say no); p = 0.5005
    # is stored as 128 and is in: the rule is on the level, never on the float
    q = quantise_probs(np.array([0.4995, 0.5005, 0.502]))
    np.testing.assert_array_equal(q, [127, 128, 128])
    np.testing.assert_array_equal(q > level_cuts(0.5), [False, True, True])


@pytest.fixture(scope="module")
def predicted(synth_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("cut")
    return base, train_tiny(synth_data / "train", base / "run")


def test_predict_vote_soft_and_the_recipe_give_identical_masks_at_every_threshold(predicted, synth_data, capsys):
    base, run = predicted
    data = synth_data / "test"
    checked = 0
    for t in GRID:
        thr = base / f"t{t}.json"
        thr.write_text(json.dumps([t] * NUM_CLASSES))
        out, maps = base / f"p{t}.csv", base / f"maps{t}"
        code, _, err = run_cli(["predict", run, "--data", data, "-o", out, "--probs", maps, "--thresholds", thr,
                                "--device", "cpu"], capsys)
        assert code == 0, err
        code, _, err = run_cli(["vote", "soft", maps, maps, "-o", base / f"v{t}.csv", "--threshold", t], capsys)
        assert code == 0, err
        recipe = Recipe(configs=[RecipeConfig(name="m", runs={0: run}, transforms=["identity"], merge="mean",
                                              card={})],
                        classes=[ClassRecipe(source="m", threshold=t)] * NUM_CLASSES, soft_weights=[1.0])
        apply_recipe(recipe, {"m": maps}, base / f"r{t}.csv")
        rows = [sorted((base / f"{k}{t}.csv").read_text().splitlines()) for k in ("p", "v", "r")]
        assert rows[0] == rows[1] == rows[2], t
        assert len(read_predictions(base / f"p{t}.csv").images) == 4
        checked += sum(bool(line.split(",")[2]) for line in rows[0][:-1])
    assert checked  # some masks are not empty: the comparison saw pixels


def test_whole_number_cuts_cut_every_level_as_the_one_rule_does():
    """predict compares round(255 p), held as float32 (in place), or uint8 levels with floor(255 t): the same
    pixels as the stored level against 255 t, at thresholds whose cut is (nearly) a whole number too."""
    import torch

    from handseg.ensemble.masks import integer_cuts, level_cuts
    from handseg.formats.probs import levels_inplace, quantise_probs

    p = torch.cat([torch.arange(256, dtype=torch.float32) / 255, torch.rand(4000)])  # every level, and others
    q = quantise_probs(p)
    for t in [*GRID, 127 / 255, 128 / 255, 0.5, 1e-6, 0.999999, 100.5 / 255]:
        want = q.numpy() > level_cuts(t)
        whole = float(integer_cuts(t))
        assert whole == int(whole)
        assert np.array_equal((levels_inplace(p.clone()) > torch.tensor(whole, dtype=torch.float32)).numpy(), want), t
        assert np.array_equal((q > torch.tensor(whole, dtype=torch.uint8)).numpy(), want), t
    assert torch.equal(levels_inplace(p.clone()).to(torch.uint8), q)
    a = p.numpy().copy()
    assert np.array_equal(levels_inplace(a).astype(np.uint8), quantise_probs(p.numpy()))
