"""``handseg pseudo``: pseudo-labels from test predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import OutDir, Overwrite


def pseudo(
    source: Annotated[Path, typer.Argument(help="PRED.csv, or a probability folder from `predict --probs`.")],
    data: Annotated[Path | None, typer.Option("--data", help="The X-rays the predictions are of: a folder holding "
                                              "DCM/, the data set's root (its test/ split is used), or any folder "
                                              "of PNG/JPEG/DICOM files (default: data/test). They become the "
                                              "images of the pseudo-label set.", show_default=False)] = None,
    out: OutDir = Path("pseudo"),
    min_confidence: Annotated[float | None, typer.Option("--min-confidence", min=0.0, max=1.0, help="Keep images "
                                                         "whose mean probability over predicted bone pixels is at "
                                                         "least P (probability folders only; default 0.9 there, "
                                                         "0 turns the gate off).", show_default=False)] = None,
    overwrite: Overwrite = False,
) -> None:
    """Turn test predictions into a labelled data set for `handseg train --extra OUT`.

    An image is kept only if all 29 bones are predicted on it and, from probability maps, the mean
    probability over its predicted bone pixels is at least --min-confidence (0.9 unless given). If no
    image qualifies it stops with an error rather than write an empty set.

    Example: handseg pseudo probs/ --data data/test --out pseudo --min-confidence 0.9
    """
    from handseg.commands.options import say_data
    from handseg.console import progress_task, stdout
    from handseg.data.layout import resolve_data
    from handseg.ensemble.pseudo import make_pseudo, pseudo_origin
    from handseg.formats.files import atomic_dir, write_manifest

    source_data = resolve_data(data if data is not None else Path("data/test"), "test")
    say_data(source_data)
    data = source_data.root
    made_by = pseudo_origin(source)  # train --fold K --extra checks that no run that made them trained on fold K

    # built beside --out and moved into place complete: a crash leaves no half data set, and
    # --overwrite replaces the previous run as a whole
    with atomic_dir(out, overwrite, inputs=[source, data]) as tmp:
        with progress_task("pseudo") as tick:
            result = make_pseudo(source, data, tmp, min_confidence, progress=tick)
        write_manifest(tmp / "cache" / "masks", "pseudo", {"min_confidence": result.min_confidence},
                       inputs={"source": str(source), "data": str(data)}, format="packed-bbox-v1",
                       samples=result.cache_entries)
        write_manifest(tmp, "pseudo", {"min_confidence": result.min_confidence}, inputs={"source": str(source),
                       "data": str(data)}, kept=result.kept, dropped=result.dropped, made_by=made_by, complete=True)
    gate = f" (confidence gate {result.min_confidence})" if result.min_confidence else ""
    stdout.print(f"{len(result.kept)} images labelled, {len(result.dropped)} dropped{gate} -> {out}")
    for name, why in list(result.dropped.items())[:5]:
        stdout.print(f"  dropped {name}: {why}")
