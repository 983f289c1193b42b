import json

import pytest

from handseg.common.constants import CLASSES
from handseg.data.images import read_image
from handseg.data.labels import class_masks, read_polygons
from handseg.data.layout import discover
from handseg.formats.rle import rle_encode
from handseg.formats.submission import write_predictions
from tests.conftest import run_cli


def test_synth_prep_kfold_chain(tmp_path, capsys):
    data = tmp_path / "data"
    assert run_cli(["synth", data, "--ids", 3, "--test-ids", 1, "--size", 96, "--seed", 2], capsys)[0] == 0
    assert json.loads((data / "manifest.json").read_text())["stage"] == "synth"
    code, _, err = run_cli(["synth", data, "--ids", 3], capsys)
    assert code == 2 and "--overwrite" in err

    assert run_cli(["prep", "json2npy", "--data", data / "train", "--workers", 1], capsys)[0] == 0
    assert run_cli(["prep", "png2npy", "--data", data / "train", "-o", data / "train" / "cache"], capsys)[0] == 0
    code, out, _ = run_cli(["prep", "json2npy", "--data", data / "train"], capsys)
    assert "0 written, 6 up to date" in out
    manifest = json.loads((data / "train" / "cache" / "masks" / "manifest.json").read_text())
    assert manifest["stage"] == "prep-masks" and len(manifest["samples"]) == 6 and manifest["classes"] == list(CLASSES)

    splits = tmp_path / "splits.json"
    assert run_cli(["kfold", "--data", data / "train", "--folds", 3, "-o", splits], capsys)[0] == 0
    doc = json.loads(splits.read_text())
    assert doc["n_folds"] == 3 and len(doc["images"]) == 6 and doc["manifest"]["stage"] == "kfold"
    code, _, err = run_cli(["kfold", "--data", data / "train", "-o", splits], capsys)
    assert code == 2 and "already exists" in err
    assert run_cli(["kfold", "--data", data / "train", "--folds", 3, "-o", splits, "--overwrite",
                    "--stratify", "sex"], capsys)[0] == 0


def _gt_rows(data_dir):
    rows = []
    for s in discover(data_dir, labels="required"):
        masks = class_masks(read_polygons(s.label_path), read_image(s.image_path).shape)
        rows.append((s.name, masks))
    return rows


def test_compare_scores_worked_out_by_hand(tmp_path, capsys, synth_data):
    # reference: image a has finger-1 = pixels {1,2,3,4} (RLE "2 4"); prediction has {3,4,5} ("4 3")
    # Dice = 2*2 / (4 + 3) for (a, finger-1); every other cell is empty in both (Dice 1)
    ref = [("a.png", ["2 4"] + [""] * 28), ("b.png", [""] * 29)]
    pred = [("a.png", ["4 3"] + [""] * 28), ("b.png", ["1 1"] + [""] * 28)]
    write_predictions(tmp_path / "ref.csv", ref)
    write_predictions(tmp_path / "pred.csv", pred)
    code, out, _ = run_cli(["compare", tmp_path / "ref.csv", tmp_path / "pred.csv", "--json", tmp_path / "s.json"],
                           capsys)
    assert code == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    eps = 1e-4
    a = (2 * 2 + eps) / (4 + 3 + eps)
    b = (0 + eps) / (0 + 1 + eps)
    assert scores["per_class"]["finger-1"] == pytest.approx((a + b) / 2)
    assert scores["per_class"]["Ulna"] == pytest.approx(1.0)
    assert scores["mean_dice"] == pytest.approx(((a + b) / 2 + 28) / 29)
    assert "finger-1" in out and "mean" in out


def test_compare_against_gt_folder(tmp_path, capsys, synth_data):
    gt = synth_data / "test_gt"
    rows = _gt_rows(gt)
    perfect = [(name, [rle_encode(m) for m in masks]) for name, masks in rows]
    write_predictions(tmp_path / "perfect.csv", perfect)
    # drop the Radius in the first image: that cell scores ~0
    damaged = [(name, [("" if (i == 0 and c == CLASSES.index("Radius")) else rle_encode(m))
                       for c, m in enumerate(masks)]) for i, (name, masks) in enumerate(rows)]
    write_predictions(tmp_path / "damaged.csv", damaged)
    code, _, _ = run_cli(["compare", tmp_path / "perfect.csv", tmp_path / "damaged.csv", "--gt", gt,
                          "--json", tmp_path / "s.json"], capsys)
    assert code == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["mean_dice"] == pytest.approx(1.0)
    damaged_scores = doc["results"][str(tmp_path / "damaged.csv")]
    n = len(rows)
    assert damaged_scores["per_class"]["Radius"] == pytest.approx((n - 1) / n, abs=1e-6)
    assert damaged_scores["mean_dice"] == pytest.approx(1 - 1 / n / 29, abs=1e-6)


def test_compare_mismatched_images_is_an_error(tmp_path, capsys):
    write_predictions(tmp_path / "a.csv", [("a.png", [""] * 29)])
    write_predictions(tmp_path / "b.csv", [("b.png", [""] * 29)])
    code, _, err = run_cli(["compare", tmp_path / "a.csv", tmp_path / "b.csv"], capsys)
    assert code == 2 and "different image sets" in err and "b.csv" in err


def test_compare_runs_past_image_is_an_error(tmp_path, capsys, synth_data):
    rows = [(name, [""] * 29) for name, _ in _gt_rows(synth_data / "test_gt")]
    rows[0][1][0] = f"1 {128 * 128 + 5}"
    write_predictions(tmp_path / "big.csv", rows)
    code, _, err = run_cli(["compare", tmp_path / "big.csv", "--gt", synth_data / "test_gt"], capsys)
    assert code == 2 and "past the end" in err




def test_train_config_file_then_flags(tmp_path, capsys, synth_data):
    config = tmp_path / "run.yaml"
    config.write_text("arch: unet\nencoder: resnet18\nencoder-weights: none\nsize: 64\nepochs: 3\nbatch_size: 4\n"
                      "workers: 0\ndevice: cpu\naugment: none\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", config, "--epochs", 1, "--data", synth_data / "train",
                            "--out", out], capsys)
    assert code == 0, err
    options = json.loads((out / "manifest.json").read_text())["options"]
    chosen = (options["arch"], options["encoder"], options["size"], options["augment"])
    assert chosen == ("unet", "resnet18", 64, "none")
    assert options["epochs"] == 1  # the flag wins over the file
    config.write_text("arch: unet\nlearning_rate: 3\n")
    code, _, err = run_cli(["train", "--config", config, "--out", tmp_path / "r2"], capsys)
    assert code == 2 and "unknown option 'learning_rate' in config" in err
