"""``handseg compare``: leaderboard Dice between CSVs, or against ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import JsonOut


def compare(
    csvs: Annotated[list[Path], typer.Argument(help="Prediction CSVs. Without --gt the first is the reference.")],
    gt: Annotated[Path | None, typer.Option("--gt", help="Labelled folder (DCM/ + outputs_json/) to score "
                                            "every CSV against.")] = None,
    json_out: JsonOut = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write an HTML report (index.html + PNGs) "
                                             "to this folder.")] = None,
) -> None:
    """Score CSVs with the leaderboard's Dice (per image and class, mean over images, then classes).

    Examples:
      handseg compare a.csv b.csv                  (a is the reference)
      handseg compare pred.csv --gt data/test_gt --json scores.json
    """
    from handseg.console import progress_task, stdout
    from handseg.core.analysis import compare_predictions, scores_table
    from handseg.core.errors import HandsegError
    from handseg.core.files import atomic_write_json

    if gt is None and len(csvs) < 2:
        raise HandsegError("give two or more CSVs (the first is the reference), or one CSV and --gt DIR")
    with progress_task("compare", transient=True) as tick:
        result = compare_predictions(csvs, gt, progress=tick)
    stdout.print(scores_table(result))
    if json_out is not None:
        atomic_write_json(json_out, result.to_json())
        stdout.print(f"scores -> {json_out}")
    if out is not None:
        from handseg.core.reports import compare_report

        index = compare_report(result, out)
        stdout.print(f"report -> {index}")
