"""``handseg synth``: a synthetic data set in the competition layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import Overwrite, Seed


def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (train/, test/, test_gt/, meta_data.xlsx).")],
    ids: Annotated[int, typer.Option("--ids", min=1, help="Train patients (two hands each).")] = 20,
    test_ids: Annotated[int, typer.Option("--test-ids", min=0, help="Test patients (two hands each).")] = 6,
    size: Annotated[int, typer.Option("--size", min=64, help="Image side in pixels (the real data: 2048).")] = 2048,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """Make realistic synthetic hand radiographs with labels, in the competition layout.

    Train images get polygon JSONs; test images get none. Their ground truth goes to test_gt/,
    for scoring: handseg compare PRED.csv --gt OUT/test_gt. Deterministic by seed.

    Example: handseg synth data --ids 20 --test-ids 6 --size 512 --seed 0
    """
    from handseg.console import progress_task, stdout
    from handseg.data.synth import make_dataset
    from handseg.formats.files import atomic_dir, write_manifest

    with atomic_dir(out, overwrite) as tmp, progress_task("synth") as tick:
        result = make_dataset(tmp, ids=ids, test_ids=test_ids, size=size, seed=seed, progress=tick)
        write_manifest(tmp, "synth", {"ids": ids, "test_ids": test_ids, "size": size, "seed": seed},
                       train_ids=result.train_ids, test_ids=result.test_ids, images=result.images)
    stdout.print(f"wrote {result.images} images ({len(result.train_ids)} train IDs, {len(result.test_ids)} test IDs, "
                 f"{size} px) to {out}")
