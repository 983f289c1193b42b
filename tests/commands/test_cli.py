import subprocess
import sys

import pytest

from tests.conftest import run_cli


def test_help_does_not_import_torch():
    code = ("import sys; from handseg.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'cv2' not in sys.modules\nprint('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


@pytest.mark.parametrize("command", [["synth"], ["prep", "json2npy"], ["prep", "png2npy"], ["kfold"],
                                     ["compare"], ["prune"]])
def test_every_command_has_help_with_an_example(command, capsys):
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    assert "Example" in out


def test_error_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run_cli(["compare", tmp_path / "missing.csv", "--gt", tmp_path], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "missing.csv: CSV not found" in err
    assert "Traceback" not in err


def test_debug_env_shows_traceback(tmp_path):
    import os

    env = {**os.environ, "HANDSEG_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-m", "handseg", "compare", str(tmp_path / "x.csv"), str(tmp_path / "y.csv")],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("handseg ")
