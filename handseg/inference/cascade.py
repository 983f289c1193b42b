"""Full resolution with global context: a cascade of two models, as nnU-Net's.

Stage 1 sees the whole image at low resolution (``train --size 512``). Stage 2 trains on
full-resolution crops (``train --crop 1024 --context RUN_LOWRES ...``) and gets stage 1's 29
probability maps for the crop's region as 29 extra input channels (p in [0, 1], after the uint8
quantisation that probability maps use), so a crop of a finger still knows which finger it is.

For training images the context is stage 1's out-of-fold maps (``RUN/oof/`` of the stage-1 fold
that did not see the image), where the stage-1 folds provide them: a model's predictions on its own
training images are better than what it gives on new ones. Images no stage-1 fold held out (extra
data, or a stage 1 trained on everything) get the mean of the stage-1 models, computed once and
cached under ``DATA/cache/context/<key>/``. At predict time the stage-1 models (recorded in the
stage-2 model card) run first, once per image, then stage 2.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.formats.files import atomic_dir, atomic_write_json
from handseg.formats.oof import OOF_DIR
from handseg.formats.probs import ProbMap, probs_name, read_probs_index
from handseg.inference.run import PredictConfig, run_predictions
from handseg.models.checkpoint import checkpoint_sha256
from handseg.models.context import stage1_checkpoints

ContextCrops = list[tuple[int, np.ndarray, int, int]]
"""One image's stage-1 map as ``(class, uint8 crop, row0, col0)`` (p * 255, each class's bounding box)."""


def _key(checkpoints: list[Path]) -> str:
    """The cache key of a stage-1 set: its checkpoints' contents."""

    h = hashlib.sha256()
    for digest in sorted(checkpoint_sha256(c) for c in checkpoints):
        h.update(digest.encode())
    return h.hexdigest()[:16]


@dataclass
class ContextSource:
    """Stage-1 maps of training images, by image name (out-of-fold where possible, else cached)."""

    where: dict[str, Path] = field(default_factory=dict)
    """Image name -> its stored map (``predict --probs`` format)."""
    out_of_fold: int = 0
    in_sample: int = 0

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


def build_context(stage1_runs: list[Path], samples: list, cache_root: Path, device: str = "auto", batch: int = 4,
                  log=print) -> ContextSource:
    """Stage-1 context for every sample: out-of-fold maps from the stage-1 runs' ``oof/`` folders where
    one holds the image, else the stage-1 models' mean, predicted once and cached in ``cache_root``.

    Raises:
        HandsegError: a stage-1 run is missing, or two of its folds hold the same image.
    """

    checkpoints = stage1_checkpoints(stage1_runs)
    source = ContextSource()
    for run in stage1_runs:
        oof = Path(run) / OOF_DIR
        if not (oof / "manifest.json").is_file():
            continue
        for name in read_probs_index(oof):
            if name in source.where:
                raise HandsegError(f"two stage-1 folds hold out {name} ({source.where[name].parent} and {oof})", run)
            source.where[name] = oof / probs_name(name)
    wanted = [s for s in samples if s.name not in source.where]
    source.out_of_fold = len(samples) - len(wanted)
    if wanted:
        folder = Path(cache_root) / "context" / _key(checkpoints)
        cached = set(read_probs_index(folder)) if (folder / "index.json").is_file() else set()
        missing = [s for s in wanted if s.name not in cached]
        if missing:

            log(f"stage-1 context: {len(missing)} images that no stage-1 fold held out are predicted by the mean of "
                f"{len(checkpoints)} stage-1 models (once; cached in {folder})")
            with atomic_dir(folder, overwrite=True) as tmp:  # built beside the old cache, then swapped in
                run_predictions(checkpoints, Path("."), tmp / "context.csv", tmp,
                                PredictConfig(device=device, batch=batch), samples=missing, distributed=False)
                for name in cached:  # keep what was cached before
                    os.link(folder / probs_name(name), tmp / probs_name(name))
                atomic_write_json(tmp / "index.json", {"images": sorted(cached | {s.name for s in missing})})
        for s in wanted:
            source.where[s.name] = folder / probs_name(s.name)
        source.in_sample = len(wanted)
    return source


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


