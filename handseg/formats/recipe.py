"""The recipe ``handseg select`` writes and ``predict --recipe`` applies: its format, reading and checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from handseg.common.constants import CLASSES, DEFAULT_THRESHOLD, MAX_WEIGHT_SUM
from handseg.common.errors import HandsegError
from handseg.formats.files import read_json, safe_name
from handseg.formats.tta import tta_option

SOFT, HARD = "soft", "hard"
RECIPE_FORMAT = "handseg-recipe"
RECIPE_VERSION = 1
RECIPE_VERSIONS = (1, 2)
"""Version 2: a soft-vote class may carry its own ``weights`` (per-class weights chosen by ``select``)."""
MEMBER_THRESHOLD = DEFAULT_THRESHOLD
"""The threshold each member's map is cut at before a hard vote."""


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
    weights: tuple[float, ...] | None = None
    """A soft vote's own relative weights, one per configuration (None: the recipe's ``soft_weights``)."""


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
    data: Path | None = None
    """The labelled training folder select scored on (``predict --recipe --oof`` predicts it again)."""

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


def _finite(w: float) -> bool:
    try:
        return math.isfinite(w)
    except OverflowError:  # an integer beyond any float
        return False


def config_folder(name: str) -> str:
    """The folder a configuration's maps go to (``predict --recipe --probs DIR/<folder>``)."""
    return safe_name(name, "config", "@+")


def recipe_from_json(doc: dict, base: Path | None = None, where: Path | None = None) -> Recipe:
    """Parse and check a recipe document; run paths are taken relative to ``base`` (the recipe's folder).

    Raises:
        HandsegError: a missing or malformed field (naming ``where``).
    """
    def bad(msg: str) -> HandsegError:
        return HandsegError(f"not a valid recipe: {msg}", where)

    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT:
        raise bad(f'no "format": "{RECIPE_FORMAT}" (written by `handseg select`?)')
    if doc.get("version") not in RECIPE_VERSIONS:
        raise bad(f"version {doc.get('version')!r}; this handseg reads versions "
                  f"{', '.join(map(str, RECIPE_VERSIONS))}")
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
    folders: dict[str, str] = {}
    for n in names:  # lower case: one folder on a case-insensitive disk too
        other = folders.setdefault(config_folder(n).lower(), n)
        if other != n:
            raise bad(f"configurations {other!r} and {n!r} would share the map folder {config_folder(n)}; rename one")
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
        keep = e.get("keep_largest", False)
        if not isinstance(keep, bool):
            raise bad(f"{name}: keep_largest must be true or false, got {keep!r}")
        classes.append(ClassRecipe(src, thr, votes, keep,
                                   _class_weights(e.get("weights"), src, len(configs), doc.get("version"), bad, name)))
    ensemble = doc.get("ensemble") or {}
    weights = (ensemble.get("soft") or {}).get("weights", [1.0] * len(configs))
    if (not isinstance(weights, list) or len(weights) != len(configs)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 and _finite(w)
                       for w in weights)):
        raise bad(f"ensemble.soft.weights must be {len(configs)} finite positive numbers")
    total = sum(float(w) for w in weights)
    if total > MAX_WEIGHT_SUM:
        raise bad(f"ensemble.soft.weights sum to {total:g}, more than {MAX_WEIGHT_SUM:g} (only their ratios matter: "
                  "scale them down)")
    member = (ensemble.get("hard") or {}).get("member_threshold", MEMBER_THRESHOLD)
    if isinstance(member, bool) or not isinstance(member, (int, float)) or not 0 <= member < 1:
        raise bad("ensemble.hard.member_threshold must be a number in [0, 1)")
    cv = doc.get("cv_dice")
    data = doc.get("data")
    if data is not None and not isinstance(data, str):
        raise bad('"data" must be the path of the training folder')
    return Recipe(configs, classes, [float(w) for w in weights], float(member),
                  float(cv) if isinstance(cv, (int, float)) else None, Path(data) if data else None)


def _class_weights(weights, source: str, m: int, version, bad, name: str) -> tuple[float, ...] | None:
    """A class's own soft-vote weights: ``m`` non-negative numbers, not all zero, on a soft vote, version 2."""
    if weights is None:
        return None
    if source != SOFT or version != 2:
        raise bad(f"{name}: weights belong to a soft vote of a version 2 recipe")
    if (not isinstance(weights, list) or len(weights) != m or sum(w for w in weights if _number(w)) <= 0
            or not all(_number(w) and w >= 0 for w in weights)):
        raise bad(f"{name}: weights must be {m} non-negative numbers, not all zero")
    return tuple(float(w) for w in weights)


def _number(w) -> bool:
    import math

    return isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)


def read_recipe(path: str | Path) -> Recipe:
    """Read a ``recipe.json`` written by ``handseg select`` (run folders resolved against its folder).

    Raises:
        HandsegError: the file is missing, not JSON, or not a valid recipe.
    """
    path = Path(path)
    return recipe_from_json(read_json(path, "recipe"), path.resolve().parent, path)
