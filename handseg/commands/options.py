"""Options shared by every command, so ``--data``, ``--out``, ``--device``, ``--json`` mean one thing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DataDir = Annotated[Path, typer.Option("--data", help="Data folder holding DCM/ (and outputs_json/ for labels).")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output file.")]
JsonOut = Annotated[
    Path | None, typer.Option("--json", help="Also write the result as JSON to this path.", dir_okay=False)
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
Workers = Annotated[int, typer.Option("--workers", "-j", min=1, help="Worker processes.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (results are deterministic per seed).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
