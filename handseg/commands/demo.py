"""``handseg demo``: the whole chain on synthetic data, on a CPU, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder.")] = Path("demo"),
    ids: Annotated[int, typer.Option("--ids", min=4, help="Synthetic train patients.")] = 10,
    size: Annotated[int, typer.Option("--size", min=64, help="Synthetic image size.")] = 256,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs of each fold's model.")] = 50,
    train_size: Annotated[int | None, typer.Option("--train-size", min=32, help="The models' input size "
                                                   "(default: half of --size).", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto: where every step trains "
                                        "and predicts (the Dice figures in the README are the CPU's).")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing work folder as a whole.")] = False,
) -> None:
    """Run the whole chain on synthetic data on a CPU, and say where the results are.

    synth, prep, kfold, train (2 folds, each writing its out-of-fold maps), select, predict (by
    folds, and by the selected recipe), tta, vote, pseudo, compare and eda: each step runs the same
    code as the command it prints, which a shell script would call the same way.

    Example: handseg demo --out demo
    """
    import shutil

    from handseg.cli import app  # the demo runs the CLI's own commands, exactly as it prints them
    from handseg.commands.train import expand_list_options
    from handseg.common.errors import HandsegError
    from handseg.console import log, stdout
    from handseg.formats.files import check_output

    check_output(out, overwrite, "dir")
    if out.exists():
        if any(out.iterdir()) and not (out / "data" / "manifest.json").is_file():
            raise HandsegError("folder exists and is not a handseg demo; choose another --out", out)
        shutil.rmtree(out)
    d, runs = out / "data", out / "runs"
    f0, f1 = runs / "fold0", runs / "fold1"
    train_size = train_size or max(32, size // 64 * 32)
    train_flags = ["--data", d / "train", "--splits", out / "splits.json", "--arch", "unet", "--encoder", "resnet18",
                   "--encoder-weights", "none", "--size", train_size, "--epochs", epochs, "--batch-size", 4,
                   "--lr", "3e-3", "--workers", 0, "--device", device, "--augment", "light"]
    on = ["--device", device]
    steps = [
        ["synth", d, "--ids", ids, "--test-ids", 3, "--size", size, "--seed", 0],
        ["prep", "json2npy", "--data", d / "train"],
        ["prep", "png2npy", "--data", d / "train"],
        ["kfold", "--data", d / "train", "--folds", 2, "--stratify", "bend", "-o", out / "splits.json"],
        ["train", *train_flags, "--fold", 0, "--out", f0],
        ["train", *train_flags, "--fold", 1, "--out", f1],
        ["select", f0, f1, "-o", out / "recipe.json"],
        ["predict", "--recipe", out / "recipe.json", "--data", d / "test", "-o", out / "pred_recipe.csv", *on],
        ["predict", f0, "--data", d / "test", "-o", out / "pred_fold0.csv", "--probs", out / "probs_fold0", *on],
        ["predict", f1, "--data", d / "test", "-o", out / "pred_fold1.csv", "--probs", out / "probs_fold1", *on],
        ["predict", f0, f1, "--data", d / "test", "-o", out / "pred_2folds.csv", *on],
        ["tta", f0, "--data", d / "test_gt", "-o", out / "pred_tta.csv", "--transforms", "hflip,scale:0.9,1.1", *on],
        ["vote", "hard", out / "pred_fold0.csv", out / "pred_fold1.csv", out / "pred_2folds.csv",
         "-o", out / "vote_hard.csv"],
        ["vote", "soft", out / "probs_fold0", out / "probs_fold1", "-o", out / "vote_soft.csv"],
        ["pseudo", out / "probs_fold0", "--data", d / "test", "--out", out / "pseudo"],
        ["compare", out / "pred_fold0.csv", out / "pred_fold1.csv", out / "pred_2folds.csv", out / "vote_hard.csv",
         out / "vote_soft.csv", out / "pred_recipe.csv", "--gt", d / "test_gt", "--json", out / "scores.json",
         "--out", out / "report"],
        ["eda", "--data", d / "train", "--out", out / "eda"],
    ]

    def run(argv: list[str]) -> None:
        code = app(args=expand_list_options(argv), prog_name="handseg", standalone_mode=False)
        if isinstance(code, int) and code != 0:
            raise HandsegError(f"the demo's step `handseg {' '.join(argv)}` exited with code {code}")

    t0 = time.perf_counter()
    for step in steps:
        argv = [str(a) for a in step]
        log.print(f"\n[bold cyan]$ handseg {' '.join(argv)}[/bold cyan]")
        try:
            run(argv)
        except HandsegError as e:
            # the gate (all 29 bones, mean confidence >= 0.9) may keep nothing from models trained for a
            # minute: pseudo then fails; the demo says what happened and goes on, as a script would with `|| true`
            if argv[0] != "pseudo":
                raise
            stdout.print(f"[yellow]pseudo kept no image: {e}[/yellow]")
    stdout.print(f"\n[bold green]demo done in {time.perf_counter() - t0:.0f}s[/bold green]")
    stdout.print(f"  scores:      {out / 'scores.json'}   recipe: {out / 'recipe.json'}")
    stdout.print(f"  compare:     {out / 'report' / 'index.html'}")
    stdout.print(f"  data report: {out / 'eda' / 'index.html'}")
    stdout.print(f"  runs:        {runs}   pseudo labels: {_pseudo_summary(out / 'pseudo')}")


def _pseudo_summary(folder: Path) -> str:
    """What the demo's pseudo step kept, from its manifest: the words match what happened."""
    import json

    if not (folder / "manifest.json").is_file():
        return "none kept"
    doc = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    kept, dropped = len(doc.get("kept", [])), len(doc.get("dropped", {}))
    gate = (doc.get("options") or {}).get("min_confidence")
    return f"{kept} of {kept + dropped} images kept (29 bones, confidence >= {gate}) -> {folder}"
