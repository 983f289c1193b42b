"""Choosing a recipe on out-of-fold (OOF) predictions, and applying it (``handseg select``, ``predict --recipe``).

Every training image is predicted by the fold model that did not see it (``RUN/oof/``, written by
``train --fold K``), so the pooled OOF maps of a configuration are an honest sample of what it does on new
images. On them this module scores, with the leaderboard Dice (per image and class, mean over images,
then over classes):

- each **configuration** alone (threshold 0.5), the **soft vote** (mean of the maps) and the **hard
  vote** (pixels that at least ``min_votes`` members' 0.5-masks hold) over configurations;
- **class-wise** picks (the best configuration, or the best of configurations and votes, per class);
- per-class **thresholds** (a grid, default 0.20..0.80 step 0.05; for the hard vote: the number of votes);
- **keep-largest** (only the largest 8-connected component, :mod:`handseg.core.postprocess`) per class;

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

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.core.constants import CLASSES, DEFAULT_THRESHOLD, NUM_CLASSES
from handseg.core.ensemble import ProbMap, probs_name, read_probs_index
from handseg.core.errors import HandsegError
from handseg.core.files import MANIFEST_NAME, atomic_write_json, manifest, read_json, sidecar_manifest_path
from handseg.core.metrics import dice_value
from handseg.core.postprocess import label_components
from handseg.core.rle import EMPTY_RUNS, Runs, crop_to_runs, intersection_area, runs_to_rle

GRID: tuple[float, ...] = tuple(float(v) for v in np.round(np.arange(0.20, 0.801, 0.05), 2))
"""The per-class threshold grid (0.20..0.80 step 0.05)."""

SOFT, HARD = "soft", "hard"
OOF_DIR = "oof"
RECIPE_FORMAT = "handseg-recipe"
RECIPE_VERSION = 1
MEMBER_THRESHOLD = DEFAULT_THRESHOLD
"""The threshold each member's map is cut at before a hard vote."""

# card fields that differ between the folds of one configuration (or that select overrides)
_PER_FOLD_CARD_FIELDS = ("epoch", "step", "score", "handseg_version", "thresholds")


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


@dataclass
class Configuration:
    """Runs that share a model card (but for the fold) and TTA: one configuration, its folds pooled."""

    name: str
    card: dict
    transforms: list[str]
    merge: str
    runs: dict[int, OofRun] = field(default_factory=dict)
    where: dict[str, OofRun] = field(default_factory=dict)
    """Image name -> the run whose OOF maps hold it."""

    def map_path(self, image: str) -> Path:
        return self.where[image].folder / probs_name(image)

    def tta(self) -> dict:
        return {"transforms": list(self.transforms), "merge": self.merge}


def tta_option(transforms: Sequence[str]) -> str:
    """Transform names as manifests record them (``["identity", "hflip", "scale0.8", "scale1.2"]``) -> the
    ``--transforms`` value that makes them again (``"hflip,scale:0.8,1.2"``; ``""``: the identity alone)."""
    flips = [t for t in transforms if t in ("hflip", "vflip")]
    scales = [t[len("scale"):] for t in transforms if t.startswith("scale")]
    unknown = [t for t in transforms if t not in ("identity", "hflip", "vflip") and not t.startswith("scale")]
    if unknown:
        raise HandsegError(f"unknown TTA transform {unknown[0]!r} in the recipe")
    return ",".join(flips + ([f"scale:{','.join(scales)}"] if scales else []))


def read_oof_run(run: str | Path) -> OofRun:
    """Read ``RUN/oof/manifest.json`` and ``RUN/oof/index.json`` (every listed map must exist).

    The manifest must give ``fold`` and ``card`` (the model card; without it, the card is read from the
    run's checkpoint header); ``transforms``/``merge`` (the TTA the maps were made with) and ``data`` (the
    labelled training folder) are read where present, at the top level or under ``options``/``inputs``.

    Raises:
        HandsegError: the run, its ``oof/``, the manifest, the index or a listed map is missing or malformed.
    """
    run = Path(run)
    if not run.is_dir():
        raise HandsegError("run folder not found", run)
    folder = run / OOF_DIR
    if not folder.is_dir():
        raise HandsegError(f"no {OOF_DIR}/ folder (`train --fold K` writes the fold's out-of-fold maps there)", run)
    path = folder / MANIFEST_NAME
    doc = read_json(path, "out-of-fold manifest")
    if not isinstance(doc, dict):
        raise HandsegError("not an out-of-fold manifest (expected an object)", path)
    options = doc.get("options") if isinstance(doc.get("options"), dict) else {}
    inputs = doc.get("inputs") if isinstance(doc.get("inputs"), dict) else {}
    fold = doc.get("fold", options.get("fold"))
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
        raise HandsegError(f'needs "fold": a fold number >= 0, got {fold!r}', path)
    if doc.get("classes", list(CLASSES)) != list(CLASSES):
        raise HandsegError("its classes are not the 29 classes of this handseg", path)
    card = doc.get("card")
    if card is None:
        card = _card_from_checkpoint(run)
    if not isinstance(card, dict) or not {"arch", "encoder", "size"} <= card.keys():
        raise HandsegError('"card" must be the run\'s model card (arch, encoder, size, ...)', path)
    transforms = doc.get("transforms", options.get("transforms", ["identity"]))
    merge = doc.get("merge", options.get("merge", "mean"))
    if not (isinstance(transforms, list) and all(isinstance(t, str) for t in transforms)) or not isinstance(merge, str):
        raise HandsegError('"transforms" must be a list of TTA names and "merge" a string', path)
    data = doc.get("data", inputs.get("data"))
    return OofRun(run, folder, fold, card, transforms, merge, Path(data) if data else None, read_probs_index(folder))


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
    from handseg.core.files import write_manifest

    options = {"transforms": list(transforms), "merge": merge, "checkpoint": str(checkpoint) if checkpoint else None}
    inputs = {"data": str(Path(data).resolve()), "splits": str(Path(splits).resolve()) if splits else None}
    return write_manifest(folder, stage, options, inputs, fold=int(fold), n_folds=n_folds, card=dict(card),
                          data=inputs["data"], transforms=list(transforms), merge=merge)


def _card_from_checkpoint(run: Path) -> dict:
    """The model card from a checkpoint's safetensors header, read without torch."""
    from handseg.core.checkpoint import META_KEY, resolve_checkpoint

    path = resolve_checkpoint(run)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            meta = json.loads(f.read(size)).get("__metadata__") or {}
        return json.loads(meta[META_KEY])
    except (OSError, ValueError, KeyError, struct.error, AttributeError):
        raise HandsegError("no model card in the oof manifest nor in the checkpoint header", path) from None


def _config_key(r: OofRun) -> str:
    from dataclasses import asdict

    from handseg.core.checkpoint import ModelCard

    # cards from other handseg versions: missing fields take their defaults; the build plan follows from
    # arch, encoder and size, so it is not part of what makes a configuration
    full = {**asdict(ModelCard("", "", 0)), **r.card}
    card = {k: v for k, v in full.items() if k not in _PER_FOLD_CARD_FIELDS + ("plan",)}
    return json.dumps({"card": card, "transforms": r.transforms, "merge": r.merge}, sort_keys=True)


def _config_name(card: dict, transforms: list[str]) -> str:
    name = f"{card['arch']}/{card['encoder']}@{card['size']}"
    if card.get("crop"):
        name += f" crop{card['crop']}"
    if card.get("unify_hands"):
        name += " unified"
    tta = [t for t in transforms if t != "identity"]
    return name + (" +" + "+".join(tta) if tta else "")


def group_configurations(runs: Sequence[OofRun]) -> list[Configuration]:
    """Group runs into configurations (same card but for the fold, same TTA), in the order first given.

    Raises:
        HandsegError: two runs of one configuration are the same fold, or share an image.
    """
    groups: dict[str, Configuration] = {}
    for r in runs:
        key = _config_key(r)
        cfg = groups.get(key)
        if cfg is None:
            cfg = groups[key] = Configuration(_config_name(r.card, r.transforms), r.card, r.transforms, r.merge)
        if r.fold in cfg.runs:
            raise HandsegError(f"overlapping folds: {cfg.runs[r.fold].run} and {r.run} are both fold {r.fold} "
                               f"of configuration {cfg.name}")
        cfg.runs[r.fold] = r
        for image in r.images:
            other = cfg.where.get(image)
            if other is not None:
                raise HandsegError(f"overlapping folds: {image} is in the out-of-fold maps of both {other.run} "
                                   f"(fold {other.fold}) and {r.run} (fold {r.fold})")
            cfg.where[image] = r
    configs = list(groups.values())
    seen: dict[str, int] = {}
    for cfg in configs:  # configurations that differ only in what the short name leaves out
        seen[cfg.name] = seen.get(cfg.name, 0) + 1
        if seen[cfg.name] > 1:
            cfg.name += f" #{seen[cfg.name]}"
    for cfg in configs:
        cfg.runs = dict(sorted(cfg.runs.items()))
    return configs


def check_coverage(configs: Sequence[Configuration], images: Sequence[str], data: Path) -> None:
    """Every configuration must hold an OOF map for each labelled image, and for nothing else.

    Raises:
        HandsegError: naming the configuration, how many images are missing (with examples) and its folds.
    """
    wanted = set(images)
    for cfg in configs:
        missing = [im for im in images if im not in cfg.where]
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            folds = ", ".join(str(f) for f in cfg.runs)
            raise HandsegError(f"configuration {cfg.name} has no out-of-fold map for {len(missing)} of {len(images)} "
                               f"images of {data} ({shown}); it has fold(s) {folds}: add the missing folds' runs")
        extra = [im for im in cfg.where if im not in wanted]
        if extra:
            raise HandsegError(f"out-of-fold image {extra[0]} is not a labelled image of {data}",
                               cfg.where[extra[0]].folder)


def resolve_data(runs: Sequence[OofRun], data: str | Path | None) -> Path:
    """``--data``, or the labelled folder all runs' manifests name.

    Raises:
        HandsegError: no ``--data`` and the runs name none, or different ones.
    """
    if data is not None:
        return Path(data)
    named = {str(r.data) for r in runs if r.data is not None}
    if not named:
        raise HandsegError("the runs' oof manifests do not say which data they were made from; pass --data DIR")
    if len({os.path.realpath(p) for p in named}) > 1:
        raise HandsegError(f"the runs were made from different data folders ({', '.join(sorted(named))}); "
                           "pass --data DIR")
    return Path(sorted(named)[0])


# ----------------------------------------------------------------------------------------------
# ground truth, one image at a time


class TruthSource:
    """Ground truth of a labelled folder, read one image at a time (PNG header + polygon JSON)."""

    def __init__(self, data_dir: str | Path):
        from handseg.core.data import discover

        self.data = Path(data_dir)
        samples = discover(self.data, labels="required")
        self.samples = {s.name: s for s in samples}
        if len(self.samples) != len(samples):
            raise HandsegError("two images share a basename; CSV rows could not tell them apart", self.data)
        self.images = [s.name for s in samples]

    def crops(self, image: str) -> tuple[tuple[int, int], list]:
        """``((H, W), per class (bool crop, row0, col0) or None)``."""
        from handseg.core.data import image_size, polygon_crops, read_polygons

        s = self.samples[image]
        shape = image_size(s.image_path)
        out: list = [None] * NUM_CLASSES
        for c, crop, r0, c0 in polygon_crops(read_polygons(s.label_path), shape):
            out[c] = (crop, r0, c0)
        return shape, out

    def runs(self, image: str) -> tuple[tuple[int, int], list[Runs]]:
        """``((H, W), per-class runs)``, equal to :func:`handseg.core.data.class_runs`."""
        shape, crops = self.crops(image)
        return shape, [EMPTY_RUNS if t is None else crop_to_runs(t[0], t[1], t[2], shape[1]) for t in crops]


# ----------------------------------------------------------------------------------------------
# levels and cuts: the one definition of a mask, for selection and application alike


def _union_box(gots: Sequence) -> tuple[int, int, int, int] | None:
    present = [g for g in gots if g is not None]
    if not present:
        return None
    return (min(g[1] for g in present), max(g[1] + g[0].shape[0] for g in present),
            min(g[2] for g in present), max(g[2] + g[0].shape[1] for g in present))


def _place(got, box: tuple[int, int, int, int], dtype=np.uint8) -> np.ndarray:
    """A ``(crop, row0, col0)`` (or None: nothing) on the box's grid, zero elsewhere."""
    r0, r1, c0, c1 = box
    if got is not None:
        crop, gr, gc = got
        if (gr, gc) == (r0, c0) and crop.shape == (r1 - r0, c1 - c0) and crop.dtype == dtype:
            return crop
    out = np.zeros((r1 - r0, c1 - c0), dtype=dtype)
    if got is not None:
        out[gr - r0 : gr - r0 + crop.shape[0], gc - c0 : gc - c0 + crop.shape[1]] = crop
    return out


def _integral(weights: Sequence[float]) -> bool:
    return all(float(w).is_integer() for w in weights)


def soft_level(placed: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_m w_m q_m`` of uint8 maps on one grid: exact integers (int32) when the weights are integers."""
    if _integral(weights):
        acc = np.zeros(placed[0].shape, dtype=np.int32)
        for q, w in zip(placed, weights):
            acc += q if w == 1 else q.astype(np.int32) * int(w)
        return acc
    acc = np.zeros(placed[0].shape, dtype=np.float64)
    for q, w in zip(placed, weights):
        acc += q * float(w)
    return acc


def hard_level(placed: Sequence[np.ndarray], member_threshold: float = MEMBER_THRESHOLD) -> np.ndarray:
    """How many members' maps exceed the member threshold, per pixel: uint8."""
    cut = member_threshold * 255.0
    votes = np.zeros(placed[0].shape, dtype=np.uint8)
    for q in placed:
        votes += q > cut
    return votes


def cut_value(kind: str, value: float, weight_sum: float = 1.0) -> float:
    """The number a level must exceed: ``255 t`` (configuration), ``255 t sum(w)`` (soft), ``k - 0.5`` (hard,
    ``value`` = min votes)."""
    if kind == HARD:
        return float(value) - 0.5
    if kind == SOFT:
        return float(value) * 255.0 * float(weight_sum)
    return float(value) * 255.0


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
    cut_array: list[np.ndarray] = field(init=False)
    """Per source: the values a level must exceed, one per cut, ascending (nested, shrinking masks)."""
    plain_index: list[np.ndarray] = field(init=False)
    lcc_index: list[np.ndarray] = field(init=False)
    """Per source and cut: where its option without (``plain_index``) and with keep-largest lies."""

    @classmethod
    def build(cls, config_names: Sequence[str], grid: Sequence[float] = GRID) -> OptionSpace:
        grid = sorted({round(float(t), 6) for t in grid} | {DEFAULT_THRESHOLD})
        if grid[0] < 0 or grid[-1] >= 1:
            raise HandsegError(f"thresholds must lie in [0, 1), got {grid[0]}..{grid[-1]}")
        m = len(config_names)
        names, kinds = list(config_names), ["config"] * m
        if m >= 2:
            names += [SOFT, HARD]
            kinds += [SOFT, HARD]
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
        return cls(names, kinds, cuts, default, options, index, [1.0] * m)

    def __post_init__(self) -> None:
        self.cut_array = [self.cut_values(s) for s in range(len(self.names))]
        self.plain_index = [np.array([self.index[(s, j, False)] for j in range(len(c))])
                            for s, c in enumerate(self.cuts)]
        self.lcc_index = [np.array([self.index[(s, j, True)] for j in range(len(c))])
                          for s, c in enumerate(self.cuts)]

    @property
    def n_configs(self) -> int:
        return self.kinds.count("config")

    def cut_values(self, s: int) -> np.ndarray:
        return np.array([cut_value(self.kinds[s], v, sum(self.weights)) for v in self.cuts[s]])

    def allowed(self, sources: Sequence[int], thresholds: bool, keep_largest: bool) -> np.ndarray:
        """``(options,)`` bool: the options of these sources (any cut or the default; keep-largest or not)."""
        return np.array([o.source in sources and (thresholds or o.cut == self.default_cut[o.source])
                         and (keep_largest or not o.keep_largest) for o in self.options])

    def class_recipe(self, o: int) -> dict:
        opt = self.options[o]
        value = self.cuts[opt.source][opt.cut]
        entry: dict = {"source": self.names[opt.source]}
        if self.kinds[opt.source] == HARD:
            entry["min_votes"] = int(value)
        else:
            entry["threshold"] = float(value)
        entry["keep_largest"] = bool(opt.keep_largest)
        return entry


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
            level, top = soft_level(placed, space.weights), 255 * int(sum(space.weights))
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
    from handseg.core.cropfile import bbox

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
        box = _union_box(gots)
        if box is None:  # no configuration predicts anything: every option is the empty mask
            out[c] = dice_value(0, t_area, 0)
            continue
        _score_class([_place(g, box) for g in gots], _window(box, t), t_area, space, out[c])
    return out


_WORKER: tuple | None = None


def _init_worker(fn: Callable, ctx: object) -> None:
    global _WORKER
    _WORKER = (fn, ctx)


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
    configuration per class, the best of everything per class) alone, then with thresholds, with
    keep-largest, with both."""
    m = space.n_configs
    bases = [(space.names[k], [k]) for k in range(m)]
    if m >= 2:
        soft, hard = space.kinds.index(SOFT), space.kinds.index(HARD)
        bases += [("soft vote", [soft]), ("hard vote", [hard]), ("class-wise best configuration", list(range(m))),
                  ("class-wise best of all", list(range(len(space.names))))]
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


def _leaderboard(values: np.ndarray) -> float:
    """``(images, 29)`` Dice -> mean over images, then over classes (as :class:`~handseg.core.metrics.DiceReport`)."""
    return float(values.mean(axis=0).mean())


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
# recipes


@dataclass(frozen=True)
class ClassRecipe:
    """How one class's mask is made: a source (a configuration's name, ``soft`` or ``hard``), its cut
    (``threshold`` for a configuration or the soft vote, ``min_votes`` for the hard vote), keep-largest."""

    source: str
    threshold: float | None = None
    min_votes: int | None = None
    keep_largest: bool = False


@dataclass
class RecipeConfig:
    """A configuration of a recipe: its run folders per fold (absolute once read) and the TTA its OOF maps
    were made with (``predict`` should use the same on test images)."""

    name: str
    runs: dict[int, Path]
    transforms: list[str]
    merge: str
    card: dict
    sha256: dict[int, str] = field(default_factory=dict)
    """Each fold's checkpoint pinned by its SHA-256 (what select scored)."""

    @property
    def checkpoints(self) -> list[Path]:
        """The run folders, fold by fold: what ``predict`` averages for this configuration."""
        return [self.runs[k] for k in sorted(self.runs)]

    @property
    def tta_spec(self) -> str:
        """The ``--transforms`` value of this configuration's TTA (see :func:`tta_option`)."""
        return tta_option(self.transforms)


@dataclass
class Recipe:
    """What ``predict --recipe`` does: which configurations, how each class is made, ``cv_dice`` on OOF data."""

    configs: list[RecipeConfig]
    classes: list[ClassRecipe]
    soft_weights: list[float]
    member_threshold: float = MEMBER_THRESHOLD
    cv_dice: float | None = None

    def config(self, name: str) -> RecipeConfig:
        for c in self.configs:
            if c.name == name:
                return c
        raise KeyError(name)

    def members(self) -> list[str]:
        """The configurations the recipe needs maps of (all, if any class uses a vote), in recipe order."""
        used = {c.source for c in self.classes}
        if used & {SOFT, HARD}:
            return [c.name for c in self.configs]
        return [c.name for c in self.configs if c.name in used]

    def keep_largest(self) -> tuple[bool, ...]:
        return tuple(c.keep_largest for c in self.classes)


def recipe_from_json(doc: dict, base: Path | None = None, where: Path | None = None) -> Recipe:
    """Parse and check a recipe document; run paths are taken relative to ``base`` (the recipe's folder).

    Raises:
        HandsegError: a missing or malformed field (naming ``where``).
    """
    def bad(msg: str) -> HandsegError:
        return HandsegError(f"not a valid recipe: {msg}", where)

    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT:
        raise bad(f'no "format": "{RECIPE_FORMAT}" (written by `handseg select`?)')
    if doc.get("version") != RECIPE_VERSION:
        raise bad(f"version {doc.get('version')!r}; this handseg reads version {RECIPE_VERSION}")
    configs = []
    for c in doc.get("configurations") or []:
        try:
            runs = {int(k): Path(v) for k, v in c["runs"].items()}
            tta = c.get("tta") or {}
            configs.append(RecipeConfig(str(c["name"]), {k: p if p.is_absolute() or base is None else base / p
                                                         for k, p in runs.items()},
                                        list(tta.get("transforms", ["identity"])), str(tta.get("merge", "mean")),
                                        dict(c.get("card") or {}),
                                        {int(k): str(v) for k, v in (c.get("sha256") or {}).items()}))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise bad('each configuration needs "name" and "runs" {fold: run folder}') from None
    if not configs:
        raise bad('no "configurations"')
    names = [c.name for c in configs]
    if len(set(names)) != len(names) or {SOFT, HARD} & set(names):
        raise bad("configuration names must be distinct and not 'soft' or 'hard'")
    per_class = doc.get("classes")
    if not isinstance(per_class, dict) or set(per_class) != set(CLASSES):
        raise bad('"classes" must give each of the 29 classes')
    classes = []
    for name in CLASSES:
        e = per_class[name]
        if not isinstance(e, dict):
            raise bad(f"{name}: expected an object")
        src = e.get("source")
        if src not in names and src not in (SOFT, HARD):
            raise bad(f"{name}: unknown source {src!r}")
        if src in (SOFT, HARD) and len(configs) < 2:
            raise bad(f"{name}: a {src} vote needs two or more configurations")
        thr, votes = e.get("threshold"), e.get("min_votes")
        if src == HARD:
            if isinstance(votes, bool) or not isinstance(votes, int) or not 1 <= votes <= len(configs):
                raise bad(f"{name}: min_votes must be 1..{len(configs)}")
            thr = None
        else:
            if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr < 1:
                raise bad(f"{name}: threshold must be a number in [0, 1)")
            thr, votes = float(thr), None
        classes.append(ClassRecipe(src, thr, votes, bool(e.get("keep_largest", False))))
    ensemble = doc.get("ensemble") or {}
    weights = (ensemble.get("soft") or {}).get("weights", [1.0] * len(configs))
    if (not isinstance(weights, list) or len(weights) != len(configs)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights)):
        raise bad(f"ensemble.soft.weights must be {len(configs)} positive numbers")
    member = (ensemble.get("hard") or {}).get("member_threshold", MEMBER_THRESHOLD)
    if isinstance(member, bool) or not isinstance(member, (int, float)) or not 0 <= member < 1:
        raise bad("ensemble.hard.member_threshold must be a number in [0, 1)")
    cv = doc.get("cv_dice")
    return Recipe(configs, classes, [float(w) for w in weights], float(member),
                  float(cv) if isinstance(cv, (int, float)) else None)


def read_recipe(path: str | Path) -> Recipe:
    """Read a ``recipe.json`` written by ``handseg select`` (run folders resolved against its folder).

    Raises:
        HandsegError: the file is missing, not JSON, or not a valid recipe.
    """
    path = Path(path)
    return recipe_from_json(read_json(path, "recipe"), path.resolve().parent, path)


def recipe_inputs(path: str | Path) -> list[Path]:
    """What applying or exporting a recipe reads: the recipe, its runs and (for cascades) their stage-1
    runs; a command's outputs must stay out of all of them.

    Raises:
        HandsegError: the recipe is not valid or names a run that is missing.
    """
    from handseg.core.cascade import model_inputs

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
    from handseg.core.checkpoint import checkpoint_sha256, resolve_checkpoint

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
            ``(uint8 crop, row0, col0)`` or None (a :class:`~handseg.core.ensemble.ProbMap`, or
            :class:`ArrayMap` of an in-memory array); needed for :meth:`Recipe.members`.
        shape: the image's ``(H, W)``.

    Returns:
        29 runs (:mod:`handseg.core.rle`), in class order.
    """
    names = [c.name for c in recipe.configs]
    weight_sum = sum(recipe.soft_weights)
    out = []
    for c, how in enumerate(recipe.classes):
        members = names if how.source in (SOFT, HARD) else [how.source]
        gots = [maps[m].crop(c) for m in members]
        box = _union_box(gots)
        if box is None:
            out.append(EMPTY_RUNS)
            continue
        placed = [_place(g, box) for g in gots]
        if how.source == SOFT:
            level, cut = soft_level(placed, recipe.soft_weights), cut_value(SOFT, how.threshold, weight_sum)
        elif how.source == HARD:
            level, cut = hard_level(placed, recipe.member_threshold), cut_value(HARD, how.min_votes)
        else:
            level, cut = placed[0], cut_value("config", how.threshold)
        mask = level > cut
        if how.keep_largest:
            labels, _, keep, _ = label_components(mask)
            if labels is not None:
                mask = labels == keep
        out.append(crop_to_runs(mask, box[0], box[2], shape[1]))
    return out


class ArrayMap:
    """An in-memory ``(29, H, W)`` probability array (float in [0, 1], or uint8 from ``quantise_probs``) as a
    map for :func:`recipe_image_runs`, quantised and cropped exactly as ``predict --probs`` stores it."""

    def __init__(self, probs: np.ndarray):
        from handseg.core import cropfile
        from handseg.core.ensemble import PROBS_MAGIC, pack_probs

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
    from handseg.core.submission import write_predictions

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
    return {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
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
        "classes": {name: space.class_recipe(int(o)) for name, o in zip(CLASSES, chosen.choice)},
        "data": str(data.resolve()),
        "images": len(scores.images),
        "folds": sorted(set(scores.folds.tolist())),
        "grid": [float(v) for v in space.cuts[0]],
    }


def _pin(run: Path) -> str | None:
    """The SHA-256 of the checkpoint ``predict`` will take from a run (None: the run holds out-of-fold
    maps but no checkpoint, and predict will say so)."""
    from handseg.core.checkpoint import checkpoint_sha256, resolve_checkpoint

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
    data = resolve_data(oof, data)
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


def candidates_table(selection: Selection, limit: int | None = None):
    """A rich table of the candidates, best first: OOF Dice, nested estimate, per-fold range, gain."""
    from rich.table import Table

    names = ", ".join(c.name for c in selection.configs)
    table = Table(title=f"Candidates on {len(selection.scores.images)} out-of-fold images ({names})")
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
