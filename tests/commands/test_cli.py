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


def _commands():
    """Every registered command, as its argv (groups expanded): taken from the app, not listed by hand."""
    import typer.main

    from handseg.cli import app

    def walk(group, prefix):
        for name, cmd in sorted(group.commands.items()):
            if hasattr(cmd, "commands"):
                yield from walk(cmd, [*prefix, name])
            else:
                yield [*prefix, name]

    return list(walk(typer.main.get_command(app), []))


def test_the_help_test_sees_every_command():
    names = {" ".join(c) for c in _commands()}
    assert {"synth", "prep json2npy", "train", "predict", "tta", "vote soft", "select", "export", "demo"} <= names


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
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
