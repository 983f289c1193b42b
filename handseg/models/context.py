"""A cascade's stage-1 models as its card names them: checks, references, pins, and what a model reads."""

from __future__ import annotations

import os
from pathlib import Path

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.models.checkpoint import checkpoint_sha256, read_card, resolve_checkpoint

CONTEXT_CHANNELS = NUM_CLASSES
"""Stage 1's maps: one input channel per class."""


def stage1_checkpoints(runs: list[Path]) -> list[Path]:
    """The checkpoints of the stage-1 runs (their best), checked to be resize models that can give
    whole-image context.

    Raises:
        HandsegError: a run is missing or not a stage-1 model (a crop model or a cascade itself).
    """

    if not runs:
        raise HandsegError("--context needs at least one stage-1 run")
    out = []
    for run in runs:
        path = resolve_checkpoint(run)
        card = read_card(path)
        if card.crop or card.context:
            kind = "a sliding-window model (--crop)" if card.crop else "a cascade model itself"
            raise HandsegError(f"stage 1 must see whole images (trained with --size); this run is {kind}", run)
        out.append(path)
    return out


def context_refs(checkpoints: list[Path], run_dir: Path) -> list[str]:
    """How a stage-2 card names its stage-1 checkpoints: relative to the stage-2 run folder when they
    share a root (the pair moves together), else absolute."""
    refs = []
    for p in checkpoints:
        p = Path(p).resolve()
        try:
            refs.append(os.path.relpath(p, Path(run_dir).resolve()))
        except ValueError:  # another drive
            refs.append(str(p))
    return refs


def resolve_context(refs: list[str], checkpoint: Path, sha256: list[str] | None = None) -> list[Path]:
    """The stage-1 checkpoints a stage-2 card names, found relative to the stage-2 checkpoint's folder
    (and checked against the SHA-256 the card pins them by).

    Raises:
        HandsegError: one line naming a stage-1 checkpoint that is missing or another file.
    """

    out = []
    for i, ref in enumerate(refs):
        p = Path(ref)
        p = p if p.is_absolute() else (Path(checkpoint).parent / p)
        if not p.is_file():
            raise HandsegError(f"its model card names the stage-1 checkpoint {ref}, which is missing (looked for "
                               f"{p}); keep the stage-1 runs beside the stage-2 run, or `handseg export` both",
                               checkpoint)
        if sha256 and i < len(sha256) and checkpoint_sha256(p) != sha256[i]:
            raise HandsegError(f"the stage-1 checkpoint {ref} is not the one this cascade was trained with (its "
                               "SHA-256 changed)", checkpoint)
        out.append(p)
    return out


def model_inputs(models: list[str | Path]) -> list[Path]:
    """Every file and folder that predicting with ``models`` reads: each run folder (a checkpoint file's
    own folder too) and, for a cascade, its stage-1 checkpoints and their folders. What a command's
    outputs must stay out of (:func:`handseg.formats.files.check_not_input`).

    Raises:
        HandsegError: a model is missing (as :func:`~handseg.models.checkpoint.resolve_checkpoint` says).
    """

    out: list[Path] = []
    for model in models:
        path = resolve_checkpoint(model)
        out += [Path(model), path, path.parent]
        card = read_card(path)
        if card.context:
            for stage1 in resolve_context(card.context, path):
                out += [stage1, stage1.parent]
    return out
