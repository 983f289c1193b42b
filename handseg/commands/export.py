"""``handseg export``: run folders (or a recipe and its runs) in one zip that `handseg predict` takes."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import OutFile, Overwrite


class Format(str, Enum):
    torch = "torch"
    onnx = "onnx"


def export(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders (their best checkpoint goes in).",
                                                      metavar="RUN", show_default=False)] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="recipe.json from `handseg select`: the recipe "
                                                "and every run it uses go in (a configuration that no class "
                                                "uses, directly or by a vote, is left out).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="torch: the checkpoints; onnx: also one ONNX graph per "
                                        "checkpoint (dynamic batch), which `handseg predict model.zip` runs with "
                                        "onnxruntime (pip install 'handseg[onnx]').")] = "torch",
    out: OutFile = Path("model.zip"),
    overwrite: Overwrite = False,
) -> None:
    """Put trained models in one file that another machine predicts with: `handseg predict model.zip`.

    The zip holds each checkpoint (weights and model card: architecture, encoder, size, thresholds,
    normalisation) and, with --recipe, the recipe with its run paths rewritten to point inside the zip.
    Nothing in it is pickled; its index pins every checkpoint by SHA-256, and --recipe checks the
    recipe's own pins before anything is zipped.

    Examples:
      handseg export runs/hr48_f0 runs/hr48_f1 runs/hr48_f2 -o hr48.zip
      handseg export --recipe recipe.json -o model.zip
      handseg export --recipe recipe.json --format onnx -o model.zip      (runs with onnxruntime)
      handseg predict model.zip --data data/test -o submission.csv
    """
    from handseg.console import stdout
    from handseg.formats.files import check_output
    from handseg.models.context import model_inputs
    from handseg.selection.apply import recipe_inputs
    from handseg.selection.export import export_models

    check_output(out, overwrite, inputs=[*model_inputs(runs or []), *(recipe_inputs(recipe) if recipe else [])])
    index = export_models(list(runs or []), out, recipe, Format(fmt).value)
    n = len(index["models"])
    what = f"{n} checkpoint{'s' if n != 1 else ''}" + (" and the recipe" if index["recipe"] else "")
    if Format(fmt).value == "onnx":
        what += f" with their ONNX graphs (opset {index['models'][0]['onnx']['opset']})"
    stdout.print(f"{what} -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")
