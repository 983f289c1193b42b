"""Day one for a competitor (issue 19): results under --quiet, whole tables off a terminal, inputs that
share a file name, empty predictions, and the habits users bring from nnU-Net and Kaggle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from handseg.data.images import read_image
from handseg.data.labels import class_masks, read_polygons
from handseg.data.layout import discover
from handseg.formats.rle import rle_encode
from handseg.formats.submission import write_predictions
from tests.commands.test_select import two_configs  # noqa: F401  (a fixture)
from tests.conftest import run_cli


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
