"""Choosing a recipe on out-of-fold (OOF) predictions, and applying it (``handseg select``, ``predict --recipe``).

Every training image is predicted by the fold model that did not see it (``RUN/oof/``, written by
``train --fold K``), so the pooled OOF maps of a configuration are an honest sample of what it does on new
images. On them this module scores, with the leaderboard Dice (per image and class, mean over images,
then over classes):

- each **configuration** alone (threshold 0.5), the **soft vote** (mean of the maps) and the **hard
  vote** (pixels that at least ``min_votes`` members' 0.5-masks hold) over configurations;
- **class-wise** picks (the best configuration, or the best of configurations and votes, per class);
- per-class **thresholds** (a grid, default 0.20..0.80 step 0.05; for the hard vote: the number of votes);
- **keep-largest** (only the largest 8-connected component, :mod:`handseg.ensemble.masks`) per class;

and every combination of these as one ranked list of candidates. Anything chosen on the OOF data is
optimistic there, so each candidate also gets a **nested estimate**: its choices made on the other folds,
scored on the held-out fold. The recipe is the candidate with the best OOF Dice (so never worse there than
any candidate; ``choose="nested"``: the best nested estimate instead); its ``cv_dice`` is measured by
:func:`apply_recipe`, the same function ``predict --recipe`` writes the submission with.

One pass over the data, one image at a time: for each class, each configuration's crop is read (memory-mapped),
and the uint8 maps make every threshold exact and cheap: one histogram of the 256 levels (the soft vote's
sum: ``255 * M + 1`` levels) inside and outside the truth gives the intersection and the predicted area at
every threshold at once. Connected components are labelled only for keep-largest, once per distinct mask
(nested thresholds that leave a mask unchanged reuse it). What is kept is one Dice per image, class and
option: ``(images, 29, options)`` float64, about 15 MB for 800 images and two configurations.

Semantics shared by selection and application, so that both count the same pixels: a configuration's
pixel is foreground when ``q > 255 t`` (``q`` the stored uint8 level, i.e. ``q / 255 > t``); the soft vote's
when ``sum_m w_m q_m > 255 t sum_m w_m``; the hard vote's when at least ``min_votes`` members have
``q > 255 * 0.5``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.ensemble.masks import GRID
from handseg.formats.files import atomic_write_json, manifest, sidecar_manifest_path
from handseg.formats.recipe import HARD, MEMBER_THRESHOLD, RECIPE_FORMAT, RECIPE_VERSION, SOFT, recipe_from_json
from handseg.models.checkpoint import checkpoint_sha256, resolve_checkpoint
from handseg.selection.apply import apply_recipe
from handseg.selection.configs import (
    Configuration,
    TruthSource,
    check_coverage,
    group_configurations,
    oof_training_data,
    read_oof_run,
)
from handseg.selection.scoring import OptionScores, OptionSpace, _leaderboard, score_options

# ----------------------------------------------------------------------------------------------
# candidates


@dataclass
class Candidate:
    """A way of choosing per class among a set of options, scored on the OOF data."""

    name: str
    allowed: np.ndarray
    """``(options,)`` bool."""
    choice: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, dtype=np.int64))
    """``(29,)`` the option chosen per class on all OOF images."""
    cv_dice: float = float("nan")
    """The leaderboard Dice of ``choice`` on the pooled OOF images (the choice was made on them too)."""
    nested_cv_dice: float | None = None
    """The choices made on the other folds, each fold scored with the choices it did not take part in."""
    fold_dice: dict[int, float] = field(default_factory=dict)
    """Leaderboard Dice of ``choice`` on each fold's images."""
    gain: float = 0.0
    """``cv_dice`` minus the best configuration alone."""

    def to_json(self) -> dict:
        return {"name": self.name, "cv_dice": self.cv_dice, "nested_cv_dice": self.nested_cv_dice,
                "fold_dice": {str(k): v for k, v in self.fold_dice.items()}, "gain": self.gain}


def candidate_sets(space: OptionSpace) -> list[tuple[str, np.ndarray]]:
    """The candidates, simplest first: each base (each configuration, the soft and the hard vote, the best
    configuration per class, the soft vote with its weights chosen per class, the best of everything per
    class) alone, then with thresholds, with keep-largest, with both."""
    m = space.n_configs
    bases = [(space.names[k], [k]) for k in range(m)]
    if m >= 2:
        soft, hard = space.kinds.index(SOFT), space.kinds.index(HARD)
        bases += [("soft vote", [soft]), ("hard vote", [hard]), ("class-wise best configuration", list(range(m)))]
        if space.weighted_sources:  # the weights of the soft vote chosen per class, as the 2025 winner did
            bases.append(("soft vote, per-class weights", [soft, *space.weighted_sources]))
        bases.append(("class-wise best of all", list(range(len(space.names)))))
    out = []
    for thresholds, lcc in ((False, False), (True, False), (False, True), (True, True)):
        for name, sources in bases:
            label = name
            if thresholds:
                label += " + min-votes" if name == "hard vote" else " + thresholds"
            if lcc:
                label += " + keep-largest"
            out.append((label, space.allowed(sources, thresholds, lcc)))
    return out


def evaluate_candidates(scores: OptionScores) -> list[Candidate]:
    """Score every candidate of :func:`candidate_sets`: in-sample OOF Dice, nested estimate, per-fold Dice.

    A candidate chooses per class the option with the best mean Dice over the images it is tuned on
    (ties: the option first in :class:`OptionSpace`'s order of preference).
    """
    d = scores.dice
    n = d.shape[0]
    classes = np.arange(NUM_CLASSES)
    folds = sorted(set(scores.folds.tolist()))
    rows = {f: np.flatnonzero(scores.folds == f) for f in folds}
    total = d.sum(axis=0)
    fold_d = {f: d[r] for f, r in rows.items()}
    fold_sums = {f: fd.sum(axis=0) for f, fd in fold_d.items()}
    out = []
    for name, allowed in candidate_sets(scores.space):
        cand = Candidate(name, allowed)
        cand.choice = np.where(allowed, total / n, -np.inf).argmax(axis=1)
        chosen = d[:, classes, cand.choice]
        cand.cv_dice = _leaderboard(chosen)
        cand.fold_dice = {f: _leaderboard(chosen[r]) for f, r in rows.items()}
        if len(folds) >= 2:
            held = np.empty_like(chosen)
            for f, r in rows.items():
                rest = (total - fold_sums[f]) / (n - r.size)
                pick = np.where(allowed, rest, -np.inf).argmax(axis=1)
                held[r] = fold_d[f][:, classes, pick]
            cand.nested_cv_dice = _leaderboard(held)
        out.append(cand)
    best_single = max(c.cv_dice for c in out[: scores.space.n_configs])
    for c in out:
        c.gain = c.cv_dice - best_single
    return out


# ----------------------------------------------------------------------------------------------
# select


@dataclass
class Selection:
    """What ``handseg select`` found: the configurations, every candidate, the chosen recipe."""

    configs: list[Configuration]
    data: Path
    scores: OptionScores
    candidates: list[Candidate]
    chosen: Candidate
    recipe: dict
    out: Path

    @property
    def ranked(self) -> list[Candidate]:
        """Candidates by OOF Dice, best first (ties: the simpler first)."""
        order = sorted(range(len(self.candidates)), key=lambda k: (-self.candidates[k].cv_dice, k))
        return [self.candidates[k] for k in order]


def build_recipe(configs: Sequence[Configuration], scores: OptionScores, chosen: Candidate,
                 candidates: Sequence[Candidate], out: Path, data: Path, choose: str = "oof") -> dict:
    """The recipe document for the chosen candidate (``cv_dice`` still that of the histogram pass; the
    caller replaces it by :func:`apply_recipe`'s). Each run's checkpoint is pinned by its SHA-256."""
    base = out.resolve().parent
    space = scores.space
    classes = {name: space.class_recipe(int(o)) for name, o in zip(CLASSES, chosen.choice)}
    return {
        "format": RECIPE_FORMAT,
        # a recipe with per-class weights is version 2: an older handseg refuses it rather than ignore them
        "version": 2 if any("weights" in e for e in classes.values()) else RECIPE_VERSION,
        "cv_dice": chosen.cv_dice,
        "nested_cv_dice": chosen.nested_cv_dice,
        "chosen": chosen.name,
        "chosen_by": choose,
        "best_single": max(candidates[: space.n_configs], key=lambda c: c.cv_dice).to_json(),
        "candidates": [c.to_json() for c in sorted(candidates, key=lambda c: -c.cv_dice)],
        "paths": "run folders are relative to this file's folder",
        "configurations": [
            {"name": c.name, "runs": {str(f): os.path.relpath(r.run.resolve(), base) for f, r in c.runs.items()},
             "sha256": {str(f): h for f, r in c.runs.items() if (h := _pin(r.run)) is not None},
             "tta": c.tta(), "card": c.card}
            for c in configs
        ],
        "ensemble": {
            "kind": _ensemble_kind(space, chosen.choice),
            "soft": {"members": [c.name for c in configs], "weights": list(space.weights)},
            "hard": {"members": [c.name for c in configs], "member_threshold": MEMBER_THRESHOLD},
        },
        "classes": classes,
        "data": str(data.resolve()),
        "images": len(scores.images),
        "folds": sorted(set(scores.folds.tolist())),
        "grid": [float(v) for v in space.cuts[0]],
    }


def _pin(run: Path) -> str | None:
    """The SHA-256 of the checkpoint ``predict`` will take from a run (None: the run holds out-of-fold
    maps but no checkpoint, and predict will say so)."""

    try:
        return checkpoint_sha256(resolve_checkpoint(run))
    except HandsegError:
        return None


def _ensemble_kind(space: OptionSpace, choice: np.ndarray) -> str:
    kinds = {space.kinds[space.options[int(o)].source] for o in choice}
    sources = {space.options[int(o)].source for o in choice}
    if len(sources) > 1:
        return "classwise"
    return {"config": "single", SOFT: "soft", HARD: "hard"}[kinds.pop()]


CHOOSE = ("oof", "nested")


def select_recipe(runs: Sequence[str | Path], out: str | Path, data: str | Path | None = None,
                  grid: Sequence[float] = GRID, progress: Callable[..., None] | None = None,
                  workers: int = 1, choose: str = "oof") -> Selection:
    """``handseg select``: read the runs' OOF maps, score every candidate, write the best as ``out``.

    ``choose``: ``oof`` takes the candidate with the best OOF Dice (never worse there than any
    candidate); ``nested`` the one with the best nested estimate (choices made on other folds), which
    guards against choices that only fit the OOF data's noise (with fewer than two folds: as ``oof``).

    Writes ``out`` (the recipe) and ``out``'s sidecar manifest (stage ``select``), atomically, the manifest
    last; nothing when anything fails.

    Raises:
        HandsegError: a run without ``oof/``, overlapping folds, incomplete coverage, a missing or bad map.
    """
    out = Path(out)
    if choose not in CHOOSE:
        raise HandsegError(f"unknown --choose {choose!r}; valid: {', '.join(CHOOSE)}")
    oof = [read_oof_run(r) for r in runs]
    if not oof:
        raise HandsegError("give the run folders to select from")
    configs = group_configurations(oof)
    data = oof_training_data(oof, data)
    truth = TruthSource(data)
    check_coverage(configs, truth.images, data)
    if progress:
        progress(total=2 * len(truth.images))  # the search, then the chosen recipe's check
    scores = score_options(configs, truth, grid=grid, progress=progress, workers=workers)
    candidates = evaluate_candidates(scores)
    if choose == "nested" and candidates[0].nested_cv_dice is not None:
        chosen = max(candidates, key=lambda c: c.nested_cv_dice)  # the first of equals: the simplest
    else:
        chosen = max(candidates, key=lambda c: c.cv_dice)
    doc = build_recipe(configs, scores, chosen, candidates, out, data, choose)

    # the reported Dice is what applying the recipe gives, through the very code predict --recipe runs
    recipe = recipe_from_json(doc, out.resolve().parent, out)
    oof_folders = {c.name: [r.folder for r in c.runs.values()] for c in configs}
    applied = apply_recipe(recipe, oof_folders, None, truth.images, truth, progress, workers)
    if abs(applied.mean_dice - chosen.cv_dice) > 1e-9:
        raise RuntimeError(f"internal error: the recipe scores {applied.mean_dice} when applied but "
                           f"{chosen.cv_dice} in the search")
    doc["cv_dice"] = applied.mean_dice
    doc["uses"] = recipe.members()
    atomic_write_json(out, doc)
    options = {"data": str(data), "grid": doc["grid"], "workers": workers, "choose": choose}
    inputs = {"runs": [str(r) for r in runs]}
    atomic_write_json(sidecar_manifest_path(out), manifest("select", options, inputs, output=str(out),
                                                           cv_dice=doc["cv_dice"], chosen=chosen.name))
    return Selection(configs, data, scores, candidates, chosen, doc, out)
