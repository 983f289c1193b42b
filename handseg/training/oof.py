"""The fold's out-of-fold maps (``RUN/oof/``, what ``select`` reads) and a cascade's stage-1 context."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from handseg.common.distributed import (
    barrier,
    dist_env,
)
from handseg.data.cache import default_cache_dir, find_cache
from handseg.data.kfold import read_splits
from handseg.data.layout import resolve_data
from handseg.formats.files import (
    atomic_dir,
)
from handseg.formats.oof import OOF_DIR, write_oof_manifest
from handseg.formats.tta import parse_transforms
from handseg.inference.cascade import build_context
from handseg.inference.run import PredictConfig, run_predictions
from handseg.models.checkpoint import BEST, LAST, read_card
from handseg.training.config import TrainConfig


def cascade_context(cfg: TrainConfig, items: list, device: str, d, log, held_out=()):
    """The stage-1 maps of every training and validation image (see :mod:`handseg.inference.cascade`); under
    torchrun rank 0 predicts what is missing while the others wait, then every rank reads the cache.
    ``held_out`` (the validation images) must have out-of-fold stage-1 maps."""

    data = resolve_data(cfg.data, "train").root
    cache_root = find_cache(data, cfg.cache) or Path(cfg.cache or default_cache_dir(data))
    samples = [i.sample for i in items]
    if d.world > 1 and not d.main:
        barrier(d)
        return build_context(cfg.context, samples, cache_root, device, cfg.batch_size, log=lambda *a: None,
                             held_out=held_out)
    source = build_context(cfg.context, samples, cache_root, device, cfg.batch_size, log, held_out=held_out)
    barrier(d)
    log(f"stage-1 context: {source.out_of_fold} images out-of-fold, {source.in_sample} from the mean of the "
        "stage-1 models")
    return source


def write_oof(cfg: TrainConfig, out: Path, val_items: list, device: str, log=print, context=None) -> None:
    """The fold's out-of-fold maps: its validation images predicted by the best checkpoint (with
    ``--oof-tta``) into ``RUN/oof/`` in the ``predict --probs`` format, with the manifest
    ``handseg select`` reads. Built beside its destination and moved into place when complete."""
    from dataclasses import asdict


    main = dist_env().main
    best = out / BEST if (out / BEST).is_file() else out / LAST
    transforms = parse_transforms(cfg.oof_tta)
    data = resolve_data(cfg.data, "train").root
    n_folds = None
    if cfg.splits is not None:

        n_folds = read_splits(cfg.splits)["n_folds"]
    with atomic_dir(out / OOF_DIR, overwrite=True, main=main) as tmp:
        result = run_predictions([best], data, tmp / "oof.csv", tmp,
                                 PredictConfig(transforms, "mean", device=device, amp=cfg.amp != "off",
                                               batch=cfg.batch_size),
                                 samples=[i.sample for i in val_items], context_source=context)
        if main:
            write_oof_manifest(tmp, cfg.fold, asdict(read_card(best)), data, [t.name for t in transforms], "mean",
                               n_folds=n_folds or 5, splits=cfg.splits, checkpoint=best)
    if main:
        key = "merged" if "merged" in result.dice else transforms[0].name
        dice, over = result.dice[key], ""
        if cfg.roi and result.per_class:  # a ROI model is scored on its own classes, as its validation was
            dice, over = float(np.mean([result.per_class[c] for c in cfg.roi])), f" of its {len(cfg.roi)} ROI classes"
        log(f"out-of-fold maps of fold {cfg.fold} ({result.images} images, Dice{over} {dice:.4f} with "
            f"{best.name}) -> {out / OOF_DIR}")
