"""``handseg compare``: leaderboard Dice between CSVs, or against ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import Overwrite

# kept here, not in the core, so that `handseg --help` imports nothing heavy
JSON_SCHEMA_HELP = """\
JSON (--json PATH, or - for stdout); one schema for any number of CSVs:
  reference        the --gt folder, or the first CSV
  classes          the 29 class names, in order
  csv              the first compared CSV, whose scores the top level holds:
  mean_dice        float: mean over classes of the mean over images
  per_class        {class: Dice}
  empty_classes    classes the CSV predicts on no image (their Dice of 1
                   only says the reference is empty too)
  reference_empty_classes  classes with no reference pixel on any image
  per_image        {image_name: mean Dice over the 29 classes}
  per_image_class  {image_name: [29 Dice, in "classes" order]}
  results          {CSV path: {csv, label, mean_dice, per_class, per_image,
                   per_image_class}} for every compared CSV; label is the
                   shortest end of its path no other CSV shares, as the
                   table and report head it (a/submission.csv)"""

_HELP = "\n\n".join([
    "Score CSVs with the leaderboard's Dice (per image and class, mean over images, then classes).",
    "Without --gt the first CSV is the reference and the others are scored against it. Runs are checked against "
    "each image's size wherever it is known (--gt or --data): an RLE past the end of its image is an error naming "
    "the CSV, the image and the class.",
    "--out writes an HTML report (open index.html offline): every image in a sortable, filterable table, and each "
    "image's masks and differences at full resolution (overlays/), reference and CSVs side by side. It needs the "
    "X-rays: --gt DIR, or --data DIR for CSVs without ground truth.",
    JSON_SCHEMA_HELP,
    """Examples:
  handseg compare a.csv b.csv                  (a is the reference)
  handseg compare pred.csv --gt data/test_gt --json scores.json --out report/
  handseg compare a.csv b.csv c.csv --data data/test --out report/
  handseg compare a.csv b.csv --json - | jq .mean_dice
  handseg compare runs/unet_f0 runs/unet_f1 runs/fpn_f0 runs/fpn_f1 --gt data/train   (out-of-fold)""",
])


def compare(
    csvs: Annotated[list[Path], typer.Argument(help="Prediction CSVs, or the run folders of a CV (each configuration's "
                                               "out-of-fold CSVs together, scored on the training images with --gt "
                                               "data/train). Without --gt the first is the reference.",
                                               metavar="CSV|RUN...")],
    gt: Annotated[Path | None, typer.Option("--gt", help="Labelled folder (DCM/ + outputs_json/) to score "
                                            "every CSV against.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Folder of the X-rays (DCM/ layout) when there is "
                                              "no --gt: image sizes to check the runs against, and the "
                                              "backgrounds of --out's overlays.")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the scores as JSON to this file, or to "
                                                 "stdout with '-' (the table then goes to stderr).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write an HTML report (index.html, figures, "
                                             "overlays/) to this folder.")] = None,
    overwrite: Overwrite = False,
) -> None:
    from handseg.analysis.compare import read_compare_inputs, score_comparison
    from handseg.commands.options import cv_predictions
    from handseg.common.errors import HandsegError
    from handseg.console import console, print_table, progress_task, stdout
    from handseg.formats.files import atomic_dir, atomic_write_json, check_output, write_manifest

    if gt is None and len(csvs) < 2:
        raise HandsegError("give two or more CSVs (the first is the reference), or one CSV and --gt DIR")
    if out is not None and gt is None and data is None:
        raise HandsegError("--out draws every image's masks over its X-ray and needs the images: give --data DIR "
                           "(the folder of the X-rays, DCM/ layout) or --gt DIR")
    to_stdout = json_out == "-"
    json_path = None if json_out is None or to_stdout else Path(json_out)
    # every output is checked before the work, and every input before any progress is shown
    sources = [*csvs, gt, data]
    if json_path is not None:
        check_output(json_path, overwrite, "file", sources)
    if out is not None:
        check_output(out, overwrite, "dir", sources)
        if json_path is not None and json_path.resolve().is_relative_to(out.resolve()):
            raise HandsegError("--json must not lie inside --out (the report folder is replaced as a whole)", json_path)
    inputs = read_compare_inputs(cv_predictions(csvs), gt, data)
    with progress_task("compare", transient=True) as tick:
        result = score_comparison(inputs, progress=tick)
    say = console if to_stdout else stdout  # with --json - stdout carries the JSON alone
    print_table(say, scores_table(result))
    if out is not None:
        from handseg.analysis.reports.compare import compare_report

        with atomic_dir(out, overwrite, inputs=sources) as tmp:
            with progress_task("report", transient=True) as tick:
                compare_report(result, tmp, progress=tick)
            write_manifest(tmp, "compare", {"gt": str(gt) if gt else None, "data": str(data) if data else None},
                           inputs={"csvs": [str(c) for c in csvs]}, reference=result.reference,
                           images=len(result.reference_set.images))
        say.print(f"report -> {out / 'index.html'}")
    if to_stdout:
        import json
        import sys

        sys.stdout.write(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    elif json_path is not None:
        atomic_write_json(json_path, result.to_json())
        say.print(f"scores -> {json_path}")


compare.__doc__ = _HELP


def scores_table(result):
    """A rich table: one row per class, one column per compared CSV, the mean at the bottom."""
    from rich.table import Table

    from handseg.common.constants import CLASSES

    table = Table(title=f"Dice against {result.reference}", show_footer=True)
    table.add_column("class", footer="mean")
    for label, report in zip(result.labels, result.reports):
        table.add_column(label, justify="right", footer=f"{report.mean_dice:.4f}")
    from handseg.analysis.compare import empty_words

    per_class = [r.per_class for r in result.reports]
    empty = [set(r.empty_classes) for r in result.reports]
    reference_empty = set(result.reports[0].reference_empty_classes) if result.reports else set()
    for c in CLASSES:
        # a Dice of 1 over empty masks is no score: such cells say "empty", never green-perfect in silence
        table.add_row(c + (" (reference empty)" if c in reference_empty else ""),
                      *(f"[yellow]{pc[c]:.4f} empty[/yellow]" if c in e else f"{pc[c]:.4f}"
                        for pc, e in zip(per_class, empty)))
    words = [w for w in (empty_words(label, r) for label, r in zip(result.labels, result.reports)) if w]
    if reference_empty:
        words.append(f"the reference has no pixel of {', '.join(sorted(reference_empty, key=CLASSES.index))}")
    if words:
        table.caption = "empty: no predicted pixel on any image. " + "; ".join(words) + "."
    return table
