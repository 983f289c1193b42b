"""`handseg select` through the real CLI: the recipe, the table, and bad inputs."""

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.selection.test_search import truth_masks, write_config, write_labelled, write_oof


@pytest.fixture()
def two_configs(tmp_path):
    """Two configurations x 2 folds over 4 hand-made images: A exact but for a false one-pixel blob in every
    class (keep-largest removes it), B the same blob and one pixel too wide. The soft vote drops B's extra
    column (mean 0.45) but keeps the blob (0.9), so the first exact candidate is A with keep-largest."""
    data = write_labelled(tmp_path / "data", 4)
    truth = truth_masks(data)
    a, b = {}, {}
    for name, masks in truth.items():
        pa = masks * np.float32(0.9)
        pa[:, 46, 58] = 0.9
        a[name] = pa
        b[name] = (masks | np.roll(masks, 1, axis=2)) * np.float32(0.9)
        b[name][:, 46, 58] = 0.9
    runs = write_config(tmp_path / "runs", "unet", a, 2, data) + write_config(tmp_path / "runs", "fpn", b, 2, data)
    return tmp_path, data, runs


def test_select_writes_recipe_and_prints_table(two_configs, capsys):
    tmp_path, data, runs = two_configs
    out = tmp_path / "recipe.json"
    code, stdout, err = run_cli(["select", *runs, "-o", out, "-j", 1], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["cv_dice"] == pytest.approx(1.0, abs=1e-12)
    assert doc["chosen"] == "unet/resnet34@64 + keep-largest"
    assert all(doc["classes"][c]["source"] == "unet/resnet34@64" and doc["classes"][c]["keep_largest"]
               for c in doc["classes"])
    assert len(doc["candidates"]) == 28 and all({"name", "cv_dice"} <= c.keys() for c in doc["candidates"])
    assert doc["candidates"][0]["name"] == doc["chosen"]
    assert doc["uses"] == ["unet/resnet34@64"] and doc["data"] == str(data.resolve())
    assert doc["configurations"][1]["runs"] == {"0": "runs/fpn_f0", "1": "runs/fpn_f1"}
    # the table (names may wrap in an 80-column console) and the chosen line
    for words in ("OOF Dice", "tuned on other", "hard vote", "soft vote", "+0.0000",
                  "chosen: unet/resnet34@64 + keep-largest: OOF Dice 1.0000"):
        assert words in stdout, words
    manifest = json.loads((tmp_path / "recipe.manifest.json").read_text())
    assert manifest["stage"] == "select" and manifest["inputs"]["runs"] == [str(r) for r in runs]

    code, _, err = run_cli(["select", *runs, "-o", out], capsys)
    assert code == 2 and "already exists" in err
    flat = " ".join(stdout.split())
    assert "Out-of-fold maps come from each run's best checkpoint, whose epoch was chosen on these same images: " \
           "every figure here leans optimistic." in flat and "still optimistic" not in flat
    code, stdout, err = run_cli(["select", *runs, "-o", out, "--overwrite", "--data", data, "--choose", "nested"],
                                capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["chosen_by"] == "nested"
    # the chosen row is the highest of many nested estimates on the same images: said in the table and the line
    flat = " ".join(stdout.split())
    assert "The chosen row was picked for its 'tuned on other folds' figure among 28 candidates on the same " \
           "images, so its figure is still optimistic." in flat
    assert "tuned on other folds (the highest of 28 such estimates on the same images: still optimistic)" in flat


def test_select_bad_inputs_exit_2_with_one_line_and_no_recipe(two_configs, capsys):
    tmp_path, data, runs = two_configs
    out = tmp_path / "bad.json"
    bare = tmp_path / "bare"
    bare.mkdir()
    maps = {n: m * np.float32(0.9) for n, m in truth_masks(data).items()}
    fold0 = json.loads((runs[0] / "oof" / "index.json").read_text())["images"]
    first_fold = {n: m for n, m in maps.items() if n in fold0}
    overlap = write_oof(tmp_path / "again", 0, first_fold, "unet", data)
    (runs[3] / "oof" / "image1000.npy").unlink(missing_ok=True)
    (runs[3] / "oof" / "image1002.npy").unlink(missing_ok=True)
    cases = [([*runs[:2], bare], "bare: no oof/ folder"),
             ([*runs[:2], overlap], "overlapping folds"),
             (runs, "probability map for image100"),
             (runs[:1], "no out-of-fold map for 2 of 4 images"),
             ([tmp_path / "nope"], "nope: run folder not found")]
    for args, words in cases:
        code, _, err = run_cli(["select", *args, "-o", out], capsys)
        assert code == 2, args
        assert words in err and err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists() and not (tmp_path / "bad.manifest.json").exists()
    code, _, err = run_cli(["select", *runs[:2], "-o", out, "--choose", "best"], capsys)
    assert code == 2 and "--choose" in err


def test_select_help_has_an_example(capsys):
    code, out, _ = run_cli(["select", "--help"], capsys)
    assert code == 0 and "Example" in out and "--keep-largest" not in out
