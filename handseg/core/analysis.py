"""Scores that people look at: comparisons of CSVs with each other or with ground truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from handseg.core.constants import CLASSES
from handseg.core.metrics import DiceReport, dice_scores, ground_truth
from handseg.core.submission import PredictionSet, read_predictions


@dataclass
class Comparison:
    """Each CSV scored against one reference (the first CSV, or ground truth)."""

    reference: str
    reference_set: PredictionSet
    gt_dir: Path | None
    names: list[str]
    sets: list[PredictionSet]
    reports: list[DiceReport]

    def to_json(self) -> dict:
        """``{"mean_dice", "per_class"}`` of the first comparison; with several, all under ``results``."""
        first = self.reports[0].to_json()
        if len(self.reports) == 1:
            return first
        return {**first, "reference": self.reference,
                "results": {n: r.to_json() for n, r in zip(self.names, self.reports)}}


def compare_predictions(csvs: list[Path], gt_dir: Path | None = None,
                        progress: Callable[[], None] | None = None) -> Comparison:
    """Score CSVs: against ``gt_dir``'s labels if given, else the first CSV against the others.

    Raises:
        HandsegError: a CSV is malformed, or the image sets differ.
    """
    from handseg.core.metrics import check_fits

    sets = [read_predictions(p) for p in csvs]
    if gt_dir is not None:
        reference = ground_truth(gt_dir, progress)
        for s in sets:
            check_fits(s, reference.shapes)
        ref_name, others, names = str(gt_dir), sets, [str(p) for p in csvs]
    else:
        reference, others = sets[0], sets[1:]
        ref_name, names = str(csvs[0]), [str(p) for p in csvs[1:]]
    reports = [dice_scores(reference, s, progress) for s in others]
    return Comparison(ref_name, reference, gt_dir, names, others, reports)


def scores_table(result: Comparison):
    """A rich table: one row per class, one column per compared CSV, the mean at the bottom."""
    from rich.table import Table

    table = Table(title=f"Dice against {result.reference}", show_footer=True)
    table.add_column("class", footer="mean")
    for name, report in zip(result.names, result.reports):
        table.add_column(Path(name).name, justify="right", footer=f"{report.mean_dice:.4f}")
    per_class = [r.per_class for r in result.reports]
    for c in CLASSES:
        table.add_row(c, *(f"{pc[c]:.4f}" for pc in per_class))
    return table
