"""Training samples: the fold's items, augmentation presets, and samples made from bone crops.

Data comes from the prep cache when there is one (``DATA/cache`` or ``--cache``; checked against
its sources before training starts), else from PNG + JSON. The 29 masks travel bit-packed (4 bytes
a pixel) through augmentation, collation and the copy to the device.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data import cache as cache_mod
from handseg.data.anatomy import hand_side
from handseg.data.cache import check_cache_fresh, find_cache, mask_path
from handseg.data.images import image_size, read_image, resize_image
from handseg.data.kfold import make_splits, read_splits
from handseg.data.labels import BoneCrops, place_crops, polygon_crops, read_polygons
from handseg.data.layout import Sample, discover, resolve_data
from handseg.data.preprocess import preprocess_image
from handseg.data.roi import crops_bounds, crops_in_box, cut_box, jittered_box, roi_box, roi_indices
from handseg.formats.files import MANIFEST_NAME, read_json
from handseg.inference.cascade import render_context
from handseg.models.plan import DEFAULT_NORM
from handseg.training.config import AUGMENT_PRESETS, TrainConfig

NOISE_STD = (0.01, 0.03)
"""Gaussian noise of the ``strong`` preset as a fraction of 255: 2.5-7.6 grey levels, about the
quantum noise of a hand radiograph (albumentations' default, 0.2-0.44, is 50-110 grey levels)."""


def augmenter(preset: str, unify_hands: bool, context: bool = False):
    """The albumentations pipeline of a preset (``None`` for ``none``).

    Geometric transforms move masks with nearest-neighbour interpolation, so bit-packed masks stay
    exact. With ``context`` a cascade's stage-1 maps travel as a second mask target (``context``):
    moved with the image, never brightened.
    """
    import albumentations as A

    if preset not in AUGMENT_PRESETS:
        raise HandsegError(f"unknown augmentation preset {preset!r}; valid: {', '.join(AUGMENT_PRESETS)}")
    if preset == "none":
        return None
    targets = {"additional_targets": {"context": "mask"}} if context else {}
    # a flip would undo --unify-hands (it turns a right hand into a left one)
    flip = [] if unify_hands else [A.HorizontalFlip(p=0.5)]
    light = [A.RandomBrightnessContrast(0.15, 0.15, p=0.5)]
    if preset == "light":
        return A.Compose(flip + light, **targets)
    ops = flip + [
        A.Affine(rotate=(-10, 10), scale=(0.92, 1.08), translate_percent=(-0.03, 0.03), p=0.6, border_mode=0),
        A.RandomBrightnessContrast(0.2, 0.2, p=0.6),
        A.RandomGamma((80, 120), p=0.4),
        A.CLAHE(clip_limit=2.0, p=0.3),
    ]
    if preset == "strong":
        ops += [A.ElasticTransform(alpha=20, sigma=6, p=0.2), A.GaussNoise(std_range=NOISE_STD, p=0.2)]
    return A.Compose(ops, **targets)


@dataclass(frozen=True)
class Item:
    """A labelled sample and the prep cache that holds it (``None``: decode PNG + JSON)."""

    sample: Sample
    cache: Path | None


def load_item_crops(item: Item) -> tuple[np.ndarray, BoneCrops]:
    """``(image (H, W) uint8, bone crops)`` from the cache if there, else PNG + JSON; no full-size
    mask is made."""

    cached = item.cache is not None
    if cached and cache_mod.image_path(item.cache, item.sample).is_file():
        image = np.asarray(cache_mod.load_cached_image(item.cache, item.sample))
    else:
        image = read_image(item.sample.image_path)
    if not cached or not cache_mod.mask_path(item.cache, item.sample).is_file():
        return image, polygon_crops(read_polygons(item.sample.label_path), image.shape, item.sample.label_path)
    shape, crops = cache_mod.load_cached_crops(item.cache, item.sample)
    if image.shape != tuple(shape):
        raise HandsegError(f"cached masks are {shape[1]}x{shape[0]} but the image is "
                           f"{image.shape[1]}x{image.shape[0]}; re-run prep", item.sample.image_path)
    return image, crops


def load_item(item: Item) -> tuple[np.ndarray, np.ndarray]:
    """``(image (H, W) uint8, masks (29, H, W) bool)``, as :func:`load_item_crops` finds them."""
    image, crops = load_item_crops(item)
    return image, place_crops(crops, image.shape)


def _aligned_span(a0: int, a1: int, src: int, dst: int) -> tuple[int, int, int, int]:
    """The target span ``[t0, t1)`` that a source span ``[a0, a1)`` touches when ``src`` pixels are
    resized to ``dst``, widened until both ends fall on source pixel edges, and the source span
    ``[s0, s1)`` it maps from. Resizing that source span alone gives exactly those target pixels."""
    g = math.gcd(src, dst)
    p, q = dst // g, src // g  # target pixel t starts at source pixel t * q / p
    first, last = a0 * dst // src, -((-a1 * dst) // src)  # floor and ceil
    t0 = first // p * p
    t1 = min(dst, -((-last) // p) * p)
    return t0, t1, t0 * q // p, t1 * q // p


MASK_BYTES = (NUM_CLASSES + 7) // 8
"""Training masks travel bit-packed: class ``c`` is bit ``7 - c % 8`` of byte ``c // 8`` (the order
of ``np.packbits``), 4 bytes a pixel instead of 29, through augmentation, collation and the copy to
the device, where :func:`unpack_mask_bits` opens them."""


def render_masks(crops: BoneCrops, shape: tuple[int, int], size: int | None = None,
                 window: tuple[int, int, int] | None = None) -> np.ndarray:
    """Bone crops to ``(S, S, 4)`` uint8 bit-packed training masks (see :data:`MASK_BYTES`),
    touching only the bones.

    ``size``: the whole image resized to ``S x S`` (area-average, then pixels at least half bone),
    equal to resizing each full-size mask. ``window=(row, col, S)``: an ``S x S`` window of the
    full-resolution masks (outside the image is background).
    """
    import cv2

    height, width = shape
    side = window[2] if window is not None else size
    out = np.zeros((side, side, MASK_BYTES), dtype=np.uint8)
    for c, crop, r0, c0 in crops:
        h, w = crop.shape
        byte, bit = c // 8, np.uint8(7 - c % 8)
        if window is not None:
            wr, wc, _ = window
            i0, i1 = max(r0, wr), min(r0 + h, wr + side)
            j0, j1 = max(c0, wc), min(c0 + w, wc + side)
            if i0 < i1 and j0 < j1:
                part = crop[i0 - r0 : i1 - r0, j0 - c0 : j1 - c0].view(np.uint8)
                out[i0 - wr : i1 - wr, j0 - wc : j1 - wc, byte] |= part << bit
            continue
        t0, t1, s0, s1 = _aligned_span(r0, r0 + h, height, size)
        u0, u1, v0, v1 = _aligned_span(c0, c0 + w, width, size)
        region = np.zeros((s1 - s0, v1 - v0), dtype=np.uint8)
        region[r0 - s0 : r0 - s0 + h, c0 - v0 : c0 - v0 + w] = crop.view(np.uint8) * np.uint8(255)
        if region.shape != (t1 - t0, u1 - u0):
            region = cv2.resize(region, (u1 - u0, t1 - t0), interpolation=cv2.INTER_AREA)
        out[t0:t1, u0:u1, byte] |= (region > 127).view(np.uint8) << bit
    return out


def unpack_mask_bits(packed):
    """``(N, S, S, 4)`` uint8 bit-packed masks (a tensor, on any device) -> ``(N, 29, S, S)`` float."""
    import torch

    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (N, S, S, 4, 8)
    n, h, w = packed.shape[:3]
    return bits.reshape(n, h, w, MASK_BYTES * 8)[..., :NUM_CLASSES].permute(0, 3, 1, 2).float()


def _flip_crops(crops: BoneCrops, width: int) -> BoneCrops:
    return [(c, crop[:, ::-1], r0, width - c0 - crop.shape[1]) for c, crop, r0, c0 in crops]


FOREGROUND_SHARE = 0.5
"""Crops centred on a bone pixel (the rest land uniformly on the canvas): a 1024 px window of a
2048 px X-ray otherwise often shows mostly background (nnU-Net oversamples foreground the same way)."""


class SegmentationDataset:
    """Training samples: ``(image (C, S, S) float32, masks (S, S, 4) uint8 bit-packed)`` tensors.

    The masks are made from the bones' crops, never at full size, and stay bit-packed through
    augmentation and the copy to the device. The image is resized with
    :func:`~handseg.data.images.resize_image`, the resize that prediction uses too. With ``context`` (a
    cascade's stage 2) the 29 stage-1 maps of the window follow the image as extra channels.
    """

    def __init__(self, items: list[Item], cfg: TrainConfig, train: bool = True, in_channels: int = 1,
                 seed: int | None = None, context=None):
        self.items, self.cfg, self.train, self.in_channels = items, cfg, train, in_channels
        self.context = context
        self.augment = augmenter(cfg.augment, cfg.unify_hands, context is not None) if train else None
        self.reseed(cfg.seed if seed is None else seed)

    def reseed(self, seed: int) -> None:
        """Seed the random crops and the augmentations. Each DataLoader worker calls this with its
        own seed: a forked worker would otherwise repeat the parent's random stream (albumentations
        keeps its own generator, untouched by ``np.random.seed``)."""
        self.rng = np.random.default_rng(seed)
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __len__(self) -> int:
        return len(self.items)

    def window(self, shape: tuple[int, int], crops: BoneCrops, side: int) -> tuple[int, int]:
        """The top-left corner of a training crop: centred near a random bone pixel (a share
        :data:`FOREGROUND_SHARE` of the time, when training), else uniform over the image."""
        h, w = shape
        if self.train and crops and self.rng.random() < FOREGROUND_SHARE:
            _, bone, r0, c0 = crops[int(self.rng.integers(len(crops)))]
            ys, xs = np.nonzero(bone)
            if ys.size:
                k = int(self.rng.integers(ys.size))
                r = r0 + int(ys[k]) - int(self.rng.integers(side))
                c = c0 + int(xs[k]) - int(self.rng.integers(side))
                return min(max(r, 0), max(h - side, 0)), min(max(c, 0), max(w - side, 0))
        return int(self.rng.integers(0, max(h - side, 0) + 1)), int(self.rng.integers(0, max(w - side, 0) + 1))

    def _roi_sample(self, item: Item, image: np.ndarray, crops: BoneCrops, mirrored: bool):
        """A ROI model's sample: the box around its classes from the labels (jittered when training; the
        whole image when the image has none of them), cut from the full-resolution image and resized to
        ``--size``, with its masks and stage-1 context."""
        import cv2

        s = self.cfg.size
        bounds = crops_bounds(crops, roi_indices(self.cfg.roi)) or (0, image.shape[0], 0, image.shape[1])
        box = (jittered_box(bounds, self.cfg.roi_margin, self.rng) if self.train
               else roi_box(bounds, self.cfg.roi_margin))
        ctx = None
        if self.context is not None:
            ctx = render_context(self.context.crops(item.sample.name), box, image.shape[1] if mirrored else None)
            ctx = cv2.resize(ctx, (s, s), interpolation=cv2.INTER_LINEAR)  # bilinear, as prediction resizes it
            ctx = ctx[..., None] if ctx.ndim == 2 else ctx
        side = box[2]
        hwc = render_masks(crops_in_box(crops, box), (side, side), size=s)
        return resize_image(cut_box(image, box), (s, s)), hwc, ctx

    def __getitem__(self, index: int):
        import torch

        item = self.items[index]
        image, crops = load_item_crops(item)
        mirrored = False
        if self.cfg.unify_hands and hand_side(crops=crops) == "left":
            mirrored = True
            image, crops = image[:, ::-1], _flip_crops(crops, image.shape[1])
        # the fixed pre-processing the card records, at full resolution before any crop or resize, as predict does
        image = preprocess_image(image, self.cfg.preprocess)
        ctx = None
        if self.cfg.crop:
            crop = self.cfg.crop
            r, c = self.window(image.shape, crops, crop)
            window = np.zeros((crop, crop), dtype=np.uint8)
            part = image[r : r + crop, c : c + crop]
            window[: part.shape[0], : part.shape[1]] = part
            if self.context is not None:
                ctx = render_context(self.context.crops(item.sample.name), (r, c, crop),
                                     image.shape[1] if mirrored else None)
            image, hwc = window, render_masks(crops, image.shape, window=(r, c, crop))
        elif self.cfg.roi:
            image, hwc, ctx = self._roi_sample(item, image, crops, mirrored)
        else:
            s = self.cfg.size
            hwc = render_masks(crops, image.shape, size=s)
            image = resize_image(image, (s, s))
        if self.augment is not None:
            out = self.augment(image=image, mask=hwc, **({"context": ctx} if ctx is not None else {}))
            image, hwc, ctx = out["image"], out["mask"], out.get("context", ctx)
        x = torch.from_numpy(np.require(image, np.uint8, ['C', 'W'])).float().div_(255.0)
        channels = self.in_channels - (0 if ctx is None else ctx.shape[-1])
        x = ((x - DEFAULT_NORM["mean"]) / DEFAULT_NORM["std"]).expand(channels, *x.shape)
        if ctx is not None:
            x = torch.cat([x, torch.from_numpy(np.ascontiguousarray(ctx.transpose(2, 0, 1))).float().div_(255.0)])
        return x.clone(), torch.from_numpy(np.ascontiguousarray(hwc))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy, random and the data set's own generators from the
    worker's torch seed (which differs per worker and derives from the loader's seeded generator)."""
    import torch
    from torch.utils.data import get_worker_info

    # torch's worker loop already runs one intra-op thread; OpenCV's pool is not reconfigured in a forked
    # worker (its threads did not survive the fork, and resizing that pool there can deadlock)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def split_items(cfg: TrainConfig) -> tuple[list[Item], list[Item]]:
    """Train and validation items for the fold (``--fold -1``: everything is train, no validation).

    The prep cache is checked against its sources (a label edited since ``prep`` is an error naming
    it), and every ``--extra`` folder must be a complete data set (a pseudo-label folder with its
    manifest marked complete, or a labelled folder).

    Raises:
        HandsegError: the splits do not match the data, a cache is stale, or an extra folder is incomplete.
    """

    data = resolve_data(cfg.data, "train").root
    samples = discover(data, labels="required")
    cache = find_cache(data, cfg.cache)
    usable = check_cache_fresh(cache, samples) if cache is not None else set()
    if cfg.splits is not None:
        splits = read_splits(cfg.splits)
    elif cfg.fold < 0:  # everything is train: no folds needed (nor enough patients for them)
        splits = {"n_folds": 0, "images": [{"path": s.rel, "fold": -2} for s in samples]}
    else:
        splits = make_splits(data, n_folds=5, seed=cfg.seed)
    fold_of = {im["path"]: im["fold"] for im in splits["images"]}
    if cfg.fold >= splits["n_folds"]:
        n = splits["n_folds"]
        raise HandsegError(f"--fold {cfg.fold} but the splits have {n} folds (0..{n - 1})")
    missing = [s.rel for s in samples if s.rel not in fold_of]
    if missing:
        raise HandsegError(f"{len(missing)} images are not in the splits (e.g. {missing[0]}); re-run kfold",
                           cfg.splits)
    train = [Item(s, cache if s.rel in usable else None) for s in samples if fold_of[s.rel] != cfg.fold]
    val = [Item(s, cache if s.rel in usable else None) for s in samples if fold_of[s.rel] == cfg.fold]
    for extra in cfg.extra:
        check_extra_complete(extra)
        if cfg.splits is not None and cfg.fold >= 0:
            check_extra_origin(extra, cfg.fold, cfg.splits)
        extra_samples = discover(extra, labels="required")
        extra_cache = find_cache(extra)
        extra_usable = check_cache_fresh(extra_cache, extra_samples) if extra_cache is not None else set()
        train += [Item(s, extra_cache if s.rel in extra_usable else None) for s in extra_samples]
    check_labels([i for i in train + val if i.cache is None or not cache_has_masks(i)])
    if not train:
        raise HandsegError("no training images left after taking out the validation fold")
    names = [i.sample.name for i in val]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise HandsegError(f"two validation images share the basename {dup}: the fold's out-of-fold maps and CSV "
                           "rows could not tell them apart; rename them", data)
    return train, val


def cache_has_masks(item: Item) -> bool:

    return item.cache is not None and mask_path(item.cache, item.sample).is_file()


def check_labels(items: list[Item]) -> None:
    """Read every label that no cache holds, before training starts: a bad label file is its one-line
    error now, not in the middle of an epoch."""

    for item in items:
        polygon_crops(read_polygons(item.sample.label_path), image_size(item.sample.image_path),
                      item.sample.label_path)


def check_extra_complete(folder: Path) -> None:
    """An ``--extra`` folder made by ``handseg pseudo`` must carry its manifest marked complete (a
    crashed run leaves none: it is built beside its destination and moved into place at the end)."""

    folder = Path(folder)
    if not folder.is_dir():
        raise HandsegError("--extra folder not found", folder)
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        doc = read_json(manifest, "manifest")
        if isinstance(doc, dict) and doc.get("stage") == "pseudo" and doc.get("complete") is not True:
            raise HandsegError("pseudo-label set is incomplete (its manifest is not marked complete); "
                               "re-run `handseg pseudo`", folder)
        return
    if (folder / "cache").is_dir() or not (folder / "outputs_json").is_dir():
        raise HandsegError("not a complete data set: no manifest.json (a pseudo-label folder is complete "
                           "only once `handseg pseudo` has finished)", folder)


def check_extra_origin(folder: Path, fold: int, splits: Path) -> None:
    """Pseudo labels for ``--fold K`` must come from models that held fold K out (fold K's own runs, with
    these splits): a model that trained on fold K's validation images leaks them into its labels.

    Raises:
        HandsegError: the pseudo-label set does not record its runs, or one of them trained on fold K.
    """

    import hashlib

    manifest = Path(folder) / MANIFEST_NAME
    doc = read_json(manifest, "manifest") if manifest.is_file() else None
    if not (isinstance(doc, dict) and doc.get("stage") == "pseudo"):
        return  # a labelled data set, not pseudo labels
    made_by = doc.get("made_by")
    if not isinstance(made_by, list) or not made_by:
        raise HandsegError(f"the pseudo labels do not record which runs made them, so they may have seen fold {fold}'s "
                           f"validation images; make them from fold {fold}'s own predictions (predict RUN_f{fold} "
                           "with its manifest, then `handseg pseudo`)", folder)
    wanted = hashlib.sha256(Path(splits).read_bytes()).hexdigest()
    for entry in made_by:
        run = entry.get("run") if isinstance(entry, dict) else entry
        used = entry.get("splits") if isinstance(entry, dict) else None
        same = (isinstance(used, str) and Path(used).is_file()
                and hashlib.sha256(Path(used).read_bytes()).hexdigest() == wanted)
        if not (isinstance(entry, dict) and entry.get("fold") == fold and same):
            held = entry.get("fold") if isinstance(entry, dict) else None
            why = (f"was trained with --fold {held}" if held is not None and same else
                   "was not trained with these splits" if held is not None else "does not say which fold it held out")
            raise HandsegError(f"the pseudo labels were made by {run}, which {why}, so it trained on fold {fold}'s "
                               f"validation images; make them with fold {fold}'s own model (as "
                               "examples/pseudo_round.sh does)", folder)
