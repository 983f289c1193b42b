"""Options shared by every command, so ``--data``, ``--out``, ``--device``, ``--json``, ``--overwrite``
mean one thing everywhere; choices are Enums, listed in ``--help`` and checked before torch loads."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from handseg.formats.tta import MERGES  # the one list of choices (formats/ imports no torch)

DataDir = Annotated[Path, typer.Option("--data", help="Data folder holding DCM/ (and outputs_json/ for labels), "
                                                      "or the data set's root (its train/ split is used).")]
TestData = Annotated[Path | None, typer.Option("--data", help="X-rays to predict: a folder holding DCM/, the data "
                                                              "set's root (its test/ split is used), or any folder "
                                                              "of PNG/JPEG/DICOM files, flat or nested (default: "
                                                              "data/test).",
                                                              show_default=False)]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output file.")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
Workers = Annotated[int, typer.Option("--workers", "-j", min=1, help="Worker processes.")]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Random seed (results are deterministic per seed).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs (a folder is replaced "
                                                             "as a whole).")]


Merge = Enum("Merge", {m: m for m in MERGES}, type=str)
"""How test-time transforms are merged: the choices of :data:`handseg.formats.tta.MERGES`."""


def cv_predictions(paths: list[Path]) -> list:
    """Prediction inputs as ``compare`` and ``eda --pred`` take them: a CSV is itself; run folders (the
    runs of a cross-validation) become one prediction per configuration (same model card but for the fold,
    same TTA, as ``select`` groups them): its folds' out-of-fold CSVs (``RUN/oof/oof.csv``) together, named
    ``<configuration> out-of-fold``, in the place of its first run.

    Raises:
        HandsegError: a run has no out-of-fold CSV, or two runs of a configuration hold the same images.
    """
    from handseg.common.errors import HandsegError
    from handseg.formats.oof import OOF_DIR
    from handseg.formats.submission import read_predictions, union_predictions
    from handseg.selection.configs import group_configurations, read_oof_run

    runs = [read_oof_run(p) for p in paths if Path(p).is_dir()]
    if not runs:
        return list(paths)
    by_run = {}
    for cfg in group_configurations(runs):
        sets = []
        for r in cfg.runs.values():
            csv = r.folder / "oof.csv"
            if not csv.is_file():
                raise HandsegError(f"no {OOF_DIR}/oof.csv (written by `train --fold K`)", r.run)
            sets.append(read_predictions(csv))
        merged = union_predictions(sets, Path(f"{cfg.name} out-of-fold"))
        for r in cfg.runs.values():
            by_run[Path(r.run)] = (cfg.name, merged)
    out, placed = [], set()
    for p in paths:
        if not Path(p).is_dir():
            out.append(p)
            continue
        name, merged = by_run[Path(p)]
        if name not in placed:
            placed.add(name)
            out.append(merged)
    return out


def say_data(source) -> None:
    """Tell the user which folder ``--data`` resolved to, when it was not the folder itself."""
    if source.note:
        from handseg.common.notices import notice

        notice(("data", str(source.root)), source.note)
