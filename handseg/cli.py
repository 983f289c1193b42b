"""The ``handseg`` command: one Typer app, one module per subcommand.

Imports stay light here: ``handseg --help`` must not pay for torch.
"""

from __future__ import annotations

import os
import sys

import typer

from handseg import __version__
from handseg.commands import compare, demo, eda, kfold, predict, prep, pseudo, select, synth, train, vote
from handseg.core.errors import HandsegError, one_line

app = typer.Typer(
    name="handseg",
    help="Hand-bone X-ray segmentation (29 classes): synthetic data, caches, folds, training, inference, "
    "ensembles and reports. Stages pass files to each other; chain them in shell scripts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"handseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Hand-bone X-ray segmentation."""


# explicit registry: one line per command
app.command("synth", no_args_is_help=True)(synth.synth)
app.add_typer(prep.app, name="prep")
app.command("kfold")(kfold.kfold)
app.command("train")(train.train)
app.command("predict", no_args_is_help=True)(predict.predict)
app.command("tta", no_args_is_help=True)(predict.tta)
app.add_typer(vote.app, name="vote")
app.command("select", no_args_is_help=True)(select.select)
app.command("pseudo", no_args_is_help=True)(pseudo.pseudo)
app.command("compare", no_args_is_help=True)(compare.compare)
app.command("eda")(eda.eda)
app.command("demo")(demo.demo)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: a HandsegError becomes one line on stderr and exit code 2; Ctrl-C says so and
    exits with 130 (outputs are written atomically, so an interrupted command leaves none)."""
    try:
        app(args=argv, prog_name="handseg", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 130 and _interrupted(e):  # Typer turns KeyboardInterrupt into a silent exit 130
            print("handseg: interrupted", file=sys.stderr)
        return code
    except HandsegError as e:
        if os.environ.get("HANDSEG_DEBUG") == "1":
            raise
        print(f"handseg: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("handseg: interrupted", file=sys.stderr)
        return 130
    return 0


def _interrupted(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
