"""Out-of-fold maps: the ``RUN/oof/`` folder name and its manifest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from handseg.formats.files import write_manifest

OOF_DIR = "oof"


# ----------------------------------------------------------------------------------------------
# out-of-fold runs and configurations


@dataclass
class OofRun:
    """One fold's out-of-fold maps: ``RUN/oof/`` and what its manifest says."""

    run: Path
    folder: Path
    fold: int
    card: dict
    transforms: list[str]
    merge: str
    data: Path | None
    images: list[str]


def write_oof_manifest(folder: str | Path, fold: int, card: dict, data: str | Path,
                       transforms: Sequence[str] = ("identity",), merge: str = "mean", n_folds: int | None = None,
                       splits: str | Path | None = None, checkpoint: str | Path | None = None,
                       stage: str = "oof") -> Path:
    """Write ``RUN/oof/manifest.json`` as :func:`read_oof_run` reads it (last, after the maps and index).

    Args:
        folder: ``RUN/oof``.
        fold: the fold whose validation images the maps are.
        card: the run's model card (``dataclasses.asdict(ModelCard)``).
        data: the labelled training folder (written absolute).
        transforms, merge: the TTA the maps were made with (transform names, e.g. ``["identity", "hflip"]``).
        n_folds, splits, checkpoint: recorded for people (the number of folds, splits.json, the weights used).
    """

    options = {"transforms": list(transforms), "merge": merge, "checkpoint": str(checkpoint) if checkpoint else None}
    inputs = {"data": str(Path(data).resolve()), "splits": str(Path(splits).resolve()) if splits else None}
    return write_manifest(folder, stage, options, inputs, fold=int(fold), n_folds=n_folds, card=dict(card),
                          data=inputs["data"], transforms=list(transforms), merge=merge)
