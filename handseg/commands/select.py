"""``handseg select``: choose ensemble, class-wise picks, thresholds and keep-largest on out-of-fold maps."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import OutFile, Overwrite, Workers


class Choose(str, Enum):
    oof = "oof"
    nested = "nested"


def select(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, each with the oof/ maps of its fold "
                                               "(all folds of every configuration).")],
    out: OutFile = Path("recipe.json"),
    data: Annotated[Path | None, typer.Option("--data", help="The labelled training folder (default: the one "
                                              "the runs' oof manifests name).")] = None,
    overwrite: Overwrite = False,
    choose: Annotated[Choose, typer.Option("--choose", help="oof: the best Dice on the out-of-fold images (never "
                                        "worse there than any candidate); nested: the best when its choices are "
                                        "made on the other folds (less fitted to noise).")] = Choose.oof,
    workers: Workers = None,  # type: ignore[assignment]
) -> None:
    """Score configurations, soft/hard votes, class-wise picks, per-class thresholds and keep-largest on the
    out-of-fold predictions of every fold, and write the best as a recipe for `predict --recipe`.

    Runs with the same model card (but for the fold) and TTA form one configuration; each training image
    is scored with the fold model that did not see it. The table shows each candidate's Dice on these
    images, the Dice when its choices are made on the other folds (the honest estimate), the spread over
    folds and the gain over the best configuration alone.

    Example: handseg select runs/unet_f0 runs/unet_f1 runs/hr48_f0 runs/hr48_f1 -o recipe.json
    """
    from handseg.console import print_table, progress_task, stdout
    from handseg.data.cache import default_workers
    from handseg.formats.files import check_output
    from handseg.selection.search import select_recipe

    check_output(out, overwrite, "file", [*runs, data])
    with progress_task("select", transient=True) as tick:
        result = select_recipe(runs, out, data, progress=tick, workers=workers or default_workers(),
                               choose=Choose(choose).value)
    print_table(stdout, candidates_table(result))
    doc = result.recipe
    nested = doc["nested_cv_dice"]
    picked = (f" (the highest of {len(result.ranked)} such estimates on the same images: still optimistic)"
              if doc.get("chosen_by") == "nested" else "")
    stdout.print(f"chosen: {doc['chosen']}: OOF Dice {doc['cv_dice']:.4f}"
                 + (f", {nested:.4f} tuned on other folds{picked}" if nested is not None else "") + f" -> {out}")
    weighted: dict[str, list[str]] = {}
    for name, entry in doc["classes"].items():
        if "weights" in entry:
            weighted.setdefault(":".join(f"{w:g}" for w in entry["weights"]), []).append(name)
    if weighted:  # the classes whose soft vote has its own weights (relative, one per configuration)
        stdout.print("soft-vote weights per class (" + ":".join(c.name for c in result.configs) + "): "
                     + "; ".join(f"{w} {', '.join(names)}" for w, names in weighted.items()))
    roi = [c.name for c in result.configs if c.card.get("roi")]
    if roi:  # what a ROI configuration's empty classes mean for the votes above
        stdout.print(f"ROI configurations ({', '.join(roi)}) predict their own classes only: their maps of the others "
                     "are empty, which votes count as 0; the class-wise picks choose per class between them and "
                     "the whole-hand configurations")
    for line in next_commands(out, doc.get("data")):
        stdout.print(line, markup=False)


def next_commands(recipe: Path, train_data: str | None) -> list[str]:
    """What to run with a recipe, as nnU-Net's find_best_configuration says it: predict the test images
    with it, and pack what it uses into one zip. The test folder is the training folder's sibling
    ``test/`` where there is one."""
    import shlex

    test = None
    if train_data:
        sibling = Path(train_data).parent / "test"
        if Path(train_data).name == "train" and sibling.is_dir():
            test = shlex.quote(str(sibling))
    r = shlex.quote(str(recipe))
    return ["next:",
            f"  handseg predict --recipe {r} --data {test or 'TEST_IMAGES'} -o submission.csv",
            f"  handseg export --recipe {r} -o model.zip"]


OOF_NOTE = ("Out-of-fold maps come from each run's best checkpoint, whose epoch was chosen on these same images: "
            "every figure here leans optimistic.")
"""The table's footnote: what every estimate shares."""


def candidates_table(selection, limit: int | None = None):
    """A rich table of the candidates, best first: OOF Dice, nested estimate, per-fold range, gain."""
    from rich.table import Table

    names = ", ".join(c.name for c in selection.configs)
    notes = [OOF_NOTE]
    if selection.recipe.get("chosen_by") == "nested":
        notes.append(f"The chosen row was picked for its 'tuned on other folds' figure among {len(selection.ranked)}"
                     " candidates on the same images, so its figure is still optimistic.")
    table = Table(title=f"Candidates on {len(selection.scores.images)} out-of-fold images ({names})",
                  caption="\n".join(notes))
    table.add_column("#", justify="right")
    table.add_column("candidate")
    table.add_column("OOF Dice", justify="right")
    table.add_column("tuned on other folds", justify="right")
    table.add_column("folds min..max", justify="right")
    table.add_column("gain", justify="right")
    for k, c in enumerate(selection.ranked[:limit], 1):
        folds = list(c.fold_dice.values())
        marker = " (chosen)" if c is selection.chosen else ""
        table.add_row(str(k), c.name + marker, f"{c.cv_dice:.4f}",
                      "-" if c.nested_cv_dice is None else f"{c.nested_cv_dice:.4f}",
                      f"{min(folds):.4f}..{max(folds):.4f}", f"{c.gain:+.4f}")
    return table
