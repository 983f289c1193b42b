"""``handseg eda``: a report of a data set (and of a prediction on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import DataDir, OutDir


def eda(
    data: DataDir = Path("data/train"),
    pred: Annotated[Path | None, typer.Option("--pred", help="A prediction CSV for these (labelled) images: "
                                              "adds Dice against class area and the worst cases.")] = None,
    meta: Annotated[Path | None, typer.Option("--meta", help="meta_data.xlsx (default: DATA/../meta_data.xlsx)."
                                              )] = None,
    out: OutDir = Path("eda"),
) -> None:
    """Write an HTML report of a data set (and of a prediction on it).

    Counts, sizes, intensities, class areas, overlaps, handedness, wrist bend, meta data and label
    overlays; with --pred, Dice against class area and the worst cases.

    Example: handseg eda --data data/train --out reports/eda
    """
    from handseg.console import progress_task, stdout
    from handseg.core.files import write_manifest
    from handseg.core.reports import eda_report

    with progress_task("eda") as tick:
        index = eda_report(data, out, pred, meta, progress=tick)
    write_manifest(out, "eda", {"pred": str(pred) if pred else None}, inputs={"data": str(data)})
    stdout.print(f"report -> {index}")
