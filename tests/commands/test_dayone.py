"""Day one for a competitor (issue 19): results under --quiet, whole tables off a terminal, inputs that
share a file name, empty predictions, and the habits users bring from nnU-Net and Kaggle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handseg.common.constants import CLASSES
from handseg.data.images import read_image
from handseg.data.labels import class_masks, read_polygons
from handseg.data.layout import discover
from handseg.formats.rle import rle_encode
from handseg.formats.submission import write_predictions
from tests.commands.test_select import two_configs  # noqa: F401  (a fixture)
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, masks: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(path, [(n, [rle_encode(m) for m in ms]) for n, ms in masks.items()])
    return path


@pytest.fixture(scope="module")
def truth(synth_data) -> dict[str, np.ndarray]:
    return {s.name: class_masks(read_polygons(s.label_path), read_image(s.image_path).shape)
            for s in discover(synth_data / "test_gt", labels="required")}


@pytest.fixture(scope="module")
def two_teams(truth, tmp_path_factory) -> tuple[Path, Path]:
    """Two teams' submissions, both named submission.csv: team a exact, team b shifted by two columns."""
    d = tmp_path_factory.mktemp("teams")
    return (_write(d / "team_a" / "out" / "submission.csv", truth),
            _write(d / "team_b" / "out" / "submission.csv", {n: np.roll(ms, 2, axis=2) for n, ms in truth.items()}))


# --- 3: --quiet keeps results ---------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_compare_still_prints_the_scores(where, synth_data, two_teams, tmp_path, capsys):
    a, b = two_teams
    args = ["compare", a, b, "--gt", synth_data / "test_gt", "--json", tmp_path / "s.json"]
    args = ["--quiet", *args] if where == "before" else [*args, "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    mean_b = json.loads((tmp_path / "s.json").read_text())["results"]
    assert "mean" in out and "finger-1" in out and "Ulna" in out
    assert f"scores -> {tmp_path / 's.json'}" in out.replace("\n", "")
    assert len(mean_b) == 2
    assert err == ""  # no progress, no messages


def test_quiet_select_prints_the_choice(two_configs, capsys):  # noqa: F811
    tmp_path, _, runs = two_configs
    code, out, err = run_cli(["-q", "select", *runs, "-o", tmp_path / "r.json", "-j", 1], capsys)
    assert code == 0, err
    assert "chosen: unet/resnet34@64 + keep-largest: OOF Dice 1.0000" in out.replace("\n", " ")
    assert "OOF Dice" in out and "hard vote" in out
    code, out, err = run_cli(["select", *runs, "-o", tmp_path / "r2.json", "-j", 1, "-q"], capsys)
    assert code == 0, err
    assert "chosen: unet/resnet34@64" in out


def test_quiet_is_undone_for_the_next_run_in_the_process(two_teams, capsys):
    from handseg.console import console, log

    code, _, err = run_cli(["compare", *two_teams, "-q"], capsys)
    assert code == 0, err
    assert console.quiet and log.quiet
    code, _, err = run_cli(["compare", *two_teams], capsys)
    assert code == 0, err
    assert not console.quiet and not log.quiet


def test_quiet_after_double_dash_is_a_value_not_the_flag():
    from handseg.cli import hoist_quiet

    assert hoist_quiet(["compare", "a.csv", "-q", "b.csv"]) == ["--quiet", "compare", "a.csv", "b.csv"]
    assert hoist_quiet(["compare", "a.csv", "--", "-q"]) == ["compare", "a.csv", "--", "-q"]


# --- 1: tables off a terminal are printed whole ---------------------------------------------------------

def _handseg_through_a_pipe(args: list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real CLI in another process, its standard output a pipe (as in `handseg ... | cat`, a log or CI)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "handseg", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_compare_table_through_a_pipe_is_whole(truth, tmp_path):
    names = [f"very_long_team_name_number_{k}_final_submission.csv" for k in range(6)]
    csvs = [_write(tmp_path / n, truth) for n in names]
    run = _handseg_through_a_pipe(["compare", *csvs])
    assert run.returncode == 0, run.stderr
    assert "…" not in run.stdout
    lines = run.stdout.splitlines()
    header = next(line for line in lines if "class" in line)
    assert all(n in header for n in names[1:]), header  # each column headed by its whole name, on one line
    for c in CLASSES:  # every class row whole, on one line
        assert sum(1 for line in lines if line.startswith(f"│ {c} ")) == 1, c


def test_select_table_through_a_pipe_is_whole(two_configs):  # noqa: F811
    tmp_path, _, runs = two_configs
    run = _handseg_through_a_pipe(["select", *runs, "-o", tmp_path / "r.json", "-j", 1])
    assert run.returncode == 0, run.stderr
    assert "…" not in run.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    rows = [line for line in run.stdout.splitlines() if line.startswith("│")]
    for cand in doc["candidates"][:5]:  # each candidate's whole name on its row
        assert any(f" {cand['name']} " in row or f" {cand['name']} (chosen) " in row for row in rows), cand["name"]


# --- 2: inputs that share a file name stay apart ---------------------------------------------------------

def test_distinct_labels_are_the_shortest_distinguishing_suffixes(tmp_path, monkeypatch):
    from handseg.common.paths import distinct_labels

    assert distinct_labels(["a/out/submission.csv", "b/out/submission.csv", "c.csv"]) == [
        "a/out/submission.csv", "b/out/submission.csv", "c.csv"]
    assert distinct_labels(["x/a.csv", "y/b.csv"]) == ["a.csv", "b.csv"]
    assert distinct_labels(["runs/f0/oof/oof.csv", "runs/f1/oof/oof.csv"]) == ["f0/oof/oof.csv", "f1/oof/oof.csv"]
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")  # pred.csv here is b/pred.csv
    assert distinct_labels(["pred.csv", "a/pred.csv"]) == ["b/pred.csv", "a/pred.csv"]


def test_compare_labels_same_named_csvs_apart_everywhere(synth_data, two_teams, tmp_path, capsys):
    a, b = two_teams
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", a, b, "--gt", synth_data / "test_gt", "--json", "-", "--out", report], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["label"] for r in doc["results"].values()] == ["team_a/out/submission.csv", "team_b/out/submission.csv"]
    assert doc["results"][str(b)]["mean_dice"] < doc["results"][str(a)]["mean_dice"] == pytest.approx(1.0)
    header = next(line for line in err.splitlines() if "class" in line)  # with --json - the table is on stderr
    assert "team_a/out/submission.csv" in header and "team_b/out/submission.csv" in header
    page = (report / "index.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="hs-data">(.*?)</script>', page, re.S).group(1))
    panels = json.dumps(data)
    assert '"label": "team_a/out/submission.csv"' in panels and '"label": "team_b/out/submission.csv"' in panels
    assert re.search(r"<td>team_a/out/submission.csv</td>", page) and re.search(r"<td>team_b/out/submission.csv", page)


def test_compare_without_gt_labels_the_reference_apart_too(two_teams, capsys):
    a, b = two_teams
    code, out, err = run_cli(["compare", b, a, "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["label"] for r in doc["results"].values()] == ["team_a/out/submission.csv"]
    assert "team_a/out/submission.csv" in err and "submission.csv │" not in err.replace("/out/submission.csv │", "")


# --- 4: empty is not perfect -----------------------------------------------------------------------------

def test_two_empty_csvs_are_flagged_not_perfect(synth_data, truth, tmp_path, capsys):
    empty = {n: np.zeros_like(ms) for n, ms in truth.items()}
    a, b = _write(tmp_path / "a" / "sub.csv", empty), _write(tmp_path / "b" / "sub.csv", empty)
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", a, b, "--data", synth_data / "test", "--json", tmp_path / "s.json",
                              "--out", report], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["mean_dice"] == pytest.approx(1.0)  # the metric is what it is ...
    assert doc["empty_classes"] == list(CLASSES) and doc["reference_empty_classes"] == list(CLASSES)  # ... flagged
    text = " ".join(out.split())
    assert "b/sub.csv predicts no pixel at all (empty masks)" in text
    rows = [line for line in out.splitlines() if line.startswith("│ finger-1 ")]
    assert rows and "1.0000 empty" in rows[0] and "(reference empty)" in rows[0]
    page = (report / "index.html").read_text(encoding="utf-8")
    assert re.search(r'<p class="hs-warn">Empty: b/sub.csv predicts no pixel at all', page)
    assert "<td>1.0000 (empty)</td>" in page


def test_a_class_never_predicted_is_named(synth_data, truth, tmp_path, capsys):
    from handseg.common.constants import CLASS_INDEX

    no_ulna = {n: ms.copy() for n, ms in truth.items()}
    for ms in no_ulna.values():
        ms[CLASS_INDEX["Ulna"]] = 0
    pred = _write(tmp_path / "no_ulna.csv", no_ulna)
    code, out, err = run_cli(["compare", pred, "--gt", synth_data / "test_gt", "--json", tmp_path / "s.json"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["empty_classes"] == ["Ulna"] and doc["reference_empty_classes"] == []
    assert doc["per_class"]["Ulna"] == pytest.approx(0.0, abs=1e-6)
    assert "no_ulna.csv predicts no pixel of 1 class (Ulna) on any image" in " ".join(out.split())
    ulna = next(line for line in out.splitlines() if line.startswith("│ Ulna "))
    assert "empty" in ulna and "reference empty" not in ulna
    radius = next(line for line in out.splitlines() if line.startswith("│ Radius "))
    assert "empty" not in radius


# --- 6: select says what to run next ---------------------------------------------------------------------

def test_select_prints_the_next_commands_and_they_parse(two_configs, capsys):  # noqa: F811
    import shlex

    from handseg.commands.select import next_commands

    tmp_path, data, runs = two_configs
    out = tmp_path / "my recipe.json"
    code, stdout, err = run_cli(["-q", "select", *runs, "-o", out, "-j", 1], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    at = lines.index("next:")
    predict, export = lines[at + 1].strip(), lines[at + 2].strip()
    assert shlex.split(predict)[:5] == ["handseg", "predict", "--recipe", str(out), "--data"]
    assert shlex.split(export) == ["handseg", "export", "--recipe", str(out), "-o", "model.zip"]
    from tests.test_readme import _parse

    for line in (predict, export):  # both parse against the real CLI
        _parse(shlex.split(line)[1:])
    # a training folder named train/ beside a test/ gets that test folder
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "test").mkdir()
    assert f"--data {tmp_path / 'd' / 'test'} " in next_commands(Path("r.json"), str(tmp_path / "d" / "train"))[1]


@pytest.fixture(scope="module")
def tiny_run(synth_data, tmp_path_factory) -> Path:
    """A tiny trained run (UNet/ResNet18, 64 px, one epoch on the CPU)."""
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(TrainConfig(data=synth_data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64,
                      epochs=1, batch_size=4, workers=0, device="cpu", out=out, augment="none"), log=lambda *a: None)
    return out


# --- 7: export --recipe packs only what the recipe uses --------------------------------------------------

def test_export_recipe_packs_only_the_configurations_it_uses(tiny_run, synth_data, tmp_path, capsys):
    import hashlib
    import shutil
    import zipfile

    other = tmp_path / "other_run"
    shutil.copytree(tiny_run, other)
    pin = hashlib.sha256((tiny_run / "best.safetensors").read_bytes()).hexdigest()
    tta = {"transforms": ["identity"], "merge": "mean"}
    doc = {"format": "handseg-recipe", "version": 1,
           "configurations": [{"name": "a", "runs": {"0": str(tiny_run)}, "tta": tta, "sha256": {"0": pin}},
                              {"name": "b", "runs": {"0": str(other)}, "tta": tta, "sha256": {"0": pin}}],
           "ensemble": {"soft": {"weights": [2.0, 1.0]}},
           "classes": {c: {"source": "a", "threshold": 0.5} for c in CLASSES}}  # b is used by no class
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(doc))
    z = tmp_path / "model.zip"
    code, out, err = run_cli(["export", "--recipe", recipe, "-o", z], capsys)
    assert code == 0, err
    assert "1 checkpoint and the recipe" in out
    with zipfile.ZipFile(z) as archive:
        checkpoints = [n for n in archive.namelist() if n.endswith(".safetensors")]
        inner = json.loads(archive.read("recipe.json"))
    assert checkpoints == ["models/a/fold0/best.safetensors"]
    assert [c["name"] for c in inner["configurations"]] == ["a"] and inner["ensemble"]["soft"]["weights"] == [2.0]
    # the zip predicts what the recipe predicts
    args = ["--data", synth_data / "test", "--device", "cpu"]
    assert run_cli(["predict", "--recipe", recipe, *args, "-o", tmp_path / "r.csv"], capsys)[0] == 0
    assert run_cli(["predict", z, *args, "-o", tmp_path / "z.csv"], capsys)[0] == 0
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "z.csv").read_bytes()


# --- 11: replay from anywhere ----------------------------------------------------------------------------

def test_train_config_replays_from_another_folder(synth_data, tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").symlink_to(synth_data, target_is_directory=True)
    tiny = ["--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--size", 64, "--epochs", 1,
            "--max-steps", 1, "--batch-size", 2, "--workers", 0, "--device", "cpu", "--augment", "none"]
    monkeypatch.chdir(project)
    code, _, err = run_cli(["train", "--data", "data/train", *tiny, "--out", "runs/f0"], capsys)
    assert code == 0, err
    # from another folder: the manifest's data/train is the project's, not ./data/train
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["train", "--config", "../project/runs/f0/manifest.json", "--out", "again"], capsys)
    assert code == 0, err
    replayed = json.loads((elsewhere / "again" / "manifest.json").read_text())
    assert Path(replayed["options"]["data"]).resolve() == (project / "data" / "train").resolve()
    assert replayed["train_images"] == json.loads((project / "runs" / "f0" / "manifest.json").read_text())[
        "train_images"]
    # a YAML file's relative paths are the file's
    (project / "configs" / "c.yaml").write_text("data: ../data/train\narch: unet\nencoder: resnet18\n"
                                                "encoder_weights: none\nsize: 64\nepochs: 1\nmax_steps: 1\n"
                                                "batch_size: 2\nworkers: 0\ndevice: cpu\naugment: none\n")
    code, _, err = run_cli(["train", "--config", project / "configs" / "c.yaml", "--out", "from_yaml"], capsys)
    assert code == 0, err
    options = json.loads((elsewhere / "from_yaml" / "manifest.json").read_text())["options"]
    assert Path(options["data"]).resolve() == (project / "data" / "train").resolve()


# --- 13: --keep-resume/--no-keep-resume and handseg prune -----------------------------------------------

def test_no_keep_resume_drops_the_resume_state_when_the_run_finishes(synth_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--data", synth_data / "train", "--arch", "unet", "--encoder", "resnet18",
                                 "--encoder-weights", "none", "--size", 64, "--epochs", 1, "--batch-size", 4,
                                 "--workers", 0, "--device", "cpu", "--augment", "none", "--no-keep-resume",
                                 "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["best.safetensors", "last.safetensors"]
    assert "--no-keep-resume: removed resume-0001.safetensors" in stdout
    assert json.loads((out / "manifest.json").read_text())["options"]["keep_resume"] is False
    code, _, err = run_cli(["train", "--data", synth_data / "train", "--resume", "--out", out], capsys)
    assert code == 2 and "resume" in err  # it cannot be continued, and says so


def test_prune_drops_resume_state_of_finished_runs_only(tiny_run, synth_data, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    resume = sorted(run.glob("resume-*.safetensors"))
    assert len(resume) == 1
    size = resume[0].stat().st_size
    # unfinished (its manifest planned more epochs than its last checkpoint has): refused, nothing removed
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    doc = json.loads((unfinished / "manifest.json").read_text())
    doc["options"]["epochs"] = 5
    (unfinished / "manifest.json").write_text(json.dumps(doc))
    code, out, err = run_cli(["prune", run, unfinished], capsys)
    assert code == 2 and err.startswith(f"handseg: error: {unfinished}: the run has not finished (epoch 1 of 5)")
    assert resume[0].is_file() and len(list(unfinished.glob("resume-*"))) == 1
    code, out, err = run_cli(["prune", tmp_path / "nope"], capsys)
    assert code == 2 and "run folder not found" in err
    code, out, err = run_cli(["-q", "prune", run], capsys)
    assert code == 0, err
    assert f"{run}: removed {resume[0].name} ({size / 2**20:.1f} MiB)" in out
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["best.safetensors", "last.safetensors"]
    # the pruned run still predicts
    code, _, err = run_cli(["predict", run, "--data", synth_data / "test", "-o", tmp_path / "p.csv", "--device",
                            "cpu"], capsys)
    assert code == 0, err


# --- 9: masks as images ----------------------------------------------------------------------------------

def test_predict_masks_writes_one_png_per_image_and_class(tiny_run, synth_data, tmp_path, capsys):
    import cv2

    from handseg.formats.rle import rle_decode
    from handseg.formats.submission import read_predictions

    csv, masks = tmp_path / "pred.csv", tmp_path / "masks"
    thresholds = tmp_path / "t.json"  # low: a model trained one epoch then paints pixels to compare
    thresholds.write_text(json.dumps([0.05] * len(CLASSES)))
    code, out, err = run_cli(["predict", tiny_run, "--data", synth_data / "test", "-o", csv, "--masks", masks,
                              "--thresholds", thresholds, "--device", "cpu"], capsys)
    assert code == 0, err
    pred = read_predictions(csv)
    assert f"{len(pred.images)} images' masks -> {masks}" in out
    assert sorted(p.name for p in masks.iterdir()) == sorted([Path(n).stem for n in pred.images] + ["manifest.json"])
    samples = {s.name: s for s in discover(synth_data / "test", labels="ignore", role="test")}
    painted = 0
    for name in pred.images:
        folder = masks / Path(name).stem
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c}.png" for c in CLASSES)
        shape = read_image(samples[name].image_path).shape[:2]
        for k, c in enumerate(CLASSES):
            png = cv2.imread(str(folder / f"{c}.png"), cv2.IMREAD_UNCHANGED)
            assert png.dtype == np.uint8 and png.shape == shape and set(np.unique(png)) <= {0, 255}
            assert np.array_equal(png == 255, rle_decode(pred.rle(name, k), shape))
            painted += int((png == 255).sum())
    assert painted > 0  # the model predicts something, so the check above compares real masks
    # the output rule: an existing folder is refused before any work, and replaced whole with --overwrite
    code, _, err = run_cli(["predict", tiny_run, "--data", synth_data / "test", "-o", tmp_path / "p2.csv",
                            "--masks", masks, "--device", "cpu"], capsys)
    assert code == 2 and "already exists" in err and not (tmp_path / "p2.csv").exists()


# --- 14, 15: help texts, completion, dependency floors ---------------------------------------------------

def _help(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "handseg", *args, "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _option_row(text: str, option: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"│ {option} "))


def test_help_names_no_python_types_and_every_option_says_what_it_does():
    train = _help(["train"])
    assert "list[" not in train and "<list" not in train
    assert "DIR" in _option_row(train, "--extra") and "RUN" in _option_row(train, "--context")
    assert "Passes over the training images" in _option_row(train, "--epochs")
    assert "cpu | cuda" in _option_row(_help(["demo"]), "--device")
    assert "Example: handseg prep json2npy --data data" in _help(["prep"])
    for command in (["compare"], ["predict"], ["export"], ["prune"], ["select"]):
        assert "list[" not in _help(command), command


def test_arch_and_encoder_complete_from_the_registries():
    import segmentation_models_pytorch as smp
    from typer.main import get_command

    from handseg.cli import app

    train = get_command(app).commands["train"]
    ctx = train.make_context("train", [], resilient_parsing=True)
    params = {p.name: p for p in train.params}
    archs = [c.value for c in params["arch"].shell_complete(ctx, "unet")]
    assert archs == [a for a in smp.MODEL_ARCHITECTURES_MAPPING if a.startswith("unet")] and "unetplusplus" in archs
    encoders = [c.value for c in params["encoder"].shell_complete(ctx, "hrnet_w4")]
    assert "hrnet_w48" in encoders and all(e.startswith("hrnet_w4") for e in encoders)
    assert "resnet34" in [c.value for c in params["encoder"].shell_complete(ctx, "resnet3")]  # smp's own
    assert "tu-convnext_small" in [c.value for c in params["encoder"].shell_complete(ctx, "tu-convnext_s")]


def test_dependency_floors_match_what_the_code_needs():
    import re as regex
    from importlib.metadata import version

    text = (ROOT / "pyproject.toml").read_text()
    smp_floor = regex.search(r'"segmentation-models-pytorch>=([\d.]+)', text).group(1)
    assert tuple(map(int, smp_floor.split("."))) >= (0, 5)  # DPT came with smp 0.5
    typer_range = regex.search(r'"typer>=([\d.]+),<([\d.]+)"', text)
    assert typer_range, "Typer's range is bounded: cli._conventional_help adjusts its help rendering"
    installed = tuple(int(x) for x in version("typer").split(".")[:2])
    assert installed < tuple(int(x) for x in typer_range.group(2).split("."))
    # and the rendering it adjusts is what the installed Typer shows: flags without <bool>, arguments by name
    compare = _help(["compare"])
    assert "<bool>" not in _help(["train"]) and "[OPTIONS] CSV|RUN..." in compare and "{csvs}" not in compare


def test_dpt_takes_timm_cnns_as_the_readme_says():
    from handseg.common.errors import HandsegError
    from handseg.models.plan import plan_model

    assert plan_model("dpt", "tu-resnet18", 64) is not None
    with pytest.raises(HandsegError, match="dpt takes timm encoders only .* use tu-resnet18"):
        plan_model("dpt", "resnet18", 64)
    readme = (ROOT / "README.md").read_text()
    assert "takes ViT encoders only" not in readme and "`tu-resnet18`" in readme


# --- 12: the pseudo gate ---------------------------------------------------------------------------------

def _probs_folder(folder: Path, maps: dict[str, np.ndarray]) -> Path:
    """A probability folder as `predict --probs` writes it, from hand-made (29, H, W) float maps."""
    from handseg.formats.probs import PROBS_INDEX, probs_name, quantise_probs, write_probs

    folder.mkdir(parents=True)
    for name, p in maps.items():
        write_probs(folder / probs_name(name), quantise_probs(p))
    (folder / PROBS_INDEX).write_text(json.dumps({"images": list(maps)}))
    return folder


def test_pseudo_gate_is_on_by_default_with_probability_maps(synth_data, truth, tmp_path, capsys):
    from handseg.common.constants import CLASS_INDEX

    names = list(truth)
    sure, unsure, missing = names[0], names[1], names[2]
    maps = {sure: truth[sure] * np.float32(0.97),        # every bone, mean confidence 0.97: kept
            unsure: truth[unsure] * np.float32(0.7),     # every bone, but confidence 0.7: the gate drops it
            missing: truth[missing] * np.float32(0.97)}  # confident, but no Ulna: dropped by the 29-bone rule
    maps[missing][CLASS_INDEX["Ulna"]] = 0
    probs = _probs_folder(tmp_path / "probs", maps)
    code, out, err = run_cli(["pseudo", probs, "--data", synth_data / "test", "--out", tmp_path / "ps"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "ps" / "manifest.json").read_text())
    assert [Path(k).name for k in doc["kept"]] == [sure]
    # 0.7 is stored as round(178.5) = 178 of 255 (half to even): 0.698
    assert doc["dropped"][unsure] == "confidence 0.698 < 0.9" and "Ulna" in doc["dropped"][missing]
    assert doc["options"]["min_confidence"] == 0.9
    assert "1 images labelled, 2 dropped (confidence gate 0.9)" in out
    # 0 turns the gate off: the unsure image is kept too; the 29-bone rule stays
    code, out, err = run_cli(["pseudo", probs, "--data", synth_data / "test", "--out", tmp_path / "ps0",
                              "--min-confidence", 0], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "ps0" / "manifest.json").read_text())
    assert sorted(Path(k).name for k in doc["kept"]) == sorted([sure, unsure]) and list(doc["dropped"]) == [missing]


def test_demo_summary_says_what_pseudo_kept(tmp_path):
    from handseg.commands.demo import _pseudo_summary

    assert _pseudo_summary(tmp_path / "pseudo") == "none kept"
    (tmp_path / "pseudo").mkdir()
    (tmp_path / "pseudo" / "manifest.json").write_text(json.dumps(
        {"stage": "pseudo", "options": {"min_confidence": 0.9}, "kept": ["a.png", "b.png", "c.png"],
         "dropped": {"d.png": "x", "e.png": "y", "f.png": "z"}}))
    assert _pseudo_summary(tmp_path / "pseudo").startswith("3 of 6 images kept (29 bones, confidence >= 0.9)")
    readme = (ROOT / "README.md").read_text()
    assert "keeps no image and says so" not in readme and "(0.9 unless given" in readme


# --- 8: eda --pred and compare take the runs of a CV -----------------------------------------------------

@pytest.fixture(scope="module")
def cv_runs(synth_data, tmp_path_factory) -> list[Path]:
    """Two folds of one configuration, each with its out-of-fold CSV."""
    base = tmp_path_factory.mktemp("cv")
    splits = base / "splits.json"
    assert run_cli(["kfold", "--data", synth_data / "train", "--folds", 2, "-o", splits])[0] == 0
    runs = []
    for fold in (0, 1):
        out = base / f"unet_f{fold}"
        code = run_cli(["train", "--data", synth_data / "train", "--splits", splits, "--fold", fold, "--arch", "unet",
                        "--encoder", "resnet18", "--encoder-weights", "none", "--size", 64, "--epochs", 1,
                        "--batch-size", 4, "--workers", 0, "--device", "cpu", "--augment", "none", "--out", out])[0]
        assert code == 0
        runs.append(out)
    return runs


def test_compare_and_eda_take_the_runs_of_a_cv(cv_runs, synth_data, tmp_path, capsys):
    from handseg.formats.submission import read_predictions

    # independent truth: the two out-of-fold CSVs pasted together by hand
    rows = []
    for run in cv_runs:
        pred = read_predictions(run / "oof" / "oof.csv")
        rows += [(name, [pred.rle(name, c) for c in range(len(CLASSES))]) for name in pred.images]
    write_predictions(tmp_path / "pasted.csv", rows)
    code, out, err = run_cli(["compare", *cv_runs, tmp_path / "pasted.csv", "--gt", synth_data / "train",
                              "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    first, second = doc["results"].values()
    assert first["label"] == "unet/resnet18@64 out-of-fold" and second["label"] == "pasted.csv"
    assert first["mean_dice"] == pytest.approx(second["mean_dice"], abs=1e-12)
    assert first["per_image"] == second["per_image"] and len(first["per_image"]) == len(
        discover(synth_data / "train", labels="required"))
    assert "unet/resnet18@64 out-of-fold" in err  # the table's column

    # eda: the runs with --pred, as a list
    code, _, err = run_cli(["eda", "--data", synth_data / "train", "--pred", *cv_runs, "--out", tmp_path / "eda"],
                           capsys)
    assert code == 0, err
    page = (tmp_path / "eda" / "index.html").read_text(encoding="utf-8")
    assert "Prediction " in page and json.loads((tmp_path / "eda" / "manifest.json").read_text())["options"][
        "pred"] == [str(r) for r in cv_runs]
    # one fold alone does not cover the training images: said, not skipped
    code, _, err = run_cli(["eda", "--data", synth_data / "train", "--pred", cv_runs[0], "--out", tmp_path / "e2"],
                           capsys)
    assert code == 2 and "different image sets" in err and not (tmp_path / "e2").exists()
    # the same fold twice is refused by name
    code, _, err = run_cli(["compare", cv_runs[0], cv_runs[0], "--gt", synth_data / "train"], capsys)
    assert code == 2 and "fold 0" in err


# --- 10: the Python API, through its documented names only ----------------------------------------------

def test_the_python_api_predicts_arrays_and_folders(tiny_run, synth_data, tmp_path, capsys):
    import csv

    import handseg.api as hs

    for name in hs.__all__:  # every documented name says what it does
        assert name == "CLASSES" or (getattr(hs, name).__doc__ or "").strip(), name
    assert len(hs.CLASSES) == 29
    z = tmp_path / "model.zip"
    assert run_cli(["export", tiny_run, "-o", z], capsys)[0] == 0  # as a user makes one

    model = hs.load_model(tiny_run, device="cpu")
    from_zip = hs.load_model(z, device="cpu")
    assert model.classes == list(hs.CLASSES) and model.thresholds.shape == (29,)
    images = sorted((synth_data / "test" / "DCM").rglob("*.png"))
    image = hs.read_image(images[0])
    assert image.dtype == np.uint8 and image.ndim == 2
    probs = model.predict_probs(image)
    assert probs.dtype == np.float32 and probs.shape == (29, *image.shape) and 0 <= probs.min() <= probs.max() <= 1
    assert np.array_equal(from_zip.predict_probs(image), probs)  # the zip holds the same model
    low = [0.05] * 29
    masks = model.predict(image, thresholds=low)
    assert masks.dtype == bool and masks.shape == (29, *image.shape)
    # the one cut rule: the stored level round(255 p) above 255 t, as predict's CSV
    assert np.array_equal(masks, np.round(probs * np.float32(255.0)) > 255 * 0.05) and masks.any()
    rles = model.predict_rles(image)
    assert len(rles) == 29 and all(np.array_equal(hs.rle_decode(r, image.shape), m)
                                   for r, m in zip(rles, model.predict(image)))
    k = int(np.argmax(masks.reshape(29, -1).sum(axis=1)))  # a class with pixels
    assert hs.rle_encode(masks[k]) != "" and np.array_equal(hs.rle_decode(hs.rle_encode(masks[k]), image.shape),
                                                            masks[k])
    # a folder, as `handseg predict` writes it: the same masks as predict() gives for each image
    out = hs.predict_folder(z, synth_data / "test", tmp_path / "submission.csv", device="cpu", thresholds=low)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 29 * len(images) and [r["class"] for r in rows[:29]] == list(hs.CLASSES)
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image_name"], []).append(r["rle"])
    for path in images:
        img = hs.read_image(path)
        expected = model.predict(img, thresholds=low)
        assert expected.any()
        got = np.stack([hs.rle_decode(r, img.shape) for r in by_image[path.name]])
        assert np.array_equal(got, expected), path.name
    # run again (a notebook cell run twice): replaced, not refused
    assert hs.predict_folder(tiny_run, synth_data / "test", out, device="cpu", tta="hflip") == out
    with pytest.raises(Exception, match=r"expected an \(H, W\) uint8 image"):
        model.predict(image.astype(np.float32))


# --- 5: report details, in headless Chromium ---------------------------------------------------------------

_CHECK = """<script>setTimeout(function () {
  var out = {};
  out.pageOverflow = document.documentElement.scrollWidth - window.innerWidth;
  out.tables = Array.prototype.map.call(document.querySelectorAll("main table"), function (t) {
    var box = t.parentElement, r = box.getBoundingClientRect();
    return {box: box.className, right: r.right, scrolls: box.scrollWidth > box.clientWidth,
            overflowX: getComputedStyle(box).overflowX};
  });
  out.mainRight = document.querySelector("main").getBoundingClientRect().right;
  out.brokenNumbers = [];
  Array.prototype.forEach.call(document.querySelectorAll("figcaption"), function (f) {
    var node = f.firstChild, re = /\\d+\\.\\d+/g, m;
    while ((m = re.exec(node.textContent))) {
      var range = document.createRange();
      range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
      var tops = {};
      Array.prototype.forEach.call(range.getClientRects(), function (r) { tops[Math.round(r.top)] = 1; });
      if (Object.keys(tops).length > 1) out.brokenNumbers.push(m[0]);
    }
  });
  out.captions = document.querySelectorAll("figcaption").length;
  var zoom = document.getElementById("hs-zoom");
  out.zoom = zoom ? zoom.textContent : null;
  var legend = document.getElementById("hs-legend");
  out.legend = legend ? legend.textContent : "";
  var pre = document.createElement("pre"); pre.id = "check"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 800);</script></body>"""


def _checked(page: Path, fragment: str = "") -> dict:
    from tests.commands.test_compare import _dump_dom

    checked = page.with_name("checked.html")
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK), encoding="utf-8")
    dom, _ = _dump_dom(checked, fragment)
    found = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _needs_chromium():
    from tests.commands.test_compare import _chromium

    return pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install chromium)")


@_needs_chromium()
def test_report_details_in_headless_chromium(synth_data, truth, tmp_path, capsys):
    from handseg.common.constants import CLASS_INDEX

    names = [f"team_{k}_with_a_long_name_final_submission.csv" for k in range(6)]
    csvs = [_write(tmp_path / n, {i: np.roll(ms, k, axis=2) for i, ms in truth.items()}) for k, n in enumerate(names)]
    report = tmp_path / "report"
    code, _, err = run_cli(["compare", *csvs, "--gt", synth_data / "test_gt", "--out", report], capsys)
    assert code == 0, err
    page = report / "index.html"

    # six long CSV names: every table scrolls in its own box, the page itself stays 1400 px wide
    check = _checked(page)
    assert check["pageOverflow"] <= 0, check
    assert all(t["right"] <= check["mainRight"] + 1 for t in check["tables"]), check["tables"]
    assert any(t["scrolls"] for t in check["tables"]) and all(
        t["overflowX"] in ("auto", "scroll") for t in check["tables"] if t["scrolls"]), check["tables"]
    # the worst images' captions: no number broken across lines
    assert check["captions"] > 0 and check["brokenNumbers"] == [], check

    # one small bone: shown with context (at most 800%), and the legend offers only what can occur
    image = next(iter(truth))
    small = min(CLASSES, key=lambda c: truth[image][CLASS_INDEX[c]].sum())
    check = _checked(page, f"#image={image}&class={small}&view=diff")
    zoom = int(check["zoom"].rstrip("%"))
    assert 0 < zoom <= 800, check["zoom"]
    assert "missed (reference only)" in check["legend"] and "labelled as another class" not in check["legend"]
    check = _checked(page, f"#image={image}&view=diff")  # all classes: a bone can be labelled as another
    assert "labelled as another class" in check["legend"]
