"""Configurations for selection: out-of-fold runs grouped by model card, and their ground truth."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from handseg.common.constants import CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data.images import image_size
from handseg.data.labels import polygon_crops, read_polygons
from handseg.data.layout import discover
from handseg.data.roi import roi_label
from handseg.formats.files import MANIFEST_NAME, read_json
from handseg.formats.oof import OOF_DIR, OofRun
from handseg.formats.probs import probs_name, read_probs_index
from handseg.formats.rle import EMPTY_RUNS, Runs, crop_to_runs
from handseg.models.checkpoint import ModelCard, read_card

# card fields that differ between the folds of one configuration (or that select overrides)
_PER_FOLD_CARD_FIELDS = ("epoch", "step", "score", "handseg_version", "thresholds")


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
        card = asdict(read_card(run))  # the one card reader, which checks it
    if not isinstance(card, dict) or not {"arch", "encoder", "size"} <= card.keys():
        raise HandsegError('"card" must be the run\'s model card (arch, encoder, size, ...)', path)
    transforms = doc.get("transforms", options.get("transforms", ["identity"]))
    merge = doc.get("merge", options.get("merge", "mean"))
    if not (isinstance(transforms, list) and all(isinstance(t, str) for t in transforms)) or not isinstance(merge, str):
        raise HandsegError('"transforms" must be a list of TTA names and "merge" a string', path)
    data = doc.get("data", inputs.get("data"))
    return OofRun(run, folder, fold, card, transforms, merge, Path(data) if data else None, read_probs_index(folder))


def _config_key(r: OofRun) -> str:
    from dataclasses import asdict


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
    if card.get("roi"):
        name += f" roi:{roi_label(card['roi'])}"
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


def oof_training_data(runs: Sequence[OofRun], data: str | Path | None) -> Path:
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

        self.data = Path(data_dir)
        samples = discover(self.data, labels="required")
        self.samples = {s.name: s for s in samples}
        if len(self.samples) != len(samples):
            raise HandsegError("two images share a basename; CSV rows could not tell them apart", self.data)
        self.images = [s.name for s in samples]

    def crops(self, image: str) -> tuple[tuple[int, int], list]:
        """``((H, W), per class (bool crop, row0, col0) or None)``."""

        s = self.samples[image]
        shape = image_size(s.image_path)
        out: list = [None] * NUM_CLASSES
        for c, crop, r0, c0 in polygon_crops(read_polygons(s.label_path), shape):
            out[c] = (crop, r0, c0)
        return shape, out

    def runs(self, image: str) -> tuple[tuple[int, int], list[Runs]]:
        """``((H, W), per-class runs)``, equal to :func:`handseg.data.labels.class_runs`."""
        shape, crops = self.crops(image)
        return shape, [EMPTY_RUNS if t is None else crop_to_runs(t[0], t[1], t[2], shape[1]) for t in crops]
