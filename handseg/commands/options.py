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


def say_data(source) -> None:
    """Tell the user which folder ``--data`` resolved to, when it was not the folder itself."""
    if source.note:
        from handseg.common.notices import notice

        notice(("data", str(source.root)), source.note)
