"""The demo chain end to end (CPU, tiny), and the reports' numbers against direct computation."""

import json
import re

import numpy as np
import pytest

from handseg.analysis.compare import compare_predictions
from handseg.data.images import read_image
from handseg.data.labels import class_masks, read_polygons
from handseg.data.layout import discover
from handseg.formats.rle import rle_encode
from handseg.formats.submission import write_predictions
from tests.commands.test_compare import _page_data
from tests.conftest import run_cli


def _only_embedded_images(page: str) -> None:
    """The page's own images (figures, thumbnails) are embedded, nothing is fetched from the web; the
    full-resolution overlays are files the viewer links to (see tests/commands/test_compare.py)."""
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert sources, "report has no images"
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--out", out, "--ids", 5, "--size", 64, "--epochs", 1], capsys)
    assert code == 0, err
    for path in ("scores.json", "report/index.html", "eda/index.html", "vote_hard.csv", "vote_soft.csv",
                 "pred_tta.csv", "runs/fold0/best.safetensors", "runs/fold1/last.safetensors"):
        assert (out / path).exists(), path
    # one epoch at 64 px misses small bones on every test image: pseudo keeps nothing, says so, writes nothing
    assert "pseudo kept no image" in stdout and "pseudo labels: none kept" in stdout
    assert not (out / "pseudo").exists()
    scores = json.loads((out / "scores.json").read_text())
    assert 0.0 <= scores["mean_dice"] <= 1.0 and len(scores["results"]) == 6
    recipe = json.loads((out / "recipe.json").read_text())
    assert 0.0 <= recipe["cv_dice"] <= 1.0 and recipe["candidates"]
    _only_embedded_images((out / "report" / "index.html").read_text())
    _only_embedded_images((out / "eda" / "index.html").read_text())
    # every test image in the comparison's table, with its differences from the ground truth for all 6 CSVs
    rows = _page_data(out / "report")["rows"]
    assert len(rows) == len(discover(out / "data" / "test_gt", labels="required"))
    for row in rows:
        assert all((out / "report" / row["diffs"][f"csv{k}"]["full"]).is_file() for k in range(1, 7))
    assert len(_page_data(out / "eda")["rows"]) == len(discover(out / "data" / "train"))
    # the one overwrite rule: a second demo into the same folder needs --overwrite
    code, _, err = run_cli(["demo", "--out", out, "--ids", 5, "--size", 64, "--epochs", 1], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err and (out / "scores.json").exists()


def test_compare_report_numbers(synth_data, tmp_path, capsys):
    gt = synth_data / "test_gt"
    samples = discover(gt, labels="required")
    masks = {s.name: class_masks(read_polygons(s.label_path), read_image(s.image_path).shape) for s in samples}
    write_predictions(tmp_path / "perfect.csv", [(n, [rle_encode(m) for m in ms]) for n, ms in masks.items()])
    shifted = {n: np.roll(ms, 2, axis=2) for n, ms in masks.items()}
    write_predictions(tmp_path / "shifted.csv", [(n, [rle_encode(m) for m in ms]) for n, ms in shifted.items()])
    write_predictions(tmp_path / "third.csv", [(n, [rle_encode(m) for m in np.roll(ms, -1, axis=1)])
                                               for n, ms in masks.items()])
    csvs = [tmp_path / "perfect.csv", tmp_path / "shifted.csv", tmp_path / "third.csv"]
    code, _, err = run_cli(["compare", *csvs, "--gt", gt, "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    page = (tmp_path / "rep" / "index.html").read_text()
    _only_embedded_images(page)
    for png in ("per_class.png", "similarity.png"):
        assert (tmp_path / "rep" / png).is_file()
    # the shifted CSV's mean Dice, computed directly from the masks, appears in the report
    eps = 1e-4
    direct = np.mean([[(2 * (masks[n][c] & shifted[n][c]).sum() + eps) / (masks[n][c].sum() + shifted[n][c].sum() + eps)
                       for c in range(29)] for n in masks], axis=0).mean()
    result = compare_predictions(csvs, gt)
    assert result.reports[1].mean_dice == pytest.approx(direct)
    assert f"{direct:.4f}" in page


def test_eda_report_numbers(synth_data, tmp_path, capsys):
    code, _, err = run_cli(["eda", "--data", synth_data / "train", "--out", tmp_path / "eda"], capsys)
    assert code == 0, err
    page = (tmp_path / "eda" / "index.html").read_text()
    _only_embedded_images(page)
    samples = discover(synth_data / "train", labels="required")
    multi = total = 0
    for s in samples:
        count = class_masks(read_polygons(s.label_path), read_image(s.image_path).shape).sum(axis=0)
        multi += int((count > 1).sum())
        total += int((count > 0).sum())
    assert f"{multi} of {total} bone pixels carry two or more labels" in page
    assert "Trapezium / Trapezoid" in page and "Triquetrum / Pisiform" in page
    assert f"<td>images</td><td>{len(samples)}</td>" in page


def test_diff_overlay_colours_class_by_class():
    from handseg.analysis.reports.overlays import diff_overlay

    a = np.zeros((2, 1, 4), bool)
    b = np.zeros((2, 1, 4), bool)
    a[0, 0, 0] = b[0, 0, 0] = True  # agree
    a[0, 0, 1] = True  # missed
    b[1, 0, 2] = True  # extra
    a[0, 0, 3] = b[1, 0, 3] = True  # same pixel, other class
    rgb = diff_overlay(None, a, b, width=4)
    assert rgb[0].tolist() == [[255, 255, 255], [255, 40, 40], [40, 220, 40], [255, 210, 0]]
