"""``handseg demo``: the whole chain on synthetic data, on a CPU, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder (replaced if it holds a demo).")] = Path("demo"),
    ids: Annotated[int, typer.Option("--ids", min=4, help="Synthetic train patients.")] = 10,
    size: Annotated[int, typer.Option("--size", min=64, help="Synthetic image size.")] = 256,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 12,
    device: Annotated[str, typer.Option("--device")] = "cpu",
) -> None:
    """Run the whole chain on synthetic data on a CPU, and say where the results are.

    synth, prep, kfold, train (2 folds), predict, tta, vote, pseudo, compare and eda: each step is
    the real command, as a shell script would call it.

    Example: handseg demo --out demo
    """
    import shutil

    from handseg.cli import main
    from handseg.console import stdout
    from handseg.core.errors import HandsegError

    if out.exists():
        if not (out / "data" / "manifest.json").is_file():
            raise HandsegError("folder exists and is not a handseg demo; choose another --out", out)
        shutil.rmtree(out)
    d = out / "data"
    train_args = ["--data", d / "train", "--splits", out / "splits.json", "--arch", "unet", "--encoder", "resnet18",
                  "--encoder-weights", "none", "--size", size, "--epochs", epochs, "--batch-size", 4, "--lr", "3e-3",
                  "--workers", 0, "--device", device, "--augment", "light"]
    steps = [
        ["synth", d, "--ids", ids, "--test-ids", 3, "--size", size, "--seed", 0],
        ["prep", "json2npy", "--data", d / "train"],
        ["prep", "png2npy", "--data", d / "train"],
        ["kfold", "--data", d / "train", "--folds", 5, "--stratify", "bend", "-o", out / "splits.json"],
        ["train", *train_args, "--fold", 0, "--out", out / "runs" / "fold0"],
        ["train", *train_args, "--fold", 1, "--out", out / "runs" / "fold1"],
        ["predict", out / "runs" / "fold0", "--data", d / "test", "-o", out / "pred_fold0.csv",
         "--probs", out / "probs_fold0", "--device", device],
        ["predict", out / "runs" / "fold1", "--data", d / "test", "-o", out / "pred_fold1.csv",
         "--probs", out / "probs_fold1", "--device", device],
        ["predict", out / "runs" / "fold0", out / "runs" / "fold1", "--data", d / "test", "-o",
         out / "pred_2folds.csv", "--device", device],
        ["tta", out / "runs" / "fold0", "--data", d / "test_gt", "-o", out / "pred_tta.csv",
         "--transforms", "hflip,scale:0.9,1.1", "--device", device],
        ["vote", "hard", out / "pred_fold0.csv", out / "pred_fold1.csv", out / "pred_2folds.csv",
         "-o", out / "vote_hard.csv"],
        ["vote", "soft", out / "probs_fold0", out / "probs_fold1", "-o", out / "vote_soft.csv"],
        ["pseudo", out / "probs_fold0", "--data", d / "test", "--out", out / "pseudo"],
        ["compare", out / "pred_fold0.csv", out / "pred_fold1.csv", out / "pred_2folds.csv", out / "vote_hard.csv",
         out / "vote_soft.csv", "--gt", d / "test_gt", "--json", out / "scores.json", "--out", out / "report"],
        ["eda", "--data", d / "train", "--out", out / "eda"],
    ]
    t0 = time.perf_counter()
    for step in steps:
        args = [str(a) for a in step]
        stdout.print(f"\n[bold cyan]$ handseg {' '.join(args)}[/bold cyan]")
        code = main(args)
        if code != 0:
            raise HandsegError(f"demo step failed (exit {code}): handseg {' '.join(args)}")
    stdout.print(f"\n[bold green]demo done in {time.perf_counter() - t0:.0f}s[/bold green]")
    stdout.print(f"  scores:      {out / 'scores.json'}")
    stdout.print(f"  compare:     {out / 'report' / 'index.html'}")
    stdout.print(f"  data report: {out / 'eda' / 'index.html'}")
    stdout.print(f"  runs:        {out / 'runs'}   pseudo labels: {out / 'pseudo'}")
