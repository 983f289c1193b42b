"""Scoring every option (source, cut, keep-largest) of every class on the pooled out-of-fold maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.analysis.metrics import dice_value
from handseg.common.constants import DEFAULT_THRESHOLD, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.ensemble.masks import GRID, cut_value, hard_level, label_components, place_crop, soft_level, union_box
from handseg.formats.cropfile import bbox
from handseg.formats.probs import ProbMap
from handseg.formats.recipe import HARD, SOFT
from handseg.selection.configs import Configuration, TruthSource

# ----------------------------------------------------------------------------------------------
# the option space


@dataclass(frozen=True)
class Option:
    """One way to make a class's mask: a source, one of its cuts, keep-largest or not."""

    source: int
    cut: int
    keep_largest: bool


@dataclass
class OptionSpace:
    """Sources (each configuration, then the soft and the hard vote when there are two or more
    configurations), their cuts (thresholds; min votes for the hard vote), and the options in order of
    preference: among equal Dice the earlier wins (no keep-largest, the earlier source, the default cut)."""

    names: list[str]
    kinds: list[str]
    cuts: list[list[float]]
    default_cut: list[int]
    options: list[Option]
    index: dict[tuple[int, int, bool], int]
    weights: list[float]
    """The soft vote's weights (one per configuration)."""
    source_weights: list = field(default_factory=list)
    """Per source: the weights of a soft vote (the plain soft vote's ``weights``, or a per-class weighting's
    integers, see :func:`weight_vectors`); None for a configuration or the hard vote."""
    cut_array: list[np.ndarray] = field(init=False)
    """Per source: the values a level must exceed, one per cut, ascending (nested, shrinking masks)."""
    plain_index: list[np.ndarray] = field(init=False)
    lcc_index: list[np.ndarray] = field(init=False)
    """Per source and cut: where its option without (``plain_index``) and with keep-largest lies."""

    @classmethod
    def build(cls, config_names: Sequence[str], grid: Sequence[float] = GRID, weighted: bool = True) -> OptionSpace:
        """The space of these configurations; ``weighted``: with the soft votes of :func:`weight_vectors`
        as further sources (for per-class weights)."""
        grid = sorted({round(float(t), 6) for t in grid} | {DEFAULT_THRESHOLD})
        if grid[0] < 0 or grid[-1] >= 1:
            raise HandsegError(f"thresholds must lie in [0, 1), got {grid[0]}..{grid[-1]}")
        m = len(config_names)
        names, kinds = list(config_names), ["config"] * m
        source_weights: list = [None] * m
        if m >= 2:
            names += [SOFT, HARD]
            kinds += [SOFT, HARD]
            source_weights += [[1.0] * m, None]
            for w in weight_vectors(m) if weighted else []:
                names.append(f"soft {':'.join(str(v) for v in w)}")
                kinds.append(SOFT)
                source_weights.append([float(v) for v in w])
        cuts, default = [], []
        for kind in kinds:
            if kind == HARD:
                cuts.append([float(k) for k in range(1, m + 1)])
                default.append(m // 2)  # min votes m // 2 + 1: the majority
            else:
                cuts.append([float(t) for t in grid])
                default.append(grid.index(DEFAULT_THRESHOLD))
        options = []
        for lcc in (False, True):
            for s in range(len(names)):
                order = [default[s]] + [j for j in range(len(cuts[s])) if j != default[s]]
                options += [Option(s, j, lcc) for j in order]
        index = {(o.source, o.cut, o.keep_largest): i for i, o in enumerate(options)}
        return cls(names, kinds, cuts, default, options, index, [1.0] * m, source_weights)

    def __post_init__(self) -> None:
        if not self.source_weights:
            self.source_weights = [list(self.weights) if k == SOFT else None for k in self.kinds]
        self.cut_array = [self.cut_values(s) for s in range(len(self.names))]
        self.plain_index = [np.array([self.index[(s, j, False)] for j in range(len(c))])
                            for s, c in enumerate(self.cuts)]
        self.lcc_index = [np.array([self.index[(s, j, True)] for j in range(len(c))])
                          for s, c in enumerate(self.cuts)]

    @property
    def n_configs(self) -> int:
        return self.kinds.count("config")

    @property
    def weighted_sources(self) -> list[int]:
        """The soft votes with per-class weights (beyond the plain soft vote)."""
        return [s for s in range(self.n_configs + 2, len(self.names)) if self.kinds[s] == SOFT]

    def cut_values(self, s: int) -> np.ndarray:
        w = self.source_weights[s]
        return np.array([cut_value(self.kinds[s], v, sum(w) if w else 1.0) for v in self.cuts[s]])

    def allowed(self, sources: Sequence[int], thresholds: bool, keep_largest: bool) -> np.ndarray:
        """``(options,)`` bool: the options of these sources (any cut or the default; keep-largest or not)."""
        return np.array([o.source in sources and (thresholds or o.cut == self.default_cut[o.source])
                         and (keep_largest or not o.keep_largest) for o in self.options])

    def class_recipe(self, o: int) -> dict:
        opt = self.options[o]
        value = self.cuts[opt.source][opt.cut]
        entry: dict = {"source": self.names[opt.source]}
        if opt.source in self.weighted_sources:
            entry = {"source": SOFT, "weights": list(self.source_weights[opt.source])}
        if self.kinds[opt.source] == HARD:
            entry["min_votes"] = int(value)
        else:
            entry["threshold"] = float(value)
        entry["keep_largest"] = bool(opt.keep_largest)
        return entry


WEIGHT_STEPS = 4
"""Per-class soft-vote weights: each configuration's weight is one of 0, 1/4, .., 1 (0..4 as integers)."""
MAX_WEIGHTINGS = 16
"""More weightings than this (three or more configurations at quarter steps) fall back to half steps, then
to none (the search's cost grows with every weighting)."""


def weight_vectors(m: int) -> list[tuple[int, ...]]:
    """The soft-vote weightings searched per class for ``m`` configurations: integer weights
    (``0..WEIGHT_STEPS``, i.e. 0..1 in steps of 1/4), normalised (one vector per ratio: divided by their
    greatest common divisor), at least two members non-zero (one alone is that configuration), and not
    all equal (the plain soft vote). Integers keep every weighted level exact (see
    :func:`~handseg.ensemble.masks.soft_level`). Falls back to coarser steps beyond :data:`MAX_WEIGHTINGS`."""
    import itertools
    import math

    for steps in (WEIGHT_STEPS, 2):
        found = [w for w in itertools.product(range(steps + 1), repeat=m)
                 if sum(v > 0 for v in w) >= 2 and math.gcd(*w) == 1 and len(set(w)) > 1]
        if len(found) <= MAX_WEIGHTINGS:
            return found
    return []


# ----------------------------------------------------------------------------------------------
# scoring every option in one pass


@dataclass
class OptionScores:
    """Dice of every option for every image and class."""

    images: list[str]
    folds: np.ndarray
    """``(n,)`` int: the fold whose model did not see the image (from the first configuration)."""
    dice: np.ndarray
    """``(n, 29, options)`` float64."""
    space: OptionSpace


def _cut_stats(level: np.ndarray, inside: np.ndarray, max_level: int, cuts: np.ndarray):
    """Intersection with the truth and predicted area at each cut, from one histogram of the levels."""
    comb = level.astype(np.int64, copy=False) * 2 + inside.view(np.uint8)
    hist = np.bincount(comb.ravel(), minlength=2 * (max_level + 1))
    h_in = hist[1::2]
    h_all = hist[0::2] + h_in
    # suffix sums: pixels at level >= v, for v = 0 .. max_level + 1
    s_in = np.concatenate([np.cumsum(h_in[::-1])[::-1], [0]])
    s_all = np.concatenate([np.cumsum(h_all[::-1])[::-1], [0]])
    first = np.clip(np.floor(cuts).astype(np.int64) + 1, 0, max_level + 1)  # integer level > cut <=> >= floor + 1
    return s_in[first], s_all[first]


def _score_class(placed: list[np.ndarray], inside: np.ndarray, t_area: int, space: OptionSpace,
                 out: np.ndarray) -> None:
    """Fill ``out`` (``(options,)``) with the Dice of every option for one image and class."""
    for s, kind in enumerate(space.kinds):
        if kind == SOFT:
            w = space.source_weights[s]
            level, top = soft_level(placed, w), 255 * int(sum(w))
        elif kind == HARD:
            level, top = hard_level(placed), space.n_configs
        else:
            level, top = placed[s], 255
        cuts = space.cut_array[s]  # ascending: nested, shrinking masks
        inter, area = _cut_stats(level, inside, top, cuts)
        out[space.plain_index[s]] = dice_value(inter, t_area, area)
        lcc_inter, lcc_area = inter.copy(), area.copy()
        if area[0] > 0:
            box = _bbox(level > cuts[0])  # every mask of a higher cut lies inside this one
            sub, sub_inside = level[box], inside[box]
            prev_area = -1
            for j in range(len(cuts)):
                if area[j] == 0:
                    break  # and so are all higher cuts
                if area[j] != prev_area:  # nested masks of equal area are the same mask
                    labels, _, keep, areas = label_components(sub > cuts[j])
                    if labels is None:
                        kept = (inter[j], area[j])
                    else:
                        kept = (np.count_nonzero(labels[sub_inside] == keep), areas[keep])
                    prev_area = area[j]
                lcc_inter[j], lcc_area[j] = kept
        out[space.lcc_index[s]] = dice_value(lcc_inter, t_area, lcc_area)


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:

    r0, r1, c0, c1 = bbox(mask)
    return slice(r0, r1), slice(c0, c1)


def score_options(configs: Sequence[Configuration], truth: TruthSource, images: Sequence[str] | None = None,
                  grid: Sequence[float] = GRID, progress: Callable[..., None] | None = None,
                  workers: int = 1) -> OptionScores:
    """The Dice of every option for every image and class, in one pass (one image, one class crop at a time).

    Args:
        configs: the configurations (their OOF maps cover ``images``).
        truth: the labelled folder.
        images: the images to score (default: all of ``truth``), in this order.
        grid: candidate thresholds (0.5 is always added).
        workers: processes sharing the images (1: this process).

    Returns:
        :class:`OptionScores` with ``dice`` ``(n, 29, options)``.

    Raises:
        HandsegError: a map is not a 29-class probability map, or its size differs from the image's.
    """
    images = list(truth.images if images is None else images)
    space = OptionSpace.build([c.name for c in configs], grid)
    dice = np.empty((len(images), NUM_CLASSES, len(space.options)))
    folds = np.array([configs[0].where[im].fold for im in images], dtype=np.int64)
    jobs = [(image, [c.map_path(image) for c in configs]) for image in images]
    for i, row in enumerate(ordered_map(_score_image, (truth, space), jobs, workers)):
        dice[i] = row
        if progress:
            progress()
    return OptionScores(images, folds, dice, space)


def _score_image(ctx: tuple[TruthSource, OptionSpace], job: tuple[str, list[Path]]) -> np.ndarray:
    """``(29, options)`` Dice of one image."""
    truth, space = ctx
    image, paths = job
    shape, t_crops = truth.crops(image)
    maps = _open_maps(paths, shape, image)
    out = np.empty((NUM_CLASSES, len(space.options)))
    for c in range(NUM_CLASSES):
        gots = [mp.crop(c) for mp in maps]
        t = t_crops[c]
        t_area = int(np.count_nonzero(t[0])) if t is not None else 0
        box = union_box(gots)
        if box is None:  # no configuration predicts anything: every option is the empty mask
            out[c] = dice_value(0, t_area, 0)
            continue
        _score_class([place_crop(g, box) for g in gots], _window(box, t), t_area, space, out[c])
    return out


_WORKER: tuple | None = None


def _init_worker(fn: Callable, ctx: object) -> None:
    global _WORKER
    _WORKER = (fn, ctx)
    _die_with_parent()


def _die_with_parent(every: float = 0.2) -> None:
    """A worker ends when its parent is gone (``kill -9`` of select gives the pool no chance to stop it):
    a daemon thread watches the parent's pid and exits the process when it changes."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="handseg-orphan-watch", daemon=True).start()


def _run_chunk(jobs: Sequence) -> list:
    fn, ctx = _WORKER
    return [fn(ctx, job) for job in jobs]


def ordered_map(fn: Callable, ctx: object, jobs: Sequence, workers: int = 1):
    """``fn(ctx, job)`` for each job, results in job order; ``workers > 1``: in that many processes (``ctx`` is
    sent to each once), with a few chunks of jobs in flight at a time, so results never pile up in memory
    when the consumer is slower than the workers. An error in a job stops the rest."""
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            yield fn(ctx, job)
        return
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    workers = min(workers, len(jobs))
    size = max(1, min(8, len(jobs) // (4 * workers)))
    chunks = iter([jobs[k : k + size] for k in range(0, len(jobs), size)])
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(fn, ctx))
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_run_chunk, chunk))
            if len(pending) >= 2 * workers:
                break
        while pending:
            results = pending.popleft().result()
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append(pool.submit(_run_chunk, chunk))
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _window(box: tuple[int, int, int, int], t) -> np.ndarray:
    """The truth crop ``t`` (``(bool crop, row0, col0)`` or None) on the box's grid: ``(h, w)`` bool
    (truth outside the box is dropped: no prediction reaches it)."""
    r0, r1, c0, c1 = box
    out = np.zeros((r1 - r0, c1 - c0), dtype=np.bool_)
    if t is None:
        return out
    crop, tr, tc = t
    a0, a1 = max(r0, tr), min(r1, tr + crop.shape[0])
    b0, b1 = max(c0, tc), min(c1, tc + crop.shape[1])
    if a0 < a1 and b0 < b1:
        out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = crop[a0 - tr : a1 - tr, b0 - tc : b1 - tc]
    return out


def _open_maps(paths: Sequence[Path], shape: tuple[int, int] | None, image: str) -> list[ProbMap]:
    maps = [ProbMap(p) for p in paths]
    for mp in maps:
        if mp.channels != NUM_CLASSES:
            raise HandsegError(f"has {mp.channels} classes, expected {NUM_CLASSES}", mp.path)
        want = shape if shape is not None else maps[0].shape
        if tuple(mp.shape) != tuple(want):
            raise HandsegError(f"{image}: map size {mp.shape} differs from the image's {want}", mp.path)
    return maps


def _leaderboard(values: np.ndarray) -> float:
    """``(images, 29)`` Dice -> mean over images, then over classes (as
    :class:`~handseg.analysis.metrics.DiceReport`)."""
    return float(values.mean(axis=0).mean())
