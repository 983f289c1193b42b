"""``handseg predict`` and ``handseg tta``: checkpoints to a submission CSV (and probability maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import DataDir, Device, OutFile

Checkpoints = Annotated[list[Path], typer.Argument(help="Run folders or .safetensors checkpoints "
                                                   "(several are averaged, e.g. five folds).")]
Probs = Annotated[Path | None, typer.Option("--probs", help="Also save per-image probability maps here "
                                            "(uint8, memory-mappable) for `vote soft`.")]
Thresholds = Annotated[Path | None, typer.Option("--thresholds", help="JSON {class: threshold} "
                                                 "(default: the checkpoints' own).")]
NoAmp = Annotated[bool, typer.Option("--no-amp", help="Run in fp32 on GPU.")]


def predict(
    checkpoints: Checkpoints,
    data: DataDir = Path("data/test"),
    out: OutFile = Path("pred.csv"),
    probs: Probs = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sliding-window crops per "
                                            "forward pass.")] = 4,
    thresholds: Thresholds = None,
    tune_thresholds: Annotated[bool, typer.Option("--tune-thresholds", help="Search per-class thresholds on "
                                                  "labelled --data; writes OUT.thresholds.json.")] = False,
    device: Device = "auto",
    no_amp: NoAmp = False,
) -> None:
    """Predict every image of --data and write the competition CSV.

    Examples:
      handseg predict runs/fold0 runs/fold1 runs/fold2 --data data/test -o pred.csv --probs probs/
      handseg predict runs/fold0 --data data/train_fold0 --tune-thresholds -o val.csv
    """
    _run(checkpoints, data, out, probs, "", "mean", thresholds, tune_thresholds, device, not no_amp, "predict",
         batch_size)


def tta(
    checkpoints: Checkpoints,
    data: DataDir = Path("data/test"),
    out: OutFile = Path("pred_tta.csv"),
    transforms: Annotated[str, typer.Option("--transforms", help="hflip, vflip, scale:S1,S2,... (the "
                                            "identity is always included).")] = "hflip",
    merge: Annotated[str, typer.Option("--merge", help="mean | gmean | max.")] = "mean",
    probs: Probs = None,
    thresholds: Thresholds = None,
    device: Device = "auto",
    no_amp: NoAmp = False,
) -> None:
    """Predict with test-time augmentation (ttach); on labelled data, report each transform's Dice.

    Example: handseg tta runs/fold0 --data data/test -o pred_tta.csv --transforms hflip,scale:0.8,1.2 --merge mean
    """
    _run(checkpoints, data, out, probs, transforms, merge, thresholds, False, device, not no_amp, "tta", 4)


def _run(checkpoints, data, out, probs, transforms, merge, thresholds, tune, device, amp, stage, batch_size):
    from rich.table import Table

    from handseg.console import progress_task, stdout
    from handseg.core.checkpoint import resolve_checkpoint
    from handseg.core.errors import HandsegError
    from handseg.core.files import sidecar_manifest_path, write_manifest
    from handseg.core.prediction import (
        MERGES,
        parse_transforms,
        read_thresholds,
        run_predictions,
        write_thresholds,
    )

    if merge not in MERGES:
        raise HandsegError(f"unknown --merge {merge!r}; valid: {', '.join(MERGES)}")
    resolved = [resolve_checkpoint(c) for c in checkpoints]
    transform_list = parse_transforms(transforms)
    thr = read_thresholds(thresholds) if thresholds else None
    with progress_task(stage) as tick:
        result = run_predictions(resolved, data, out, probs, transform_list, merge, thr, tune, device, amp,
                                 progress=tick, batch=batch_size)
    if not result.main:
        return  # under torchrun, rank 0 writes the manifest and prints
    options = {"checkpoints": [str(c) for c in resolved], "transforms": [t.name for t in transform_list],
               "merge": merge, "thresholds": result.thresholds, "tuned": result.tuned, "device": device,
               "amp": amp, "batch_size": batch_size}
    write_manifest(out.parent, stage, options, inputs={"data": str(data)},
                   name=sidecar_manifest_path(out).name, output=str(out), images=result.images, dice=result.dice)
    if probs is not None:
        write_manifest(probs, stage, options, inputs={"data": str(data)})
    if tune:
        path = out.with_name(f"{out.stem}.thresholds.json")
        write_thresholds(path, result.thresholds)
        stdout.print(f"tuned thresholds -> {path}")
    if result.dice:
        table = Table(title="Dice on labelled data")
        table.add_column("transform")
        table.add_column("mean Dice", justify="right")
        for name, value in result.dice.items():
            table.add_row(name, f"{value:.4f}")
        stdout.print(table)
    stdout.print(f"{result.images} images -> {out}" + (f" (probabilities in {probs})" if probs else ""))
