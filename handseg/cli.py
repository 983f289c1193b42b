"""The ``handseg`` command: one Typer app, one module per subcommand.

Imports stay light here: ``handseg --help`` must not pay for torch.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from handseg import __version__
from handseg.commands import compare, demo, eda, export, kfold, predict, prep, prune, pseudo, select, synth, train, vote
from handseg.common.errors import HandsegError, one_line


def _conventional_help() -> None:
    """Help as people know it from other command-line tools: flags without a ``<bool>`` type, arguments
    named by their metavar (``CSV...``, not ``{csvs}... <list[Path]>``). Typer 0.29 renders types
    itself; older versions already render this way and lack these methods, so nothing changes there."""
    from typer import core

    option_display = getattr(core.TyperOption, "display_type_rich", None)
    if option_display is not None and not getattr(option_display, "_handseg", False):
        def display_type_rich(self, ctx):
            return None if self.is_flag and not self.count else option_display(self, ctx)

        display_type_rich._handseg = True
        core.TyperOption.display_type_rich = display_type_rich
    if hasattr(core.TyperArgument, "display_type_rich"):
        core.TyperArgument.display_type_rich = lambda self, ctx: None
    if hasattr(core.TyperArgument, "_usage_display_name"):
        def usage_name(self) -> str:
            name = self.display_name_raw.upper()
            name = name if self.required else f"[{name}]"
            return name + "..." if self.nargs != 1 and not name.endswith("...") else name

        core.TyperArgument._usage_display_name = usage_name


_conventional_help()

app = typer.Typer(
    name="handseg",
    help="Hand-bone X-ray segmentation (29 classes): synthetic data, caches, folds, training, inference, "
    "ensembles and reports. Stages pass files to each other; chain them in shell scripts.",
    epilog="Environment: HANDSEG_DEBUG=1 shows tracebacks instead of one-line errors; HANDSEG_NO_PROGRESS=1 "
    "hides progress bars; HANDSEG_MAX_PIXELS sets the largest image read (default 8192 x 8192); "
    "HANDSEG_MAX_ZIP_BYTES the most a model zip may unpack to (default 8 GiB).",
    no_args_is_help=True,
    add_completion=True,
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors and results only (scores, tables, the "
                                        "chosen recipe, output paths): no progress bars or messages. Also "
                                        "accepted after the command name.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads in all (the model's plus "
                                                "data loaders'); default: the CPUs this process may use "
                                                "(affinity and cgroup quota). Manifests record what was used.",
                                                show_default=False)] = None,
) -> None:
    """Hand-bone X-ray segmentation."""
    from handseg.common import threads as thread_budget

    thread_budget.set_override(threads)
    if quiet:
        from handseg.console import be_quiet

        be_quiet()


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
app.command("export")(export.export)
app.command("prune", no_args_is_help=True)(prune.prune)
app.command("demo")(demo.demo)


QUIET_FLAGS = ("--quiet", "-q")


def hoist_quiet(argv: list[str]) -> list[str]:
    """``handseg compare a.csv b.csv --quiet`` -> ``handseg --quiet compare a.csv b.csv``: the global flag
    is taken wherever it stands (no command has a ``-q`` or ``--quiet`` of its own), up to a ``--``."""
    words = [str(a) for a in argv]
    end = words.index("--") if "--" in words else len(words)
    found = [i for i in range(end) if words[i] in QUIET_FLAGS]
    if not found:
        return words
    return ["--quiet"] + [w for i, w in enumerate(words) if i not in found]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Every error is one line on stderr: a HandsegError (bad input) or a usage error
    (an unknown option, a value out of range) exits with code 2; Ctrl-C says so and exits with 130
    (outputs are written atomically, so an interrupted command leaves none)."""
    from handseg.common import notices, threads
    from handseg.console import be_quiet
    from handseg.formats.files import release_outputs

    notices.reset()  # each run says its notes afresh (main may run many times in one process)
    threads.reset()
    be_quiet(False)
    argv = hoist_quiet(train.expand_list_options(sys.argv[1:] if argv is None else argv))
    try:
        try:
            code = app(args=argv, prog_name="handseg", standalone_mode=False)
        finally:
            release_outputs()  # one writer per output until the command ends (see formats.files.hold_output)
    except HandsegError as e:
        if os.environ.get("HANDSEG_DEBUG") == "1":
            raise
        print(f"handseg: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("handseg: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if os.environ.get("HANDSEG_DEBUG") == "1":
            raise
        print("handseg: error: out of memory: use a smaller --size, --crop or --batch-size", file=sys.stderr)
        return 2
    except Exception as e:
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):  # not a click usage error: a bug
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # a bare `handseg train`-style call prints the help
            return 0
        if type(e).__name__ == "Abort":
            print("handseg: aborted", file=sys.stderr)
            return 1
        message = " ".join(e.format_message().split())
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"handseg: error: {message}{hint}", file=sys.stderr)
        return e.exit_code
    if code == 130:
        print("handseg: interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0
