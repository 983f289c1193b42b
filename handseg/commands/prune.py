"""``handseg prune``: drop the resume state of finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def prune(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders.", metavar="RUN...")],
) -> None:
    """Delete the resume state (resume-<epoch>.safetensors: optimizer, scheduler and random states, about
    twice the size of the weights) of finished runs. best.safetensors (what predict, select and export
    use), last.safetensors (the last epoch's weights), metrics.csv, oof/ and manifest.json stay; the run
    can no longer be continued with `train --resume`. A run that has not finished is refused.

    Example: handseg prune runs/hr48_f0 runs/hr48_f1
    """
    from handseg.common.errors import HandsegError
    from handseg.console import stdout
    from handseg.training.state import check_finished, prune_resume

    for run in runs:  # every run checked before any file goes
        if not run.is_dir():
            raise HandsegError("run folder not found", run)
        check_finished(run)
    for run in runs:
        removed = prune_resume(run)
        freed = sum(n for _, n in removed) / 2**20
        names = ", ".join(p.name for p, _ in removed) or "no resume state"
        stdout.print(f"{run}: removed {names} ({freed:.1f} MiB)")
