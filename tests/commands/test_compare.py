"""``compare`` and ``eda`` through the CLI on a non-square labelled folder: the per-image table, the
full-resolution overlays at each image's real size, ``--json -``, size checks, the output rule, and
the page itself in headless Chromium (where installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from handseg.analysis.reports.overlays import DIFF_COLOURS
from handseg.common.constants import CLASS_INDEX, CLASSES, NUM_CLASSES
from handseg.data.anatomy import hand_side, wrist_bend
from handseg.data.images import read_image
from handseg.data.labels import class_masks, polygon_document, read_polygons
from handseg.data.layout import discover
from handseg.data.meta import read_meta
from handseg.formats.files import atomic_write_json
from handseg.formats.rle import rle_encode
from handseg.formats.submission import write_predictions
from tests.conftest import run_cli

H, W = 120, 100  # the cropped images: taller than wide
EPS = 1e-4


@pytest.fixture(scope="module")
def folder(synth_data, tmp_path_factory) -> Path:
    """synth_data's test_gt cropped to 120 x 100 (polygons moved with it), with the data set's meta data
    (which also has rows for patients that are not in this folder) beside it."""
    root = tmp_path_factory.mktemp("nonsquare")
    out = root / "gt"
    for s in discover(synth_data / "test_gt", labels="required"):
        image = read_image(s.image_path)[4 : 4 + H, 14 : 14 + W]
        polygons = {k: v - np.array([14, 4], np.int32) for k, v in read_polygons(s.label_path).items()}
        (out / "DCM" / s.patient).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "DCM" / s.patient / s.name), image)
        atomic_write_json(out / "outputs_json" / s.patient / f"{s.stem}.json",
                          polygon_document(polygons, f"{s.stem}.jpg", f"/x/{s.patient}"))
    shutil.copy(synth_data / "meta_data.xlsx", root / "meta_data.xlsx")
    return out


@pytest.fixture(scope="module")
def truth(folder) -> dict[str, np.ndarray]:
    return {s.name: class_masks(read_polygons(s.label_path), read_image(s.image_path).shape)
            for s in discover(folder, labels="required")}


def _write(path: Path, masks: dict[str, np.ndarray]) -> Path:
    write_predictions(path, [(n, [rle_encode(m) for m in ms]) for n, ms in masks.items()])
    return path


@pytest.fixture(scope="module")
def csvs(truth, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("csvs")
    swapped = {}
    for n, ms in truth.items():
        s = ms.copy()
        s[[CLASS_INDEX["Radius"], CLASS_INDEX["Ulna"]]] = s[[CLASS_INDEX["Ulna"], CLASS_INDEX["Radius"]]]
        swapped[n] = s
    return {"perfect": _write(d / "perfect.csv", truth),
            "shifted": _write(d / "shifted.csv", {n: np.roll(ms, 2, axis=2) for n, ms in truth.items()}),
            "swapped": _write(d / "swapped.csv", swapped)}


def _dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-class Dice of (29, H, W) masks, computed directly."""
    inter = (a & b).reshape(NUM_CLASSES, -1).sum(axis=1)
    return (2 * inter + EPS) / (a.reshape(NUM_CLASSES, -1).sum(axis=1) + b.reshape(NUM_CLASSES, -1).sum(axis=1) + EPS)


def _page_data(report: Path) -> dict:
    page = (report / "index.html").read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="hs-data">(.*?)</script>', page, re.S)
    assert found, "no embedded data"
    return json.loads(found.group(1))


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def _one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert out == "", out  # nothing else printed before the error
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _no_partial(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


# ----------------------------------------------------------------------------------------------
# the compare report


def test_compare_report_lists_every_image_with_full_size_overlays(folder, truth, csvs, tmp_path, capsys):
    report = tmp_path / "rep"
    args = [csvs["perfect"], csvs["shifted"], csvs["swapped"], "--gt", folder, "--out", report]
    code, _, err = run_cli(["compare", *args], capsys)
    assert code == 0, err
    data = _page_data(report)
    assert [r["image"] for r in data["rows"]] == list(truth)  # one row per image, in submission order
    assert [p["key"] for p in data["panels"]] == ["gt", "csv1", "csv2", "csv3"]
    assert len(data["colours"]) == 29 and len(set(data["colours"])) == 29
    for row in data["rows"]:
        masks = truth[row["image"]]
        assert row["size"] == [H, W]
        sample = next(s for s in discover(folder) if s.name == row["image"])
        assert (report / row["xray"]).resolve() == sample.image_path.resolve()  # linked, relative
        assert not row["xray"].startswith("/")
        for key in ("gt", "csv1", "csv2", "csv3"):
            assert _read(report / row["layers"][key]["full"]).shape == (H, W, 4)
            assert (report / row["layers"][key]["sprite"]).is_file()
        for key in ("csv1", "csv2", "csv3"):
            assert _read(report / row["diffs"][key]["full"]).shape == (H, W, 4)
        # the ground-truth overlay covers exactly the labelled pixels
        alpha = _read(report / row["layers"]["gt"]["full"])[..., 3]
        assert ((alpha > 0) == masks.any(axis=0)).all()
        # the shifted CSV's differences, against flags worked out from the masks
        shifted = np.roll(masks, 2, axis=2)
        missed = (masks & ~shifted).any(axis=0)
        extra = (shifted & ~masks).any(axis=0)
        agree = (masks & shifted).any(axis=0) & ~missed & ~extra
        diff = _read(report / row["diffs"]["csv2"]["full"])
        for where, name in ((agree, "agree"), (missed & ~extra, "missed"), (extra & ~missed, "extra"),
                            (missed & extra, "confused")):
            assert (diff[where] == [*DIFF_COLOURS[name][::-1], 255]).all(), name
        assert (diff[~(agree | missed | extra)][:, 3] == 0).all()
        # the table's numbers: per class, per CSV, worked out directly
        assert row["class_dice"]["csv2"] == pytest.approx(_dice(masks, shifted), abs=5e-5)
        assert row["values"]["csv1"] == pytest.approx(1.0)
        swapped_dice = _dice(masks, np.stack([masks[i] for i in (*range(27), 28, 27)]))
        assert row["values"]["worst"] in ("Radius", "Ulna")
        assert row["values"]["worst_dice"] == pytest.approx(min(swapped_dice.min(), _dice(masks, shifted).min()))
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["stage"] == "compare" and manifest["images"] == len(truth)


def test_compare_without_gt_takes_sizes_and_xrays_from_data(folder, truth, csvs, tmp_path, capsys):
    report = tmp_path / "rep"
    code, _, err = run_cli(["compare", csvs["shifted"], csvs["perfect"], "--data", folder, "--out", report], capsys)
    assert code == 0, err
    data = _page_data(report)
    assert [p["key"] for p in data["panels"]] == ["ref", "csv1"]
    assert len(data["rows"]) == len(truth)
    for row in data["rows"]:
        # the reference's (shifted) masks at the real, non-square size: no guessed square side
        alpha = _read(report / row["layers"]["ref"]["full"])[..., 3]
        assert alpha.shape == (H, W)
        assert ((alpha > 0) == np.roll(truth[row["image"]], 2, axis=2).any(axis=0)).all()
        assert _read(report / row["diffs"]["csv1"]["full"]).shape == (H, W, 4)


def test_compare_out_needs_the_images(csvs, tmp_path, capsys):
    code, out, err = run_cli(["compare", csvs["perfect"], csvs["shifted"], "--out", tmp_path / "rep"], capsys)
    _one_line_error(code, out, err, "--data")
    _no_partial(tmp_path, "rep")


# ----------------------------------------------------------------------------------------------
# --json


def _expected_scores(truth, shift) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    per_image = {n: _dice(ms, np.roll(ms, shift, axis=2)) for n, ms in truth.items()}
    return np.mean(list(per_image.values()), axis=0), per_image


@pytest.mark.parametrize("three", [False, True])
def test_json_to_stdout_has_one_schema(folder, truth, csvs, tmp_path, capsys, three):
    names = [csvs["shifted"], csvs["perfect"], csvs["swapped"]] if three else [csvs["shifted"]]
    extra = ["--out", tmp_path / "rep"] if three else []
    code, out, err = run_cli(["compare", *names, "--gt", folder, "--json", "-", *extra], capsys)
    assert code == 0, err
    doc = json.loads(out)  # stdout holds the JSON and nothing else
    assert "Dice against" in err  # the table went to stderr
    assert not (tmp_path / "-").exists()
    per_class, per_image = _expected_scores(truth, 2)
    assert doc["reference"] == str(folder) and doc["classes"] == list(CLASSES)
    assert doc["csv"] == str(names[0])
    assert doc["mean_dice"] == pytest.approx(per_class.mean())
    assert doc["per_class"] == pytest.approx(dict(zip(CLASSES, per_class)))
    assert doc["per_image"] == pytest.approx({n: d.mean() for n, d in per_image.items()})
    assert set(doc["per_image_class"]) == set(truth)
    for n, d in per_image.items():
        assert doc["per_image_class"][n] == pytest.approx(d, abs=1e-6)
    assert list(doc["results"]) == [str(n) for n in names]
    for key in ("csv", "mean_dice", "per_class", "per_image", "per_image_class"):
        assert doc["results"][str(names[0])][key] == doc[key]
    code, help_text, _ = run_cli(["compare", "--help"], capsys)
    assert code == 0 and all(key in help_text for key in doc)  # the help documents every key it writes
    if three:
        assert doc["results"][str(csvs["perfect"])]["mean_dice"] == pytest.approx(1.0)
        assert set(doc["results"][str(csvs["swapped"])]) == set(doc["results"][str(names[0])])


def test_json_file_follows_the_output_rule(folder, csvs, tmp_path, capsys):
    target = tmp_path / "scores.json"
    target.write_text("keep")
    code, out, err = run_cli(["compare", csvs["shifted"], "--gt", folder, "--json", target], capsys)
    _one_line_error(code, out, err, "already exists", "--overwrite")
    assert target.read_text() == "keep"
    code, _, err = run_cli(["compare", csvs["shifted"], "--gt", folder, "--json", target, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(target.read_text())["results"]


# ----------------------------------------------------------------------------------------------
# runs against the image size


def _bad_csv(truth, path: Path, rle: str, image: str, cls: str = "Lunate") -> Path:
    rows = []
    for n, ms in truth.items():
        rles = [rle_encode(m) for m in ms]
        if n == image:
            rles[CLASS_INDEX[cls]] = rle
        rows.append((n, rles))
    write_predictions(path, rows)
    return path


def test_rle_past_the_image_end_is_one_line_naming_csv_image_and_class(folder, truth, csvs, tmp_path, capsys):
    image = list(truth)[-1]
    # ends one pixel past H x W: inside the square of the larger side that used to be guessed
    bad = _bad_csv(truth, tmp_path / "bad.csv", f"{H * W} 2", image)  # 1-indexed: pixels H*W-1 and H*W
    for args in (["compare", bad, "--gt", folder],
                 ["compare", csvs["perfect"], bad, "--data", folder],
                 ["compare", csvs["perfect"], bad, "--data", folder, "--out", tmp_path / "rep"],
                 ["eda", "--data", folder, "--pred", bad, "--out", tmp_path / "eda"]):
        code, out, err = run_cli(args, capsys)
        _one_line_error(code, out, err, str(bad), image, "Lunate", f"{H} x {W}")
    _no_partial(tmp_path, "rep")
    _no_partial(tmp_path, "eda")
    huge = _bad_csv(truth, tmp_path / "huge.csv", "4000000000 10", image, "Radius")
    code, out, err = run_cli(["compare", csvs["perfect"], huge, "--data", folder, "--out", tmp_path / "rep"], capsys)
    _one_line_error(code, out, err, str(huge), "Radius")
    # without any sizes only the Dice is computed, on the runs
    code, out, err = run_cli(["compare", csvs["perfect"], bad], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# output folders


@pytest.mark.parametrize("command", ["compare", "eda"])
def test_existing_output_is_refused_before_the_work_and_replaced_whole(command, folder, csvs, tmp_path, capsys):
    report = tmp_path / "rep"
    report.mkdir()
    (report / "stale.png").write_text("from an earlier run")
    bad = tmp_path / "broken.csv"
    bad.write_text("image_name,class,rle\nx.png,finger-1,1 2 3\n")
    args = (["compare", bad, "--gt", folder] if command == "compare" else ["eda", "--data", folder, "--pred", bad])
    # the output is checked first: the broken CSV is not even read
    code, out, err = run_cli([*args, "--out", report], capsys)
    _one_line_error(code, out, err, str(report), "already exists")
    assert [p.name for p in report.iterdir()] == ["stale.png"]
    good = (["compare", csvs["shifted"], "--gt", folder] if command == "compare"
            else ["eda", "--data", folder, "--pred", csvs["shifted"]])
    code, _, err = run_cli([*good, "--out", report, "--overwrite"], capsys)
    assert code == 0, err
    assert not (report / "stale.png").exists()  # replaced as a whole
    assert (report / "index.html").is_file() and (report / "overlays").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep.")]  # no build folder left beside it


def test_a_failure_midway_leaves_no_folder(folder, csvs, tmp_path, capsys, monkeypatch):
    # eda reads every X-ray: a PNG whose header survives but whose pixels do not fails on the last image
    broken = tmp_path / "gt"
    shutil.copytree(folder, broken)
    last = discover(broken, labels="required")[-1].image_path
    last.write_bytes(last.read_bytes()[:40])
    code, out, err = run_cli(["eda", "--data", broken, "--out", tmp_path / "eda"], capsys)
    _one_line_error(code, out, err, "truncated PNG", str(last))
    _no_partial(tmp_path, "eda")

    # compare, killed (Ctrl-C) while drawing its third image
    from handseg.analysis.reports.overlays import OverlayWriter

    calls = []
    decode = OverlayWriter.decode

    def interrupted(self, runs, shape):
        calls.append(1)
        if len(calls) > 2 * 4:  # the reference and three CSVs per image
            raise KeyboardInterrupt
        return decode(self, runs, shape)

    monkeypatch.setattr(OverlayWriter, "decode", interrupted)
    args = [csvs["shifted"], csvs["perfect"], csvs["swapped"], "--gt", folder, "--out", tmp_path / "rep"]
    code, _, err = run_cli(["compare", *args], capsys)
    assert code == 130 and "interrupted" in err
    _no_partial(tmp_path, "rep")


# ----------------------------------------------------------------------------------------------
# eda


def test_eda_lists_every_image_with_facts_dice_and_overlays(folder, truth, csvs, tmp_path, capsys):
    report = tmp_path / "eda"
    code, _, err = run_cli(["eda", "--data", folder, "--pred", csvs["shifted"], "--out", report], capsys)
    assert code == 0, err
    data = _page_data(report)
    samples = discover(folder, labels="required")
    assert [r["image"] for r in data["rows"]] == [s.rel for s in samples]
    meta = read_meta(folder.parent / "meta_data.xlsx")
    for row, s in zip(data["rows"], samples):
        polygons = read_polygons(s.label_path)
        values = row["values"]
        assert values["size"] == f"{W} x {H}" and row["size"] == [H, W]
        assert values["side"] == hand_side(polygons)
        assert values["bend"] == pytest.approx(wrist_bend(polygons), abs=0.01)
        assert values["age"] == pytest.approx(float(meta.loc[s.patient, "age"]))
        masks = truth[s.name]
        assert values["pred"] == pytest.approx(_dice(masks, np.roll(masks, 2, axis=2)).mean())
        for layer in (row["layers"]["gt"], row["layers"]["pred"], row["diffs"]["pred"]):
            assert _read(report / layer["full"]).shape == (H, W, 4)
        assert (report / row["xray"]).resolve() == s.image_path.resolve()
    page = (report / "index.html").read_text(encoding="utf-8")
    patients = sorted({s.patient for s in samples})
    assert len(meta) > len(patients)  # the spreadsheet has other patients, which the report leaves out
    assert (f"{len(patients)} of the {len(patients)} patients in {folder} have a row in "
            f"{folder.parent / 'meta_data.xlsx'} (which has {len(meta)} rows; the others are left out)") in page


# ----------------------------------------------------------------------------------------------
# the page in a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _dump_dom(page: Path, fragment: str = "") -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=2000", "--window-size=1400,1000",
             "--dump-dom", page.as_uri() + fragment],
            capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Uncaught" not in run.stderr, run.stderr[-2000:]
    return run.stdout, run.stderr


@pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_page_in_headless_chromium(folder, truth, csvs, tmp_path, capsys):
    report = tmp_path / "rep"
    code, _, err = run_cli(["compare", csvs["shifted"], csvs["swapped"], "--gt", folder, "--out", report], capsys)
    assert code == 0, err
    names = list(truth)

    # opened from the address: one image, one class, differences
    dom, _ = _dump_dom(report / "index.html", f"#image={names[1]}&class=Radius&view=diff")
    assert len(re.findall(r'<tr data-image="', dom)) == len(names)  # the table: every image
    assert set(re.findall(r'<tr data-image="([^"]+)"', dom)) == set(names)
    class_filter = re.search(r'<select id="hs-class">(.*?)</select>', dom, re.S).group(1)
    assert re.findall(r"<option[^>]*>([^<]*)</option>", class_filter) == ["all classes", *CLASSES]
    assert re.search(r'<div id="hs-viewer"(?![^>]*hidden)', dom), "the viewer is open"
    assert f'<span id="hs-title">{names[1]}</span>' in dom
    links = re.findall(r'<a href="([^"]+)" target="_blank" class="hs-full-link"', dom)
    assert len(links) == 3 + 2  # ground truth, two CSVs, two difference overlays
    for link in links:
        assert link.startswith("overlays/") and _read(report / link).shape == (H, W, 4)
    sprites = re.findall(r'class="hs-sprite" data-class="Radius" style="[^"]*url\(&quot;([^&]+)&quot;\)', dom)
    sprites += re.findall(r"class=\"hs-sprite\" data-class=\"Radius\" style=\"[^\"]*url\('([^']+)'\)", dom)
    assert len(sprites) == 3 and all((report / s).is_file() for s in sprites)  # ground truth + two differences
    legend = re.search(r'<div id="hs-legend">(.*)</div>', dom, re.S).group(1)
    swatches = re.findall(r'data-class="([^"]+)"><span class="swatch" style="background: ([^;"]+)', legend)
    assert [c for c, _ in swatches] == list(CLASSES) and len({colour for _, colour in swatches}) == 29

    # a click on a table row opens that image; a click on a column header sorts by it
    page = (report / "index.html").read_text(encoding="utf-8")
    script = ("<script>document.querySelector('#hs-table th[data-key=csv1]').click();"
              "document.querySelectorAll('#hs-table tbody tr')[2].click();</script></body>")
    clicked = report / "clicked.html"
    clicked.write_text(page.replace("</body>", script), encoding="utf-8")
    dom, _ = _dump_dom(clicked)
    order = re.findall(r'<tr data-image="([^"]+)"', dom)
    data = _page_data(report)
    expected = sorted(data["rows"], key=lambda r: r["values"]["csv1"])  # stable: ties keep the table's order
    assert order == [r["image"] for r in expected]
    assert f'<span id="hs-title">{order[2]}</span>' in dom
    assert re.search(r'<img class="hs-full" src="overlays/[^"]+_csv1.png"', dom)

    # filters: "dice<T" keeps the images where a CSV's mean Dice is below T; text matches any cell
    lowest = sorted(min(r["values"]["csv1"], r["values"]["csv2"]) for r in data["rows"])
    threshold = (lowest[1] + lowest[2]) / 2
    for query, keep in ((f"dice<{threshold:.6f}", [r["image"] for r in data["rows"]
                                                   if min(r["values"]["csv1"], r["values"]["csv2"]) < threshold]),
                        (data["rows"][0]["values"]["patient"].lower(), [r["image"] for r in data["rows"]
                                                                       if r["values"]["patient"] ==
                                                                       data["rows"][0]["values"]["patient"]])):
        script = (f"<script>var f = document.getElementById('hs-filter'); f.value = '{query}';"
                  "f.dispatchEvent(new Event('input'));</script></body>")
        clicked.write_text(page.replace("</body>", script), encoding="utf-8")
        dom, _ = _dump_dom(clicked)
        assert re.findall(r'<tr data-image="([^"]+)"', dom) == keep, query
        assert f"{len(keep)} of {len(names)} images" in dom
