"""``handseg vote``: hard, soft and class-wise ensembles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import OutFile, Overwrite

VoteData = Annotated[Path | None, typer.Option("--data", help="The X-rays the inputs predict: the output follows "
                                               "their submission order and every run is checked against its "
                                               "image's size (default: the data folder the inputs' manifests "
                                               "name); needed by --keep-largest on CSVs.")]
KeepLargest = Annotated[str | None, typer.Option(
    "--keep-largest", help="Keep only the largest connected component (8-connected) of these classes: "
    "'all' or CLASS,CLASS,... (e.g. Radius,Ulna).")]


def _keep(spec: str | None):
    from handseg.ensemble.masks import format_keep_largest, parse_keep_largest

    keep = parse_keep_largest(spec)
    return keep, format_keep_largest(keep)

app = typer.Typer(help="Ensemble predictions: hard (CSV runs), soft (probability maps), classwise.\n\n"
                       "Examples:\n"
                       "  handseg vote hard a.csv b.csv c.csv -o vote.csv --data data/test\n"
                       "  handseg vote soft probs/a probs/b -o soft.csv --weights 2,1\n"
                       "  handseg vote classwise --map map.json -o best.csv",
                  no_args_is_help=True)


def _finish(stage: str, out: Path, options: dict, inputs: dict, images: int) -> None:
    from handseg.console import stdout
    from handseg.formats.files import sidecar_manifest_path, write_manifest

    write_manifest(out.parent, stage, options, inputs=inputs, name=sidecar_manifest_path(out).name,
                   output=str(out), images=images)
    stdout.print(f"{images} images -> {out}")


@app.command("hard", no_args_is_help=True)
def hard(
    csvs: Annotated[list[Path], typer.Argument(help="Prediction CSVs (same images).")],
    out: OutFile = Path("vote_hard.csv"),
    min_votes: Annotated[int | None, typer.Option("--min-votes", help="Votes a pixel needs (default: majority)."
                                                  )] = None,
    data: VoteData = None,
    keep_largest: KeepLargest = None,
    overwrite: Overwrite = False,
) -> None:
    """Pixel-wise majority vote of CSVs, computed on RLE runs (no full-size masks).

    Example: handseg vote hard a.csv b.csv c.csv -o vote.csv --min-votes 2
    """
    from handseg.console import progress_task
    from handseg.ensemble.votes import hard_vote
    from handseg.formats.files import check_output

    keep, keep_text = _keep(keep_largest)
    check_output(out, overwrite, inputs=[*csvs, data])
    with progress_task("vote hard", transient=True) as tick:
        n = hard_vote(csvs, out, min_votes, progress=tick, data=data, keep_largest=keep)
    _finish("vote-hard", out, {"min_votes": min_votes or len(csvs) // 2 + 1, "keep_largest": keep_text},
            {"csvs": [str(c) for c in csvs], "data": str(data) if data else None}, n)


@app.command("soft", no_args_is_help=True)
def soft(
    folders: Annotated[list[Path], typer.Argument(help="Probability folders from `predict --probs`.")],
    out: OutFile = Path("vote_soft.csv"),
    weights: Annotated[str | None, typer.Option("--weights", help="Comma-separated weight per folder.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Threshold on the weighted mean, in (0, 1).")] = 0.5,
    data: VoteData = None,
    keep_largest: KeepLargest = None,
    overwrite: Overwrite = False,
) -> None:
    """Weighted mean of probability maps, thresholded.

    Example: handseg vote soft probs_a/ probs_b/ -o vote.csv --weights 2,1 --threshold 0.45 --keep-largest all
    """
    from handseg.common.errors import HandsegError
    from handseg.console import progress_task
    from handseg.ensemble.masks import check_thresholds
    from handseg.ensemble.votes import check_weights, soft_vote
    from handseg.formats.files import check_output

    try:
        w = [float(v) for v in weights.split(",")] if weights else None
    except ValueError:
        raise HandsegError(f"--weights {weights!r} is not a comma-separated list of numbers") from None
    w = check_weights(w, len(folders)) if len(folders) > 1 else w
    check_thresholds(threshold, option="--threshold")
    keep, keep_text = _keep(keep_largest)
    check_output(out, overwrite, inputs=[*folders, data])
    with progress_task("vote soft", transient=True) as tick:
        n = soft_vote(folders, out, w, threshold, progress=tick, data=data, keep_largest=keep)
    _finish("vote-soft", out, {"weights": w, "threshold": threshold, "keep_largest": keep_text},
            {"probs": [str(f) for f in folders]}, n)


@app.command("classwise")
def classwise(
    class_map: Annotated[Path, typer.Option("--map", help='JSON {"default": "a.csv", "Lunate": "wrist.csv"}.')],
    out: OutFile = Path("vote_classwise.csv"),
    data: VoteData = None,
    keep_largest: KeepLargest = None,
    overwrite: Overwrite = False,
) -> None:
    """Take each class from the CSV a map names (e.g. wrist bones from a specialist model).

    Example: handseg vote classwise --map map.json -o vote.csv --keep-largest Radius,Ulna --data data/test
    """
    from handseg.ensemble.votes import classwise_vote, read_class_map
    from handseg.formats.files import check_output

    keep, keep_text = _keep(keep_largest)
    mapping = read_class_map(class_map)
    check_output(out, overwrite, inputs=[class_map, *mapping.values(), data])
    n = classwise_vote(mapping, out, data, keep_largest=keep)
    _finish("vote-classwise", out, {"map": {k: str(v) for k, v in mapping.items()}, "keep_largest": keep_text},
            {"map": str(class_map), "data": str(data) if data else None}, n)
