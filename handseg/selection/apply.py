"""Applying a recipe: to maps in memory or on disk, and end to end for ``predict --recipe``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.analysis.metrics import dice_value
from handseg.common.constants import CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data.layout import Sample, discover
from handseg.ensemble.masks import (
    cut_value,
    hard_level,
    largest_component,
    place_crop,
    soft_level,
    union_box,
)
from handseg.formats import cropfile
from handseg.formats.probs import PROBS_MAGIC, pack_probs, probs_name, read_probs_index
from handseg.formats.recipe import HARD, SOFT, Recipe, config_folder, read_recipe
from handseg.formats.rle import (
    EMPTY_RUNS,
    Runs,
    crop_to_runs,
    intersection_area,
    runs_to_rle,
)
from handseg.formats.submission import write_predictions
from handseg.formats.tta import parse_transforms
from handseg.inference.cascade import held_out_context
from handseg.inference.run import PredictConfig, run_predictions
from handseg.models.checkpoint import checkpoint_sha256, resolve_checkpoint
from handseg.models.context import model_inputs
from handseg.selection.configs import TruthSource, read_oof_run
from handseg.selection.scoring import _leaderboard, _open_maps, ordered_map


@dataclass
class RecipeRun:
    images: int
    members: dict[str, Path]
    """Configuration name -> the folder of its probability maps."""
    dice: float | None = None
    per_class: dict[str, float] = field(default_factory=dict)


def _accumulating(progress):
    """A progress callback whose ``total=`` calls add up (one bar over several prediction passes)."""
    if progress is None:
        return None
    seen = [0]

    def tick(total: int | None = None) -> None:
        if total is None:
            progress()
        else:
            seen[0] += total
            progress(total=seen[0])

    return tick


def _folder_name(name: str) -> str:

    return config_folder(name)


def run_recipe(recipe_path: Path, data: Path, out_csv: Path, maps_dir: Path, device: str = "auto", amp: bool = True,
               batch: int = 4, progress: Callable[..., None] | None = None, oof: bool = False,
               samples: list[Sample] | None = None) -> RecipeRun:
    """``predict --recipe``: each configuration the recipe uses is predicted by :func:`run_predictions`
    (its folds averaged, with its TTA) into ``maps_dir/<configuration>/``, then
    :func:`~handseg.selection.apply.apply_recipe` makes the CSV (ensemble, class-wise picks, thresholds,
    keep-largest) one image at a time, from the same uint8 maps that ``select`` scored.

    With ``oof``, ``data`` is the labelled training folder and each image is predicted by each
    configuration's fold model that did not see it, as ``select`` scored them: the Dice reproduces
    the recipe's ``cv_dice``.

    Raises:
        HandsegError: the recipe or one of its run folders is missing or malformed.
    """

    recipe = read_recipe(recipe_path)
    members = recipe.members()
    progress = _accumulating(progress)
    pinned_checkpoints(recipe, recipe_path, members)  # every checkpoint found, and the one select scored, first
    if samples is None:
        samples = discover(data, labels="optional", role="train" if oof else "test")
    by_name = {s.name: s for s in samples}
    folders: dict[str, object] = {}
    for m in members:
        cfg = recipe.config(m)
        transforms = parse_transforms(cfg.tta_spec)
        dest = maps_dir / _folder_name(m)
        if not oof:
            run_predictions(cfg.checkpoints, data, maps_dir / f"{_folder_name(m)}.csv", dest,
                            PredictConfig(transforms, cfg.merge, device=device, amp=amp, batch=batch),
                            samples=samples, progress=progress)
            folders[m] = dest
            continue
        parts = []
        for fold, run in sorted(cfg.runs.items()):
            held_out = read_oof_run(run).images
            missing = [name for name in held_out if name not in by_name]
            if missing:
                raise HandsegError(f"fold {fold}'s image {missing[0]} is not in {data}", run)
            part = dest / f"fold{fold}"
            fold_images = [by_name[name] for name in held_out]
            run_predictions([run], data, maps_dir / f"{_folder_name(m)}_fold{fold}.csv", part,
                            PredictConfig(transforms, cfg.merge, device=device, amp=amp, batch=batch),
                            samples=fold_images, progress=progress, context_source=held_out_context([run], fold_images))
            parts.append(part)
        folders[m] = parts
    names = [s.name for s in samples]
    if oof:
        covered = set().union(*(set(read_oof_run(r).images) for r in recipe.config(members[0]).checkpoints))
        names = [n for n in names if n in covered]
    labelled = all(by_name[n].label_path is not None for n in names)
    truth = TruthSource(data) if labelled else None
    result = apply_recipe(recipe, folders, out_csv, images=names, truth=truth)
    run = RecipeRun(len(names), {m: maps_dir / _folder_name(m) for m in members})
    if result.dice is not None:
        run.dice = float(result.mean_dice)
        run.per_class = {c: float(v) for c, v in zip(CLASSES, result.dice.mean(axis=0))}
    return run


def recipe_inputs(path: str | Path) -> list[Path]:
    """What applying or exporting a recipe reads: the recipe, its runs and (for cascades) their stage-1
    runs; a command's outputs must stay out of all of them.

    Raises:
        HandsegError: the recipe is not valid or names a run that is missing.
    """

    recipe = read_recipe(path)
    return [Path(path), *model_inputs([run for c in recipe.configs for run in c.checkpoints])]


def pinned_checkpoints(recipe: Recipe, where: Path, names: Sequence[str] | None = None) -> dict[str, dict[int, Path]]:
    """The checkpoint of every run of the named configurations (default: all), each checked against the
    SHA-256 the recipe pins it by: what ``predict --recipe`` loads and ``export --recipe`` zips.

    A run without a pin is refused, not trusted: another file at its path would be used unnoticed.

    Raises:
        HandsegError: a run has no checkpoint, no pin, or a checkpoint other than the pinned one (naming
            ``where``, the recipe, or the checkpoint).
    """

    out: dict[str, dict[int, Path]] = {}
    for name in names if names is not None else [c.name for c in recipe.configs]:
        cfg = recipe.config(name)
        out[name] = {}
        for fold, run in sorted(cfg.runs.items()):
            path = resolve_checkpoint(run)
            want = cfg.sha256.get(fold)
            if want is None:
                raise HandsegError(f'configuration {name!r} has no "sha256" for fold {fold}: the checkpoint it '
                                   "loads is not pinned; run `handseg select` again", where)
            if checkpoint_sha256(path) != want:
                raise HandsegError("is not the checkpoint the recipe was chosen with (its SHA-256 changed); run "
                                   "`handseg select` again", path)
            out[name][fold] = path
    return out


# ----------------------------------------------------------------------------------------------
# applying a recipe


class PooledMaps:
    """One configuration's probability maps, from one folder (``predict --probs``) or several whose image
    sets do not overlap (e.g. each fold's ``RUN/oof/``)."""

    def __init__(self, folders: str | Path | Sequence[str | Path]):
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        self.where: dict[str, Path] = {}
        self.images: list[str] = []
        for folder in map(Path, folders):
            for image in read_probs_index(folder):
                if image in self.where:
                    raise HandsegError(f"{image} is in both {self.where[image]} and {folder}")
                self.where[image] = folder
                self.images.append(image)

    def path(self, image: str) -> Path:
        return self.where[image] / probs_name(image)


def recipe_image_runs(recipe: Recipe, maps: Mapping[str, object], shape: tuple[int, int]) -> list[Runs]:
    """One image's 29 masks, as runs, made as the recipe says.

    Args:
        recipe: the recipe.
        maps: configuration name -> its map of this image: anything with ``crop(c)`` returning
            ``(uint8 crop, row0, col0)`` or None (a :class:`~handseg.formats.probs.ProbMap`, or
            :class:`ArrayMap` of an in-memory array); needed for :meth:`Recipe.members`.
        shape: the image's ``(H, W)``.

    Returns:
        29 runs (:mod:`handseg.formats.rle`), in class order.
    """
    names = [c.name for c in recipe.configs]
    out = []
    for c, how in enumerate(recipe.classes):
        members = names if how.source in (SOFT, HARD) else [how.source]
        gots = [maps[m].crop(c) for m in members]
        box = union_box(gots)
        if box is None:
            out.append(EMPTY_RUNS)
            continue
        placed = [place_crop(g, box) for g in gots]
        if how.source == SOFT:
            weights = how.weights or recipe.soft_weights  # the class's own weights, chosen by select
            level, cut = soft_level(placed, weights), cut_value(SOFT, how.threshold, sum(weights))
        elif how.source == HARD:
            level, cut = hard_level(placed, recipe.member_threshold), cut_value(HARD, how.min_votes)
        else:
            level, cut = placed[0], cut_value("config", how.threshold)
        mask = level > cut
        if how.keep_largest:
            mask = largest_component(mask)
        out.append(crop_to_runs(mask, box[0], box[2], shape[1]))
    return out


class ArrayMap:
    """An in-memory ``(29, H, W)`` probability array (float in [0, 1], or uint8 from ``quantise_probs``) as a
    map for :func:`recipe_image_runs`, quantised and cropped exactly as ``predict --probs`` stores it."""

    def __init__(self, probs: np.ndarray):

        self.crops = cropfile.CropFile.parse(pack_probs(probs), PROBS_MAGIC)
        self.channels = self.crops.channels

    @property
    def shape(self) -> tuple[int, int]:
        return self.crops.shape

    def crop(self, c: int):
        got = self.crops.block(c, lambda width: width)
        return None if got is None else got[:3]


@dataclass
class RecipeResult:
    images: list[str]
    dice: np.ndarray | None = None
    """``(n, 29)`` float64 when ground truth was given."""

    @property
    def mean_dice(self) -> float | None:
        return None if self.dice is None else _leaderboard(self.dice)


def apply_recipe(recipe: Recipe, probs: Mapping[str, str | Path | Sequence[str | Path]],
                 out_csv: str | Path | None = None, images: Sequence[str] | None = None,
                 truth: TruthSource | None = None, progress: Callable[..., None] | None = None,
                 workers: int = 1) -> RecipeResult:
    """Make every image's masks as the recipe says and write the CSV (and/or score them), one image at a time.

    Args:
        recipe: from :func:`read_recipe`.
        probs: configuration name -> its probability folder(s) (``predict --probs``; several folders are
            pooled, e.g. each fold's ``RUN/oof/``); needed for :meth:`Recipe.members`.
        out_csv: the submission CSV to write (atomically), or None to only score.
        images: the images, in CSV order (default: the first member folder's ``index.json`` order).
        truth: score against this labelled folder (leaderboard Dice per image and class).
        workers: processes sharing the images (1: this process); the CSV is written in order all the same.

    Returns:
        :class:`RecipeResult` (``dice`` with ``truth``).

    Raises:
        HandsegError: a member has no maps, the members' image sets differ, a map is missing or has
            another size than the image.
    """

    members = recipe.members()
    missing = [m for m in members if m not in probs]
    if missing:
        raise HandsegError(f"no probability maps given for configuration {missing[0]}")
    pooled = {m: PooledMaps(probs[m]) for m in members}
    names = list(images) if images is not None else list(pooled[members[0]].images)
    for m in members:
        absent = [im for im in names if im not in pooled[m].where]
        if absent:
            raise HandsegError(f"configuration {m} has no probability map for {absent[0]}"
                               + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
        if images is None and len(pooled[m].where) != len(names):
            raise HandsegError(f"configuration {m}'s maps cover other images than {members[0]}'s")
    dice = np.empty((len(names), NUM_CLASSES)) if truth is not None else None
    jobs = [(image, [pooled[m].path(image) for m in members]) for image in names]

    def rows():
        results = ordered_map(_apply_image, (recipe, members, truth, out_csv is not None), jobs, workers)
        for i, (image, (rles, scores)) in enumerate(zip(names, results)):
            if dice is not None:
                dice[i] = scores
            if progress:
                progress()
            yield image, rles

    if out_csv is not None:
        write_predictions(out_csv, rows())
    else:
        for _ in rows():
            pass
    return RecipeResult(names, dice)


def _apply_image(ctx: tuple[Recipe, list[str], TruthSource | None, bool], job: tuple[str, list[Path]]):
    """One image: its 29 RLE strings (when ``ctx`` asks for them) and, with ground truth, its ``(29,)`` Dice."""
    recipe, members, truth, want_rles = ctx
    image, paths = job
    shape, t_runs = truth.runs(image) if truth is not None else (None, None)
    maps = _open_maps(paths, shape, image)
    runs = recipe_image_runs(recipe, dict(zip(members, maps)), maps[0].shape)
    scores = None
    if t_runs is not None:
        scores = np.array([dice_value(intersection_area(yt, yp), int(yt[1].sum()), int(yp[1].sum()))
                           for yt, yp in zip(t_runs, runs)])
    return ([runs_to_rle(r) for r in runs] if want_rles else None), scores
