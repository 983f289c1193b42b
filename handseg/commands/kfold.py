"""``handseg kfold``: patient-grouped folds."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import DataDir, OutFile, Overwrite, Seed


class Stratify(str, Enum):
    none = "none"
    bend = "bend"
    age = "age"
    sex = "sex"
    nail = "nail"


def kfold(
    data: DataDir = Path("data/train"),
    folds: Annotated[int, typer.Option("--folds", min=2, help="Number of folds.")] = 5,
    seed: Seed = 0,
    stratify: Annotated[Stratify, typer.Option("--stratify", help="Balance folds by wrist bend (from the labels), "
                                               "or by age, sex or nail art (from meta data).")] = Stratify.none,
    meta: Annotated[Path | None, typer.Option("--meta", help="meta_data.xlsx (default: DATA/../meta_data.xlsx)."
                                              )] = None,
    out: OutFile = Path("splits.json"),
    overwrite: Overwrite = False,
) -> None:
    """Split a data set into folds grouped by patient ID (both hands in one fold).

    Example: handseg kfold --data data/train --folds 5 --stratify bend -o splits.json
    """
    from collections import Counter

    from handseg.commands.options import say_data
    from handseg.console import progress_task, stdout
    from handseg.data.kfold import make_splits
    from handseg.data.layout import resolve_data
    from handseg.formats.files import atomic_write_json, check_output, manifest

    stratify = Stratify(stratify).value
    check_output(out, overwrite, inputs=[data, meta])
    source = resolve_data(data, "train")
    say_data(source)
    data = source.root
    if meta is None and stratify in ("age", "sex", "nail"):
        meta = data.parent / "meta_data.xlsx"
    with progress_task("kfold", transient=True) as tick:
        splits = make_splits(data, folds, seed, stratify, meta, progress=tick)
    doc = {**splits, "manifest": manifest("kfold", {"folds": folds, "seed": seed, "stratify": stratify},
                                          inputs={"data": str(data), "meta": str(meta) if meta else None})}
    atomic_write_json(out, doc)
    counts = Counter(im["fold"] for im in splits["images"])
    summary = ", ".join(f"{k}: {counts[k]}" for k in range(folds))
    stdout.print(f"{len(splits['patients'])} patients, {len(splits['images'])} images in {folds} folds "
                 f"(images per fold {summary}) -> {out}")
