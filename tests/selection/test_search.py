"""handseg.selection.search against constructed cases whose best recipe is known, and against the scorer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from handseg.analysis.metrics import dice_scores, ground_truth
from handseg.common.constants import CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data.images import image_size
from handseg.data.labels import class_masks, polygon_document, read_polygons
from handseg.data.layout import discover
from handseg.formats.oof import write_oof_manifest
from handseg.formats.probs import pack_probs, probs_name
from handseg.formats.recipe import read_recipe
from handseg.formats.submission import read_predictions
from handseg.formats.tta import tta_option
from handseg.selection.apply import ArrayMap, apply_recipe, recipe_image_runs
from handseg.selection.configs import TruthSource, group_configurations, read_oof_run
from handseg.selection.scoring import OptionSpace, ordered_map, score_options
from handseg.selection.search import evaluate_candidates, select_recipe

# ----------------------------------------------------------------------------------------------
# helpers: labelled folders, OOF runs


def write_labelled(root: Path, n_images: int, size: tuple[int, int] = (48, 60)) -> Path:
    """A labelled folder of ``n_images`` images (two per patient), each with the 29 classes as small
    rectangles on a 6 x 5 grid (the same layout in every image)."""
    h, w = size
    polygons = {}
    for c, name in enumerate(CLASSES):
        r, q = divmod(c, 6)
        y0, x0 = 1 + r * (h // 5), 1 + q * (w // 6)
        y1, x1 = y0 + h // 5 - 4, x0 + w // 6 - 4
        polygons[name] = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.int32)
    for i in range(n_images):
        pid, stem = f"ID{i // 2 + 1:03d}", f"image{1000 + i}"
        (root / "DCM" / pid).mkdir(parents=True, exist_ok=True)
        (root / "outputs_json" / pid).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "DCM" / pid / f"{stem}.png"), np.zeros(size, np.uint8))
        doc = polygon_document(polygons, f"{stem}.jpg", f"/x/{pid}")
        (root / "outputs_json" / pid / f"{stem}.json").write_text(json.dumps(doc))
    return root


def truth_masks(data: Path) -> dict[str, np.ndarray]:
    """``{image name: (29, H, W) bool}`` in submission order."""
    return {s.name: class_masks(read_polygons(s.label_path), image_size(s.image_path))
            for s in discover(data, labels="required")}


def write_oof(run: Path, fold: int, maps: dict[str, np.ndarray], arch: str, data: Path | None,
              transforms: list[str] | None = None) -> Path:
    """``run/oof/`` as `train --fold K` writes it: one map per image, index.json, manifest.json."""
    oof = run / "oof"
    oof.mkdir(parents=True)
    for name, probs in maps.items():
        np.save(oof / probs_name(name), pack_probs(probs))
    (oof / "index.json").write_text(json.dumps({"images": list(maps), "classes": list(CLASSES)}))
    card = {"arch": arch, "encoder": "resnet34", "size": 64, "epoch": 3 + fold, "score": 0.5 + fold / 10}
    if data is not None:
        write_oof_manifest(oof, fold, card, data, transforms or ["identity"], "mean")
    else:  # as an older predict wrote it: TTA under "options", no data
        (oof / "manifest.json").write_text(json.dumps({"stage": "predict", "fold": fold, "card": card,
                                                       "options": {"transforms": transforms or ["identity"]}}))
    return run


def patient_folds(data: Path, n_folds: int) -> dict[str, int]:
    """Image name -> fold, both hands of a patient in one fold (patients dealt round-robin)."""
    samples = discover(data, labels="required")
    patients = sorted({s.patient for s in samples})
    return {s.name: patients.index(s.patient) % n_folds for s in samples}


def write_config(root: Path, arch: str, maps: dict[str, np.ndarray], n_folds: int, data: Path,
                 transforms: list[str] | None = None, record_data: bool = True) -> list[Path]:
    """One configuration's runs, one per fold, each holding its fold's OOF maps."""
    folds = patient_folds(data, n_folds)
    return [write_oof(root / f"{arch}_f{f}", f, {n: m for n, m in maps.items() if folds[n] == f}, arch,
                      data if record_data else None, transforms) for f in range(n_folds)]


def noisy_maps(truth: dict[str, np.ndarray], seed: int, sigma: float, blob_rate: float) -> dict[str, np.ndarray]:
    """A model's output imitated: blurred truth, smooth noise, false blobs; float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, masks in truth.items():
        probs = np.empty(masks.shape, np.float32)
        for c in range(masks.shape[0]):
            p = cv2.GaussianBlur(masks[c].astype(np.float32), (0, 0), sigma)
            p += cv2.GaussianBlur(rng.normal(0, 0.6, p.shape).astype(np.float32), (0, 0), 1.0)
            if rng.random() < blob_rate:
                y, x = rng.integers(0, p.shape[0]), rng.integers(0, p.shape[1])
                p[max(y - 2, 0) : y + 2, max(x - 2, 0) : x + 2] = rng.uniform(0.3, 1.0)
            probs[c] = np.clip(p, 0, 1)
        out[name] = probs
    return out


@pytest.fixture(scope="module")
def noisy_case(tmp_path_factory, synth_data_module):
    """Two noisy configurations x 3 folds over the synthetic train set (12 images at 128 px)."""
    root = tmp_path_factory.mktemp("noisy")
    data = synth_data_module / "train"
    truth = truth_masks(data)
    runs = (write_config(root, "unet", noisy_maps(truth, 1, 1.0, 0.4), 3, data)
            + write_config(root, "fpn", noisy_maps(truth, 2, 2.0, 0.2), 3, data))
    return root, data, runs


@pytest.fixture(scope="module")
def noisy_selection(noisy_case):
    """``select_recipe`` on the noisy case, its recipe written in a sub-folder of the runs' root."""
    root, _, runs = noisy_case
    return select_recipe(runs, root / "sub" / "recipe.json")


@pytest.fixture(scope="module")
def synth_data_module(tmp_path_factory) -> Path:
    from handseg.data.synth import make_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    make_dataset(out, ids=6, test_ids=0, size=128, seed=7)
    return out


# ----------------------------------------------------------------------------------------------
# known optima


def test_thresholds_tuning_finds_the_known_optimum(tmp_path):
    # every truth mask's border ring has probability p_in, the ring just outside it p_out, the rest
    # of the mask 0.9: a threshold t is perfect exactly when p_out <= t < p_in. Class c gets
    # (p_out, p_in) around 0.30, 0.40, 0.60 or 0.70 (the only grid value in that window), or
    # (0.9, 0.9) where the default 0.5 is already perfect and must stay (preference for the default).
    data = write_labelled(tmp_path / "data", 6)
    windows = {0.30: (0.28, 0.32), 0.40: (0.38, 0.42), 0.60: (0.58, 0.62), 0.70: (0.68, 0.72), 0.50: (0.0, 0.9)}
    want = [list(windows)[c % 5] for c in range(NUM_CLASSES)]
    kernel = np.ones((3, 3), np.uint8)
    maps = {}
    for name, masks in truth_masks(data).items():
        probs = np.zeros(masks.shape, np.float32)
        for c, m in enumerate(masks.view(np.uint8)):
            p_out, p_in = windows[want[c]]
            probs[c][m > 0] = 0.9
            probs[c][(m > 0) & (cv2.erode(m, kernel) == 0)] = p_in
            probs[c][(cv2.dilate(m, kernel) > 0) & (m == 0)] = p_out
        maps[name] = probs
    runs = write_config(tmp_path, "unet", maps, 3, data)
    sel = select_recipe(runs, tmp_path / "recipe.json")
    doc = json.loads((tmp_path / "recipe.json").read_text())
    assert [doc["classes"][c]["threshold"] for c in CLASSES] == want
    assert doc["chosen"] == "unet/resnet34@64 + thresholds"  # keep-largest adds nothing: the simpler wins
    assert doc["cv_dice"] == pytest.approx(1.0, abs=1e-12)
    plain = next(c for c in sel.candidates if c.name == "unet/resnet34@64")
    assert plain.cv_dice < 0.99  # the 0.5 default misses the rings
    assert {c["name"] for c in doc["candidates"]} == {"unet/resnet34@64", "unet/resnet34@64 + thresholds",
                                                      "unet/resnet34@64 + keep-largest",
                                                      "unet/resnet34@64 + thresholds + keep-largest"}


def test_classwise_choice_takes_each_class_from_the_configuration_that_gets_it_right(tmp_path):
    # A is exact for classes 0..14 and shifted two pixels right for 15..28; B the other way round.
    # Each truth rectangle is 7 x 6 px (42); a shifted copy overlaps it in 5 x 6 (Dice 60/84 = 5/7).
    # The votes mix an exact and a shifted mask: their overlap (5 x 6, Dice 60/72) at 0.5 or with both
    # votes, their union (9 x 6, Dice 84/96) below 0.45 or with one vote: neither is exact, so the recipe
    # must pick per class.
    data = write_labelled(tmp_path / "data", 4)
    truth = truth_masks(data)
    shifted = {n: np.roll(m, 2, axis=2) for n, m in truth.items()}
    a = {n: np.where(np.arange(NUM_CLASSES)[:, None, None] < 15, truth[n], shifted[n]) * 0.9 for n in truth}
    b = {n: np.where(np.arange(NUM_CLASSES)[:, None, None] < 15, shifted[n], truth[n]) * 0.9 for n in truth}
    runs = write_config(tmp_path, "unet", a, 2, data) + write_config(tmp_path, "fpn", b, 2, data)
    sel = select_recipe(runs, tmp_path / "recipe.json")
    doc = sel.recipe
    assert doc["chosen"] == "class-wise best configuration"
    sources = [doc["classes"][c]["source"] for c in CLASSES]
    assert sources == ["unet/resnet34@64"] * 15 + ["fpn/resnet34@64"] * 14
    assert doc["ensemble"]["kind"] == "classwise"
    assert doc["cv_dice"] == pytest.approx(1.0, abs=1e-12)
    by_name = {c.name: c for c in sel.candidates}

    def dice(inter, t, p):
        return (2 * inter + 1e-4) / (t + p + 1e-4)

    single = (15 + 14 * dice(30, 42, 42)) / 29
    assert by_name["unet/resnet34@64"].cv_dice == pytest.approx(single, abs=1e-12)
    assert by_name["fpn/resnet34@64"].cv_dice == pytest.approx((14 + 15 * dice(30, 42, 42)) / 29, abs=1e-12)
    assert by_name["soft vote"].cv_dice == pytest.approx(dice(30, 42, 30), abs=1e-12)
    assert by_name["hard vote"].cv_dice == pytest.approx(dice(30, 42, 30), abs=1e-12)
    assert by_name["soft vote + thresholds"].cv_dice == pytest.approx(dice(42, 42, 54), abs=1e-12)
    assert by_name["hard vote + min-votes"].cv_dice == pytest.approx(dice(42, 42, 54), abs=1e-12)
    assert doc["best_single"]["name"] in ("unet/resnet34@64", "fpn/resnet34@64")
    assert by_name["class-wise best configuration"].gain == pytest.approx(1.0 - doc["best_single"]["cv_dice"])


def test_keep_largest_is_chosen_per_class(tmp_path):
    # class 0: the exact mask plus a false blob in another class's cell -> keep-largest is exact;
    # class 1: the truth is one rectangle, predicted exactly but for a one-pixel gap through it ->
    # keep-largest would drop the smaller half (worse); every other class: exact (off, the default)
    data = write_labelled(tmp_path / "data", 4)
    maps = {}
    for name, masks in truth_masks(data).items():
        probs = masks * np.float32(0.9)
        probs[0, 30:33, 40:43] = 0.9
        rows = np.flatnonzero(masks[1].any(axis=1))
        probs[1, rows[len(rows) // 3]] = 0.0
        maps[name] = probs
    runs = write_config(tmp_path, "unet", maps, 2, data)
    doc = select_recipe(runs, tmp_path / "recipe.json").recipe
    flags = [doc["classes"][c]["keep_largest"] for c in CLASSES]
    assert flags == [True] + [False] * (NUM_CLASSES - 1)
    assert doc["chosen"] == "unet/resnet34@64 + keep-largest"


# ----------------------------------------------------------------------------------------------
# the noisy case: guarantees that hold for any data


def test_recipe_is_never_worse_than_any_candidate(noisy_selection):
    sel = noisy_selection
    best = max(c.cv_dice for c in sel.candidates)
    assert sel.recipe["cv_dice"] >= best - 1e-12
    assert sel.recipe["cv_dice"] == pytest.approx(sel.chosen.cv_dice, abs=1e-9)
    # 6 bases (+ per-class soft weights) x (plain, thresholds, keep-largest, both)
    assert len(sel.candidates) == 28 and len({c.name for c in sel.candidates}) == 28
    # the search's option Dice are exact: the chosen recipe's, recomputed by applying it, agree (checked
    # inside select_recipe), and a per-class choice can only gain over a fixed one
    by_name = {c.name: c for c in sel.candidates}
    for base in ("unet/resnet34@64", "soft vote", "class-wise best configuration"):
        assert by_name[base + " + thresholds"].cv_dice >= by_name[base].cv_dice - 1e-12
        assert by_name[base + " + thresholds + keep-largest"].cv_dice >= by_name[base + " + thresholds"].cv_dice
    assert by_name["class-wise best of all + thresholds + keep-largest"].cv_dice == pytest.approx(best)


def test_nested_estimate_shows_the_tuning_optimism(noisy_selection):
    sel = noisy_selection
    by_name = {c.name: c for c in sel.candidates}
    for name, c in by_name.items():
        assert c.nested_cv_dice is not None
        if "thresholds" in name or "class-wise" in name or "per-class weights" in name:
            assert c.nested_cv_dice <= c.cv_dice + 1e-12, name
        elif "keep-largest" not in name and "min-votes" not in name:
            assert c.nested_cv_dice == pytest.approx(c.cv_dice, abs=1e-12), name  # nothing tuned
    tuned = by_name["class-wise best of all + thresholds + keep-largest"]
    assert tuned.nested_cv_dice < tuned.cv_dice  # strictly: the noise is fitted
    assert sel.recipe["nested_cv_dice"] == sel.chosen.nested_cv_dice
    assert set(tuned.fold_dice) == {0, 1, 2}


def test_nested_estimate_by_hand(noisy_case):
    # recompute one candidate's nested estimate directly: choose on two folds, score the third
    _, data, runs = noisy_case
    configs = group_configurations([read_oof_run(r) for r in runs])
    scores = score_options(configs, TruthSource(data))
    cand = next(c for c in evaluate_candidates(scores) if c.name == "soft vote + thresholds")
    allowed = np.flatnonzero(cand.allowed)
    held = np.empty((len(scores.images), NUM_CLASSES))
    for f in range(3):
        train, test = scores.folds != f, scores.folds == f
        for c in range(NUM_CLASSES):
            best = allowed[np.argmax(scores.dice[train][:, c, allowed].mean(axis=0))]
            held[test, c] = scores.dice[test, c, best]
    assert cand.nested_cv_dice == pytest.approx(held.mean(axis=0).mean(), abs=1e-12)


def test_apply_recipe_reproduces_cv_dice(noisy_case, noisy_selection, tmp_path):
    _, data, _ = noisy_case
    recipe = read_recipe(noisy_selection.out)
    doc = json.loads(noisy_selection.out.read_text())
    folders = {c.name: [Path(p) / "oof" for p in c.runs.values()] for c in recipe.configs}
    apply_recipe(recipe, folders, tmp_path / "oof.csv")
    report = dice_scores(ground_truth(data), read_predictions(tmp_path / "oof.csv"))
    assert report.mean_dice == pytest.approx(doc["cv_dice"], abs=1e-9)
    # the same with two worker processes, and image by image from in-memory maps
    apply_recipe(recipe, folders, tmp_path / "oof2.csv", workers=2)
    assert (tmp_path / "oof2.csv").read_bytes() == (tmp_path / "oof.csv").read_bytes()
    name = read_predictions(tmp_path / "oof.csv").images[0]
    from handseg.formats.probs import ProbMap

    maps = {}
    for cfg in recipe.configs:
        path = next(Path(p) / "oof" / probs_name(name) for p in cfg.runs.values()
                    if (Path(p) / "oof" / probs_name(name)).is_file())
        maps[cfg.name] = ArrayMap(ProbMap(path).dense())
    runs_ = recipe_image_runs(recipe, maps, maps[recipe.configs[0].name].shape)
    csv_rows = read_predictions(tmp_path / "oof.csv")
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(runs_, csv_rows.runs[name]))


def test_workers_and_choosing_by_the_nested_estimate(noisy_case, noisy_selection, tmp_path):
    _, _, runs = noisy_case
    one = noisy_selection.recipe
    two = select_recipe(runs, tmp_path / "two.json", workers=2, choose="nested")
    assert [c["nested_cv_dice"] for c in one["candidates"]] == [c["nested_cv_dice"] for c in two.recipe["candidates"]]
    assert [c["cv_dice"] for c in one["candidates"]] == [c["cv_dice"] for c in two.recipe["candidates"]]
    assert two.chosen.nested_cv_dice == max(c.nested_cv_dice for c in two.candidates)
    assert two.recipe["chosen_by"] == "nested" and one["chosen_by"] == "oof"
    assert two.recipe["cv_dice"] == pytest.approx(two.chosen.cv_dice, abs=1e-9)
    with pytest.raises(HandsegError, match="--choose"):
        select_recipe(runs, tmp_path / "three.json", choose="best")


def test_recipe_paths_are_relative_to_the_recipe(noisy_case, noisy_selection):
    _, _, runs = noisy_case
    doc = json.loads(noisy_selection.out.read_text())
    first = doc["configurations"][0]
    assert first["runs"]["0"].startswith("..") and first["tta"] == {"transforms": ["identity"], "merge": "mean"}
    assert "epoch" in first["card"] and doc["uses"] == [c["name"] for c in doc["configurations"]]
    recipe = read_recipe(noisy_selection.out)
    assert recipe.configs[0].runs[0].resolve() == runs[0].resolve()
    manifest = json.loads((noisy_selection.out.parent / "recipe.manifest.json").read_text())
    assert manifest["stage"] == "select" and manifest["cv_dice"] == doc["cv_dice"]


# ----------------------------------------------------------------------------------------------
# grouping and bad inputs


def test_runs_group_into_configurations_by_card_and_tta(tmp_path):
    data = write_labelled(tmp_path / "data", 4)
    maps = {n: m * np.float32(0.9) for n, m in truth_masks(data).items()}
    runs = (write_config(tmp_path / "a", "unet", maps, 2, data)
            + write_config(tmp_path / "b", "unet", maps, 2, data, transforms=["identity", "hflip"]))
    configs = group_configurations([read_oof_run(r) for r in runs])
    assert [c.name for c in configs] == ["unet/resnet34@64", "unet/resnet34@64 +hflip"]
    assert [sorted(c.runs) for c in configs] == [[0, 1], [0, 1]]


def test_bad_inputs_are_one_line_errors(tmp_path):
    data = write_labelled(tmp_path / "data", 4)
    maps = {n: m * np.float32(0.9) for n, m in truth_masks(data).items()}
    good = write_config(tmp_path / "good", "unet", maps, 2, data)
    out = tmp_path / "recipe.json"

    def error(runs, match, **kw):
        with pytest.raises(HandsegError, match=match):
            select_recipe(runs, out, **kw)
        assert not out.exists()

    (tmp_path / "bare").mkdir()
    error([good[0], tmp_path / "bare"], "no oof/ folder")
    error([good[0]], r"no out-of-fold map for 2 of 4 images .*fold\(s\) 0")
    # the same fold twice, and an image in two folds
    folds = patient_folds(data, 2)
    dup = write_oof(tmp_path / "dup", 0, {n: m for n, m in maps.items() if folds[n] == 0}, "unet", data)
    error([*good, dup], "overlapping folds: .* are both fold 0")
    cross = write_oof(tmp_path / "cross", 2, {n: m for n, m in maps.items() if folds[n] == 0}, "unet", data)
    error([*good, cross], "overlapping folds: image1000.png is in the out-of-fold maps of both")
    # a map listed in the index but missing
    gone = write_config(tmp_path / "gone", "unet", maps, 2, data)
    (gone[1] / "oof" / "image1002.npy").unlink()
    error(gone, "probability map for image1002.png is missing")
    # a map of another size than its image
    small = {n: (m * np.float32(0.9))[:, :-1] for n, m in maps.items()}
    error(write_config(tmp_path / "small", "unet", small, 2, data), "map size .* differs from the image")
    # no data recorded and none given; a fold that is not a number
    nodata = write_config(tmp_path / "nodata", "unet", maps, 2, data, record_data=False)
    error(nodata, "pass --data")
    sel = select_recipe(nodata, out, data=data)
    assert sel.recipe["images"] == 4
    out.unlink()
    bad = tmp_path / "badfold"
    write_oof(bad, 0, maps, "unet", data)
    doc = json.loads((bad / "oof" / "manifest.json").read_text())
    (bad / "oof" / "manifest.json").write_text(json.dumps({**doc, "fold": "zero"}))
    error([bad], '"fold"')


def test_read_recipe_rejects_bad_files(tmp_path, noisy_selection):
    doc = json.loads(noisy_selection.out.read_text())
    cases = [({**doc, "format": "x"}, "format"),
             ({**doc, "classes": {k: v for k, v in doc["classes"].items() if k != "Ulna"}}, "29 classes"),
             ({**doc, "classes": {**doc["classes"], "Ulna": {"source": "nope", "threshold": 0.5}}}, "unknown source"),
             ({**doc, "classes": {**doc["classes"], "Ulna": {"source": "soft", "threshold": 1.5}}}, r"\[0, 1\)"),
             ({**doc, "classes": {**doc["classes"], "Ulna": {"source": "hard", "min_votes": 3}}}, "min_votes"),
             ({**doc, "ensemble": {"soft": {"weights": [1]}}}, "weights"),
             # per-class weights: a soft vote's, in a version 2 recipe (an older handseg refuses version 2)
             ({**doc, "version": 2, "classes": {**doc["classes"], "Ulna": {"source": "soft", "threshold": 0.5,
                                                                            "weights": [1, -1]}}}, "non-negative"),
             ({**doc, "version": 2, "classes": {**doc["classes"], "Ulna": {"source": "soft", "threshold": 0.5,
                                                                            "weights": [0, 0]}}}, "not all zero"),
             ({**doc, "version": 1, "classes": {**doc["classes"], "Ulna": {"source": "soft", "threshold": 0.5,
                                                                            "weights": [3, 1]}}}, "version 2"),
             ({**doc, "version": 3}, "reads versions 1, 2")]
    for bad, match in cases:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(HandsegError, match=match):
            read_recipe(tmp_path / "bad.json")


def test_option_space_order_prefers_the_simplest():
    space = OptionSpace.build(["a", "b"])
    first = space.options[0]
    assert (space.names[first.source], space.cuts[first.source][first.cut], first.keep_largest) == ("a", 0.5, False)
    assert all(not o.keep_largest for o in space.options[: len(space.options) // 2])
    hard = space.kinds.index("hard")
    default = next(o for o in space.options if o.source == hard)
    assert space.cuts[hard][default.cut] == 2  # majority of two
    assert space.cuts[0] == [round(0.2 + 0.05 * k, 2) for k in range(13)]


def test_select_benchmark_agrees_with_its_baseline(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_select

    r = bench_select.main(["--images", "6", "--distinct", "2", "--size", "128", "--folds", "3",
                           "--baseline-images", "1"])  # asserts that every option's Dice agrees
    assert r["max_diff"] < 1e-12 and r["recipe"]["cv_dice"] > 0
    assert "select, whole job" in capsys.readouterr().out


def test_oof_manifest_round_trip_and_card_from_the_checkpoint(tmp_path):
    data = write_labelled(tmp_path / "data", 2)
    maps = {n: m * np.float32(0.9) for n, m in truth_masks(data).items()}
    run = write_oof(tmp_path / "run", 1, maps, "unet", data, ["identity", "hflip"])
    r = read_oof_run(run)
    assert (r.fold, r.card["arch"], r.transforms, r.merge) == (1, "unet", ["identity", "hflip"], "mean")
    assert r.data == data.resolve() and r.images == list(maps)
    # no card in the manifest: it comes from the checkpoint's safetensors header (read without torch)
    doc = json.loads((run / "oof" / "manifest.json").read_text())
    del doc["card"]
    (run / "oof" / "manifest.json").write_text(json.dumps(doc))
    card = {"arch": "fpn", "encoder": "resnet18", "size": 32}
    header = json.dumps({"__metadata__": {"handseg": json.dumps(card)}}).encode()
    (run / "best.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    # read by the one card reader, which checks it and fills what an older card lacks with its defaults
    assert {k: read_oof_run(run).card[k] for k in card} == card
    assert read_oof_run(run).card["classes"] == list(CLASSES)
    (run / "best.safetensors").write_bytes(b"junk")
    with pytest.raises(HandsegError, match="not a safetensors checkpoint"):
        read_oof_run(run)


def test_tta_option_makes_the_transforms_again():
    assert tta_option(["identity"]) == ""
    assert tta_option(["identity", "hflip", "vflip", "scale0.8", "scale1.2"]) == "hflip,vflip,scale:0.8,1.2"
    with pytest.raises(HandsegError, match="rot90"):
        tta_option(["identity", "rot90"])


def _square_unless(ctx, job):
    if job == ctx:
        raise HandsegError(f"job {job} is bad")
    return job * job


def test_ordered_map_keeps_order_and_passes_errors_on():
    jobs = list(range(70))
    assert list(ordered_map(_square_unless, -1, jobs, 1)) == [j * j for j in jobs]
    assert list(ordered_map(_square_unless, -1, jobs, 2)) == [j * j for j in jobs]
    with pytest.raises(HandsegError, match="job 33 is bad"):
        list(ordered_map(_square_unless, 33, jobs, 2))


def test_per_class_soft_vote_weights_are_found_on_a_hand_made_two_configuration_case(tmp_path, capsys):
    # Inside each truth rectangle the pixels alternate between two kinds, G2 (A 0.70, B 0.05) and G3
    # (A 0.371, B 0.97); in the ring just outside it between O2 (A 0.40, B 0.75) and O3 (A 0.635, B 0.022).
    # With a = wA / (wA + wB) the weighted levels separate G2 from O2 only for a > 0.7 and G3 from O3 only
    # for a < 0.79: of the quarter-step weightings only 3:1 (a = 0.75) is exact, and at threshold 0.5.
    # Neither configuration alone, the plain soft vote (a = 0.5) nor the hard vote can be, at any cut.
    data = write_labelled(tmp_path / "data", 4)
    kernel = np.ones((3, 3), np.uint8)
    a_maps, b_maps = {}, {}
    for name, masks in truth_masks(data).items():
        pa, pb = np.zeros(masks.shape, np.float32), np.zeros(masks.shape, np.float32)
        parity = (np.add.outer(np.arange(masks.shape[1]), np.arange(masks.shape[2])) % 2).astype(bool)
        for c, m in enumerate(masks.view(np.uint8)):
            inside, ring = m > 0, (cv2.dilate(m, kernel) > 0) & (m == 0)
            for region, even, odd in ((inside, (0.70, 0.05), (0.371, 0.97)), (ring, (0.40, 0.75), (0.635, 0.022))):
                for where, (va, vb) in ((region & ~parity, even), (region & parity, odd)):
                    pa[c][where], pb[c][where] = va, vb
        a_maps[name], b_maps[name] = pa, pb
    runs = write_config(tmp_path, "unet", a_maps, 2, data) + write_config(tmp_path, "fpn", b_maps, 2, data)
    sel = select_recipe(runs, tmp_path / "recipe.json")
    doc = sel.recipe
    assert doc["chosen"] == "soft vote, per-class weights" and doc["version"] == 2
    assert all(doc["classes"][c] == {"source": "soft", "weights": [3.0, 1.0], "threshold": 0.5,
                                     "keep_largest": False} for c in CLASSES)
    assert doc["cv_dice"] == pytest.approx(1.0, abs=1e-12)
    chosen = next(c for c in sel.candidates if c.name == doc["chosen"])
    assert chosen.nested_cv_dice == pytest.approx(1.0, abs=1e-12)  # each fold alone chooses 3:1 too
    # every candidate without per-class weights falls short ("best of all" includes the weightings)
    others = [c for c in sel.candidates if "per-class weights" not in c.name and "best of all" not in c.name]
    assert len(others) == 20 and max(c.cv_dice for c in others) < 0.99
    # predict --recipe applies the class's weights: the recipe read back makes the exact masks
    recipe = read_recipe(tmp_path / "recipe.json")
    assert recipe.classes[0].weights == (3.0, 1.0)
    name = next(iter(a_maps))
    runs_ = recipe_image_runs(recipe, {"unet/resnet34@64": ArrayMap(a_maps[name]),
                                       "fpn/resnet34@64": ArrayMap(b_maps[name])}, a_maps[name].shape[1:])
    from handseg.formats.rle import runs_to_mask

    truth = truth_masks(data)[name]
    assert all(np.array_equal(runs_to_mask(r, truth.shape[1:]), truth[c]) for c, r in enumerate(runs_))
    from tests.conftest import run_cli

    code, out, err = run_cli(["select", *runs, "-o", tmp_path / "again.json", "-j", 1], capsys)
    assert code == 0, err
    assert ("soft-vote weights per class (unet/resnet34@64:fpn/resnet34@64): 3:1 " + ", ".join(CLASSES)
            in " ".join(out.split()))
