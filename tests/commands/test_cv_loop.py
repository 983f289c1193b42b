"""The cross-validation loop end to end: train writes out-of-fold maps, select chooses a recipe, predict
--recipe applies it; on the training images (--oof) it reproduces the Dice select reported."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_train_oof_select_and_predict_recipe(synth_data, tmp_path, capsys):
    train = synth_data / "train"
    splits = tmp_path / "splits.json"
    assert run_cli(["kfold", "--data", train, "--folds", 2, "-o", splits], capsys)[0] == 0
    runs = []
    for size in (64, 96):
        for fold in (0, 1):
            out = tmp_path / f"s{size}_f{fold}"
            code, _, err = run_cli(["train", "--data", train, "--splits", splits, "--fold", fold, "--arch", "unet",
                                    "--encoder", "resnet18", "--encoder-weights", "none", "--size", size,
                                    "--epochs", 1, "--batch-size", 4, "--lr", "3e-3", "--workers", 0, "--device",
                                    "cpu", "--augment", "none", "--out", out]
                                   + (["--oof-tta", "hflip"] if size == 96 else []), capsys)
            assert code == 0, err
            manifest = json.loads((out / "oof" / "manifest.json").read_text())
            assert manifest["fold"] == fold and manifest["card"]["size"] == size
            assert manifest["transforms"] == (["identity", "hflip"] if size == 96 else ["identity"])
            runs.append(out)

    recipe = tmp_path / "recipe.json"
    code, out, err = run_cli(["select", *runs, "-o", recipe, "-j", 1], capsys)
    assert code == 0, err
    doc = json.loads(recipe.read_text())
    assert len(doc["configurations"]) == 2 and doc["candidates"]
    assert doc["cv_dice"] >= max(c["cv_dice"] for c in doc["candidates"]) - 1e-12

    # the recipe's runs are inputs: no output of export --recipe or predict --recipe goes into one
    for args in (["export", "--recipe", recipe, "-o", runs[1] / "model.zip"],
                 ["predict", "--recipe", recipe, "--data", synth_data / "test", "-o", runs[2] / "sub.csv"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "lies inside an input of this command" in err and not (args[-1]).exists(), err

    # every training image again, each by the fold models that did not see it: the Dice select reported
    code, out, err = run_cli(["predict", "--recipe", recipe, "--oof", "--data", train, "-o", tmp_path / "oof.csv",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    reported = json.loads((tmp_path / "oof.manifest.json").read_text())["dice"]
    assert reported == pytest.approx(doc["cv_dice"], abs=1e-9)

    # and the test images, folds averaged, with the maps of each configuration kept
    code, out, err = run_cli(["predict", "--recipe", recipe, "--data", synth_data / "test", "-o",
                              tmp_path / "sub.csv", "--probs", tmp_path / "maps", "--device", "cpu"], capsys)
    assert code == 0, err
    from handseg.formats.submission import read_predictions

    assert len(read_predictions(tmp_path / "sub.csv").images) == 4
    assert len([p for p in (tmp_path / "maps").iterdir() if p.is_dir()]) == len(json.loads(
        (tmp_path / "maps" / "manifest.json").read_text())["members"])
    code, _, err = run_cli(["predict", runs[0], "--recipe", recipe, "-o", tmp_path / "x.csv"], capsys)
    assert code == 2 and "not both" in err

    # one file for another machine: the recipe and its runs, or plain runs
    code, _, err = run_cli(["export", "--recipe", recipe, "-o", tmp_path / "model.zip"], capsys)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "model.zip").rename(elsewhere / "model.zip")
    code, _, err = run_cli(["predict", elsewhere / "model.zip", "--data", synth_data / "test", "-o",
                            elsewhere / "sub.csv", "--device", "cpu"], capsys)
    assert code == 0, err
    assert (elsewhere / "sub.csv").read_bytes() == (tmp_path / "sub.csv").read_bytes()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model.zip", "sub.csv", "sub.manifest.json"]
    code, _, err = run_cli(["export", runs[0], runs[1], "-o", tmp_path / "f.zip"], capsys)
    assert code == 0, err
    for args, name in (([runs[0], runs[1]], "runs.csv"), ([tmp_path / "f.zip"], "zip.csv")):
        assert run_cli(["predict", *args, "--data", synth_data / "test", "-o", tmp_path / name, "--device", "cpu"],
                       capsys)[0] == 0
    assert (tmp_path / "runs.csv").read_bytes() == (tmp_path / "zip.csv").read_bytes()
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not really")
    code, _, err = run_cli(["predict", tmp_path / "junk.zip", "-o", tmp_path / "j.csv"], capsys)
    assert code == 2 and "junk.zip: not a handseg model zip" in err

    # a recipe pins its checkpoints: another file at a run's path is refused, not used
    code, _, err = run_cli(["predict", elsewhere / "model.zip", "--recipe", recipe, "-o", tmp_path / "y.csv"], capsys)
    assert code == 2 and "not both" in err
    import shutil

    shutil.copy(runs[1] / "best.safetensors", runs[0] / "best.safetensors")
    code, _, err = run_cli(["predict", "--recipe", recipe, "--data", synth_data / "test", "-o", tmp_path / "w.csv",
                            "--device", "cpu"], capsys)
    assert code == 2 and "SHA-256 changed" in err and "select` again" in err
