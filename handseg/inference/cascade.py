"""Full resolution with global context: a cascade of two models, as nnU-Net's.

Stage 1 sees the whole image at low resolution (``train --size 512``). Stage 2 trains on
full-resolution crops (``train --crop 1024 --context RUN_LOWRES ...``) and gets stage 1's 29
probability maps for the crop's region as 29 extra input channels (p in [0, 1], after the uint8
quantisation that probability maps use), so a crop of a finger still knows which finger it is.

For training images the context is stage 1's out-of-fold maps (``RUN/oof/`` of the stage-1 fold
that did not see the image), where the stage-1 folds provide them: a model's predictions on its own
training images are better than what it gives on new ones. Images no stage-1 fold held out (extra
data, or a stage 1 trained on everything) get the mean of the stage-1 models, computed once and
cached under ``DATA/cache/context/<key>/``. Validation images (and the held-out images that ``predict
--splits --fold`` and ``predict --recipe --oof`` score) must have out-of-fold maps: :func:`build_context`
is the one function that gives a stage-2 image its context, on every path. At predict time the stage-1
models (recorded in the stage-2 model card) run first, once per image, with the TTA of the stage-1 maps
stage 2 trained on (``context_tta``), then stage 2.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.formats.files import atomic_dir, atomic_write_json, read_json
from handseg.formats.oof import OOF_DIR
from handseg.formats.probs import ProbMap, probs_name, read_probs_index
from handseg.formats.tta import parse_transforms, tta_option
from handseg.inference.run import PredictConfig, run_predictions
from handseg.models.checkpoint import checkpoint_sha256, read_card, resolve_checkpoint
from handseg.models.context import resolve_context, stage1_checkpoints

ContextCrops = list[tuple[int, np.ndarray, int, int]]
"""One image's stage-1 map as ``(class, uint8 crop, row0, col0)`` (p * 255, each class's bounding box)."""


def _key(checkpoints: list[Path], transforms: list[str]) -> str:
    """The cache key of a stage-1 set: its checkpoints' contents (and its TTA, where not the identity)."""

    h = hashlib.sha256()
    for digest in sorted(checkpoint_sha256(c) for c in checkpoints):
        h.update(digest.encode())
    if transforms != ["identity"]:
        h.update(",".join(transforms).encode())
    return h.hexdigest()[:16]


@dataclass
class ContextSource:
    """Stage-1 maps of training images, by image name (out-of-fold where possible, else cached)."""

    where: dict[str, Path] = field(default_factory=dict)
    """Image name -> its stored map (``predict --probs`` format)."""
    out_of_fold: int = 0
    in_sample: int = 0
    transforms: list[str] = field(default_factory=lambda: ["identity"])
    """The TTA of the stage-1 maps (transform names, merged by their mean): the stage-1 runs' ``--oof-tta``.
    A stage-2 card records it (``context_tta``) so that predict runs stage 1 the same way."""

    def crops(self, name: str) -> ContextCrops:

        path = self.where.get(name)
        if path is None:
            raise HandsegError(f"no stage-1 context for {name}")
        pm = ProbMap(path)
        return [(c, np.ascontiguousarray(g[0]), g[1], g[2]) for c in range(NUM_CLASSES)
                if (g := pm.crop(c)) is not None]

    def full(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """``(29, H, W)`` uint8 of one image (for validation, which runs stage 2 on whole images)."""
        out = np.zeros((NUM_CLASSES, *shape), dtype=np.uint8)
        for c, crop, r0, c0 in self.crops(name):
            out[c, r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] = crop
        return out


def build_context(stage1_runs: list[Path], samples: list, cache_root: Path | None, device: str = "auto",
                  batch: int = 4, log=print, held_out: Collection[str] = ()) -> ContextSource:
    """Stage-1 context for every sample: out-of-fold maps from the stage-1 runs' ``oof/`` folders where
    one holds the image, else the stage-1 models' mean (with the same TTA), predicted once and cached in
    ``cache_root``. The one place a stage-2 image gets its stage-1 context: training, validation,
    ``predict --splits --fold`` and ``predict --recipe --oof`` all come here.

    Args:
        held_out: names of stage-2 validation images: each must have an out-of-fold stage-1 map (from a
            model that did not train on it); the mean of all stage-1 folds would have seen it.

    Raises:
        HandsegError: a stage-1 run is missing, two of its folds hold the same image, the stage-1 runs'
            maps were made with different TTA, or a ``held_out`` image has no out-of-fold stage-1 map
            (naming the stage-1 fold that is missing).
    """

    checkpoints = stage1_checkpoints(stage1_runs)
    source = ContextSource()
    ttas: dict[tuple, Path] = {}
    for run in stage1_runs:
        oof = Path(run) / OOF_DIR
        if not (oof / "manifest.json").is_file():
            continue
        doc = read_json(oof / "manifest.json", "out-of-fold manifest")
        transforms = doc.get("transforms", ["identity"]) if isinstance(doc, dict) else ["identity"]
        ttas.setdefault(tuple(transforms) if isinstance(transforms, list) else ("?",), Path(run))
        for name in read_probs_index(oof):
            if name in source.where:
                raise HandsegError(f"two stage-1 folds hold out {name} ({source.where[name].parent} and {oof})", run)
            source.where[name] = oof / probs_name(name)
    if len(ttas) > 1:
        (a, ra), (b, rb) = list(ttas.items())[:2]
        raise HandsegError(f"the stage-1 runs' out-of-fold maps were made with different TTA ({ra}: {', '.join(a)}; "
                           f"{rb}: {', '.join(b)}); train stage 1 with one --oof-tta", rb)
    if ttas:
        source.transforms = list(next(iter(ttas)))
    lacking = [s for s in samples if s.name in set(held_out) and s.name not in source.where]
    if lacking:
        raise _no_out_of_fold(lacking[0], stage1_runs)
    wanted = [s for s in samples if s.name not in source.where]
    source.out_of_fold = len(samples) - len(wanted)
    if wanted:
        if cache_root is None:
            raise _no_out_of_fold(wanted[0], stage1_runs)
        folder = Path(cache_root) / "context" / _key(checkpoints, source.transforms)
        cached = set(read_probs_index(folder)) if (folder / "index.json").is_file() else set()
        missing = [s for s in wanted if s.name not in cached]
        if missing:

            log(f"stage-1 context: {len(missing)} images that no stage-1 fold held out are predicted by the mean of "
                f"{len(checkpoints)} stage-1 models (once; cached in {folder})")
            with atomic_dir(folder, overwrite=True) as tmp:  # built beside the old cache, then swapped in
                run_predictions(checkpoints, Path("."), tmp / "context.csv", tmp,
                                PredictConfig(parse_transforms(tta_option(source.transforms)), device=device,
                                              batch=batch),
                                samples=missing, distributed=False)
                for name in cached:  # keep what was cached before
                    os.link(folder / probs_name(name), tmp / probs_name(name))
                atomic_write_json(tmp / "index.json", {"images": sorted(cached | {s.name for s in missing})})
        for s in wanted:
            source.where[s.name] = folder / probs_name(s.name)
        source.in_sample = len(wanted)
    return source


def _no_out_of_fold(sample, stage1_runs: list[Path]) -> HandsegError:
    """The refusal for a stage-2 validation image without an out-of-fold stage-1 map, naming the
    stage-1 fold that would hold it out (from the stage-1 runs' splits) where it can tell."""

    given, splits = [], None
    for run in stage1_runs:
        path = Path(run) / "manifest.json"
        doc = read_json(path, "manifest") if path.is_file() else {}
        options, inputs = (doc.get("options") or {}, doc.get("inputs") or {}) if isinstance(doc, dict) else ({}, {})
        if isinstance(options.get("fold"), int) and options["fold"] >= 0:
            given.append(options["fold"])
        if splits is None and inputs.get("splits") not in (None, "None") and Path(inputs["splits"]).is_file():
            splits = Path(inputs["splits"])
    fold = None
    if splits is not None:
        doc = read_json(splits, "splits file")
        images = doc.get("images") if isinstance(doc, dict) else None
        fold = next((im.get("fold") for im in images or [] if isinstance(im, dict)
                     and im.get("path") in (sample.rel, sample.name)), None)
    folds = f"stage-1 folds given: {', '.join(map(str, sorted(given)))}" if given else "no stage-1 run has a fold"
    if fold is not None:
        why = (f"it is in fold {fold} of {splits} and no stage-1 run given held fold {fold} out ({folds}); give "
               f"stage 1's fold-{fold} run (trained with --fold {fold}) to --context")
    else:
        why = f"no stage-1 run given held it out ({folds})"
    return HandsegError(f"{sample.name} has no out-of-fold stage-1 map: {why}, so that its context does not come "
                        "from models that trained on it", sample.image_path)


def held_out_context(checkpoints: list[Path], samples: list) -> ContextSource | None:
    """The stage-1 context of training images that stage-2 folds held out (``predict --splits --fold``,
    ``predict --recipe --oof``): out-of-fold stage-1 maps only, as training's validation got them, so
    the Dice is the one select scored. ``None`` when no checkpoint is a cascade.

    Raises:
        HandsegError: the cascades name different stage-1 runs, or an image has no out-of-fold stage-1 map.
    """

    sets = set()
    for p in checkpoints:
        path = resolve_checkpoint(p)
        card = read_card(path)
        if card.context:
            sets.add(tuple(resolve_context(card.context, path, card.context_sha256)))
    if not sets:
        return None
    if len(sets) > 1:
        raise HandsegError("these cascades have different stage-1 runs; predict their held-out images one stage-1 "
                           "set at a time")
    return build_context([c.parent for c in sets.pop()], samples, None, held_out={s.name for s in samples})


def render_context(crops: ContextCrops, window: tuple[int, int, int], flip_width: int | None = None) -> np.ndarray:
    """Stage-1 crops to the ``(S, S, 29)`` uint8 context of a window ``(row, col, S)`` of the full
    image (outside the image: 0). ``flip_width``: the image was mirrored (width of the image)."""
    wr, wc, side = window
    out = np.zeros((side, side, NUM_CLASSES), dtype=np.uint8)
    for c, crop, r0, c0 in crops:
        if flip_width is not None:
            crop, c0 = crop[:, ::-1], flip_width - c0 - crop.shape[1]
        h, w = crop.shape
        i0, i1 = max(r0, wr), min(r0 + h, wr + side)
        j0, j1 = max(c0, wc), min(c0 + w, wc + side)
        if i0 < i1 and j0 < j1:
            out[i0 - wr : i1 - wr, j0 - wc : j1 - wc, c] = crop[i0 - r0 : i1 - r0, j0 - c0 : j1 - c0]
    return out
