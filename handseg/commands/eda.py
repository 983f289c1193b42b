"""``handseg eda``: a report of a data set (and of a prediction on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import DataDir, OutDir, Overwrite


def eda(
    data: DataDir = Path("data/train"),
    pred: Annotated[list[Path] | None, typer.Option("--pred", help="A prediction CSV for these images, or the run "
                                                    "folders of a CV (their out-of-fold CSVs together: --pred "
                                                    "runs/f0 runs/f1 ...): adds its masks and, on labelled images, "
                                                    "its differences and Dice.", metavar="CSV|RUN")] = None,
    meta: Annotated[Path | None, typer.Option("--meta", help="meta_data.xlsx (default: DATA/../meta_data.xlsx "
                                              "if it exists); only the folder's patients are shown.")] = None,
    out: OutDir = Path("eda"),
    overwrite: Overwrite = False,
) -> None:
    """Write an HTML report of a data set (and of a prediction on it); open OUT/index.html offline.

    Counts, sizes, intensities, class areas, overlaps, handedness, wrist bend, meta data of the
    folder's patients, and every image in a sortable, filterable table (size, side, wrist bend,
    meta data, Dice with --pred): click a row for its labels (and prediction) at full resolution,
    one class at a time or all. With --pred, Dice against class area and the worst cases.

    Examples:
      handseg eda --data data/train --pred val.csv --out reports/eda
      handseg eda --data data/train --pred runs/hr48_f0 runs/hr48_f1 runs/hr48_f2 --out reports/eda_oof
    """
    from handseg.analysis.reports.eda import eda_report, read_eda_inputs
    from handseg.commands.options import cv_predictions
    from handseg.common.errors import HandsegError
    from handseg.console import progress_task, stdout
    from handseg.formats.files import atomic_dir, check_output, write_manifest

    # the output and every input are checked before any work or progress
    pred = list(pred or [])
    sources = [data, *pred, meta]
    check_output(out, overwrite, "dir", sources)
    preds = cv_predictions(pred)
    if len(preds) > 1:
        raise HandsegError("--pred takes one CSV, or the runs of one configuration (compare takes several)")
    inputs = read_eda_inputs(data, preds[0] if preds else None, meta)
    with atomic_dir(out, overwrite, inputs=sources) as tmp:
        # transient: a label file found broken midway leaves its one-line error, not a half bar
        with progress_task("eda", transient=True) as tick:
            eda_report(inputs, tmp, progress=tick)
        write_manifest(tmp, "eda", {"pred": [str(p) for p in pred] or None,
                                    "meta": str(inputs.meta_path) if inputs.meta_path else None},
                       inputs={"data": str(data)}, images=len(inputs.samples))
    stdout.print(f"report -> {out / 'index.html'}")
