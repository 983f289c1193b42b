"""The rich console and the progress bar that long work shows."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from handseg.common.distributed import dist_env

console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False, soft_wrap=True)
"""Results: scores, tables, the chosen recipe, output paths. They print with ``--quiet`` too."""
log = Console(highlight=False, soft_wrap=True)
"""Messages on standard output that are not results (training's epoch lines, the demo's commands):
``--quiet`` silences them."""

_quiet_set_progress = False


def be_quiet(quiet: bool = True) -> None:
    """``handseg --quiet``: no progress bars and no messages; errors, notes and results (scores, tables,
    the chosen recipe, output paths, ``--json -``) still appear. ``be_quiet(False)`` undoes it (the CLI's
    ``main`` may run many times in one process)."""
    global _quiet_set_progress
    if quiet and os.environ.get("HANDSEG_NO_PROGRESS", "") == "":
        os.environ["HANDSEG_NO_PROGRESS"] = "1"
        _quiet_set_progress = True
    elif not quiet and _quiet_set_progress:
        os.environ.pop("HANDSEG_NO_PROGRESS", None)
        _quiet_set_progress = False
    console.quiet = quiet
    log.quiet = quiet


def print_table(target: Console, table) -> None:
    """Print a table whole: on a terminal at the terminal's width (rich wraps cells that do not fit);
    anywhere else (a log, a pipe, CI, where rich would assume 80 columns and cut names to ``finger-…``)
    at the width the table needs."""
    if target.is_terminal:
        target.print(table)
        return
    from rich.measure import Measurement

    needed = Measurement.get(target, target.options.update_width(100_000), table).maximum
    # Console.print caps its width at the console's: a console as wide as the table prints it
    wide = Console(file=target.file, width=max(needed, target.width), highlight=False, quiet=target.quiet,
                   color_system=target.color_system, force_terminal=False)
    wide.print(table)


def is_main_process() -> bool:
    """False in torchrun processes other than rank 0, which neither print nor show progress."""

    return dist_env().main


def progress_enabled() -> bool:
    """Progress bars on a terminal only (a log file gets no bar, and an error stays its one line)."""
    return (os.environ.get("HANDSEG_NO_PROGRESS", "") == "" and sys.stderr is not None and console.is_terminal
            and is_main_process())


def make_progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not progress_enabled(),
    )


@contextlib.contextmanager
def progress_task(description: str, transient: bool = False) -> Iterator[Callable[..., None]]:
    """A progress bar for one stage, as the callback the core takes: ``tick()`` advances it by one,
    ``tick(total=n)`` sets its length once the core knows it."""
    with make_progress(transient) as progress:
        task = progress.add_task(description, total=None, info="")

        def tick(total: int | None = None) -> None:
            if total is None:
                progress.advance(task)
            else:
                progress.update(task, total=total)

        with clear_on_error(progress):
            yield tick


@contextlib.contextmanager
def clear_on_error(progress: Progress) -> Iterator[None]:
    """A command that fails says one line: the bar it showed is wiped, not left above the error."""
    try:
        yield
    except BaseException:
        progress.live.transient = True
        raise
