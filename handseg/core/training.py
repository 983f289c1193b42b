"""Training: one loop for CPU, one GPU or many (torchrun / DDP), resumable, self-describing.

Data comes from the prep cache when there is one (``DATA/cache`` or ``--cache``), else from PNG +
JSON. Validation runs on the fold at each image's full size with the leaderboard Dice.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from handseg.core.checkpoint import BEST, LAST, RESUME, ModelCard, save_checkpoint, unwrap
from handseg.core.constants import CLASSES, NUM_CLASSES
from handseg.core.data import (
    BoneCrops,
    Sample,
    discover,
    hand_side,
    place_crops,
    polygon_crops,
    read_image,
    read_polygons,
)
from handseg.core.distributed import Dist, all_reduce_sum, broadcast_buffers, setup_distributed, shutdown
from handseg.core.errors import HandsegError
from handseg.core.files import atomic_open, write_manifest
from handseg.core.models import DEFAULT_NORM

AUGMENT_PRESETS = ("none", "light", "default", "strong")


@dataclass
class TrainConfig:
    """Every option of ``handseg train``; saved with the run."""

    data: Path = Path("data/train")
    splits: Path | None = None
    fold: int = 0
    arch: str = "unetplusplus"
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"
    size: int = 1024
    crop: int | None = None
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "bce:0.5,dice:0.5"
    class_weights: list[float] | None = None
    augment: str = "default"
    unify_hands: bool = False
    val_every: int = 1
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    accum: int = 1
    workers: int = 4
    device: str = "auto"
    out: Path = Path("runs/run")
    resume: bool = False
    extra: list[Path] = field(default_factory=list)
    cache: Path | None = None
    seed: int = 0
    max_steps: int | None = None
    logger: str = "none"

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "extra" else v)
                for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# data


def _augmenter(preset: str, unify_hands: bool):
    import albumentations as A

    if preset not in AUGMENT_PRESETS:
        raise HandsegError(f"unknown augmentation preset {preset!r}; valid: {', '.join(AUGMENT_PRESETS)}")
    if preset == "none":
        return None
    # a flip would undo --unify-hands (it turns a right hand into a left one)
    flip = [] if unify_hands else [A.HorizontalFlip(p=0.5)]
    light = [A.RandomBrightnessContrast(0.15, 0.15, p=0.5)]
    if preset == "light":
        return A.Compose(flip + light)
    ops = flip + [
        A.Affine(rotate=(-10, 10), scale=(0.92, 1.08), translate_percent=(-0.03, 0.03), p=0.6, border_mode=0),
        A.RandomBrightnessContrast(0.2, 0.2, p=0.6),
        A.RandomGamma((80, 120), p=0.4),
        A.CLAHE(clip_limit=2.0, p=0.3),
    ]
    if preset == "strong":
        ops += [A.ElasticTransform(alpha=20, sigma=6, p=0.2), A.GaussNoise(p=0.2)]
    return A.Compose(ops)


@dataclass(frozen=True)
class Item:
    sample: Sample
    cache: Path | None


def load_item_crops(item: Item) -> tuple[np.ndarray, BoneCrops]:
    """``(image (H, W) uint8, bone crops)`` from the cache if there, else PNG + JSON; no full-size
    mask is made."""
    from handseg.core import cache as cache_mod

    if item.cache is None or not cache_mod.mask_path(item.cache, item.sample).is_file():
        image = read_image(item.sample.image_path)
        return image, polygon_crops(read_polygons(item.sample.label_path), image.shape)
    shape, crops = cache_mod.load_cached_crops(item.cache, item.sample)
    if cache_mod.image_path(item.cache, item.sample).is_file():
        image = np.asarray(cache_mod.load_cached_image(item.cache, item.sample))
    else:
        image = read_image(item.sample.image_path)
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


class SegmentationDataset:
    """Training samples: ``(image (C, S, S) float32, masks (S, S, 4) uint8 bit-packed)`` tensors.

    The masks are made from the bones' crops, never at full size, and stay bit-packed through
    augmentation (its geometric transforms use nearest-neighbour interpolation for masks, which
    moves whole pixels, so packed bits stay exact) and the copy to the device.
    """

    def __init__(self, items: list[Item], cfg: TrainConfig, train: bool = True, in_channels: int = 1,
                 seed: int | None = None):
        self.items, self.cfg, self.train, self.in_channels = items, cfg, train, in_channels
        self.augment = _augmenter(cfg.augment, cfg.unify_hands) if train else None
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

    def __getitem__(self, index: int):
        import cv2
        import torch

        image, crops = load_item_crops(self.items[index])
        if self.cfg.unify_hands and hand_side(crops=crops) == "left":
            image, crops = image[:, ::-1], _flip_crops(crops, image.shape[1])
        if self.cfg.crop:
            crop = self.cfg.crop
            h, w = image.shape
            r = int(self.rng.integers(0, max(h - crop, 0) + 1))
            c = int(self.rng.integers(0, max(w - crop, 0) + 1))
            window = np.zeros((crop, crop), dtype=np.uint8)
            part = image[r : r + crop, c : c + crop]
            window[: part.shape[0], : part.shape[1]] = part
            image, hwc = window, render_masks(crops, image.shape, window=(r, c, crop))
        else:
            s = self.cfg.size
            hwc = render_masks(crops, image.shape, size=s)
            image = cv2.resize(np.ascontiguousarray(image), (s, s), interpolation=cv2.INTER_AREA)
        if self.augment is not None:
            out = self.augment(image=image, mask=hwc)
            image, hwc = out["image"], out["mask"]
        x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)
        x = ((x - DEFAULT_NORM["mean"]) / DEFAULT_NORM["std"]).expand(self.in_channels, *x.shape).clone()
        return x, torch.from_numpy(np.ascontiguousarray(hwc))


def split_items(cfg: TrainConfig) -> tuple[list[Item], list[Item]]:
    """Train and validation items for the fold (``--fold -1``: everything is train, no validation)."""
    from handseg.core.cache import find_cache
    from handseg.core.kfold import make_splits, read_splits

    samples = discover(cfg.data, labels="required")
    cache = find_cache(cfg.data, cfg.cache)
    if cfg.splits is not None:
        splits = read_splits(cfg.splits)
    elif cfg.fold < 0:  # everything is train: no folds needed (nor enough patients for them)
        splits = {"n_folds": 0, "images": [{"path": s.rel, "fold": -2} for s in samples]}
    else:
        splits = make_splits(cfg.data, n_folds=5, seed=cfg.seed)
    fold_of = {im["path"]: im["fold"] for im in splits["images"]}
    if cfg.fold >= splits["n_folds"]:
        n = splits["n_folds"]
        raise HandsegError(f"--fold {cfg.fold} but the splits have {n} folds (0..{n - 1})")
    missing = [s.rel for s in samples if s.rel not in fold_of]
    if missing:
        raise HandsegError(f"{len(missing)} images are not in the splits (e.g. {missing[0]}); re-run kfold",
                           cfg.splits)
    train = [Item(s, cache) for s in samples if fold_of[s.rel] != cfg.fold]
    val = [Item(s, cache) for s in samples if fold_of[s.rel] == cfg.fold]
    for extra in cfg.extra:
        extra_cache = find_cache(extra)
        train += [Item(s, extra_cache) for s in discover(extra, labels="required")]
    if not train:
        raise HandsegError("no training images left after taking out the validation fold")
    return train, val


# ----------------------------------------------------------------------------------------------
# validation


def validate(model, card: ModelCard, items: list[Item], device: str, dtype, d: Dist) -> np.ndarray:
    """Leaderboard Dice per class over the validation items, at each image's full size: ``(29,)``.

    Predictions go through :class:`~handseg.core.inference.Predictor`, exactly as ``predict`` makes
    them (with ``unify_hands``, the hand's side comes from the prediction, never from the labels).
    """
    import torch

    from handseg.core.inference import Predictor, binarize
    from handseg.core.metrics import dice_masks

    model.eval()
    predictor = Predictor([model], [card], device, dtype)
    sums = torch.zeros(NUM_CLASSES + 1, dtype=torch.float64, device=device)
    for item in items[d.rank :: d.world]:
        image, masks = load_item(item)
        pred = binarize(predictor.probs(image).cpu().numpy(), card.thresholds)
        sums[:NUM_CLASSES] += torch.from_numpy(dice_masks(masks, pred)).to(device)
        sums[NUM_CLASSES] += 1
    all_reduce_sum(sums, d)
    model.train()
    count = max(float(sums[NUM_CLASSES]), 1.0)
    return (sums[:NUM_CLASSES] / count).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# the loop


def _resolve_amp(amp: str, device: str):
    import torch

    if amp not in ("auto", "bf16", "fp16", "off"):
        raise HandsegError(f"unknown --amp {amp!r}; valid: auto, bf16, fp16, off")
    if amp == "off" or (amp == "auto" and not device.startswith("cuda")):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (device.startswith("cuda") and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _lr_lambda(total_steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


METRIC_FIELDS = ["epoch", "step", "train_loss", "lr", "images_per_s", "seconds", "data_wait", "val_dice", *CLASSES]
"""``data_wait``: the share of the epoch the loop spent waiting for the DataLoader."""
SYNC_EVERY = 10
"""Steps between the host's waits for the device (loss check, progress)."""
DATA_WAIT_HINT = 0.2


def train(cfg: TrainConfig, log=print, progress_factory=None) -> dict:
    """Train a model as configured; returns ``{"best_dice", "last_dice", "epochs", "steps", "out"}``.

    Raises:
        HandsegError: bad options, unreadable data, or a NaN loss.
    """
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from handseg.core.inference import pick_device
    from handseg.core.losses import build_loss
    from handseg.core.models import build_model, resolve_arch, resolve_encoder

    device = pick_device(cfg.device)
    d = setup_distributed(device)  # pick_device already gave each torchrun process its own GPU
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise HandsegError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.size % 32 or (cfg.crop and cfg.crop % 32):
        raise HandsegError("--size and --crop must be multiples of 32")
    arch, encoder = resolve_arch(cfg.arch), resolve_encoder(cfg.encoder)
    loss_fn = build_loss(cfg.loss, torch.tensor(cfg.class_weights, dtype=torch.float32)
                         if cfg.class_weights else None)
    if cfg.class_weights and len(cfg.class_weights) != NUM_CLASSES:
        raise HandsegError(f"--class-weights needs {NUM_CLASSES} numbers, got {len(cfg.class_weights)}")
    train_items, val_items = split_items(cfg)
    seed = cfg.seed + d.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(cfg.seed)

    out = Path(cfg.out)
    resume_path = out / RESUME
    if d.main:
        if out.exists() and (out / LAST).exists() and not cfg.resume:
            raise HandsegError("run folder already has a checkpoint; pass --resume to continue it or "
                               "choose another --out", out)
    if cfg.resume and not resume_path.is_file():
        raise HandsegError(f"nothing to resume: no {RESUME}", out)

    model = build_model(arch, encoder, cfg.encoder_weights, size=cfg.crop or cfg.size,
                        size_flag="--crop" if cfg.crop else "--size").to(device)
    card = ModelCard(arch=arch, encoder=encoder, size=cfg.size, crop=cfg.crop, norm=dict(DEFAULT_NORM),
                     unify_hands=cfg.unify_hands)
    cuda = device.startswith("cuda")
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = _resolve_amp(cfg.amp, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # each rank its own crops and augmentations (workers reseed from the generator)
    dataset = SegmentationDataset(train_items, cfg, train=True, seed=seed)
    sampler = DistributedSampler(dataset, d.world, d.rank, shuffle=True, seed=cfg.seed) if d.world > 1 else None
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.workers, pin_memory=cuda, drop_last=len(dataset) > cfg.batch_size,
                        persistent_workers=cfg.workers > 0, generator=generator,
                        worker_init_fn=_seed_worker if cfg.workers > 0 else None)
    steps_per_epoch = max(1, len(loader) // cfg.accum)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, min(100, total_steps // 20 + 1)))
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))

    start_epoch, step, best = 0, 0, -1.0
    if cfg.resume:
        from safetensors.torch import load_file

        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(load_file(str(out / LAST), device="cpu"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        log(f"resuming {out} at epoch {start_epoch} (step {step})")

    run_model = model
    if d.world > 1:
        run_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if cuda else None)
    if cfg.compile:
        run_model = torch.compile(run_model)

    # only now: a run that fails to start, or fails before its first checkpoint, leaves no folder
    with _run_folder(out, d.main):
        writer = _make_logger(cfg, out) if d.main else None
        if d.main:
            write_manifest(out, "train", cfg.to_json(), inputs={"data": str(cfg.data), "splits": str(cfg.splits)},
                           train_images=len(train_items), val_images=len(val_items), world_size=d.world)
        metrics_path = out / "metrics.csv"
        last_dice = None
        run_model.train()
        for epoch in range(start_epoch, cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            t0, seen, batches, waited = time.perf_counter(), 0, 0, 0.0
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync a step
            progress = None
            if progress_factory and d.main:
                progress = progress_factory(f"epoch {epoch + 1}/{cfg.epochs}", len(loader))
            optimizer.zero_grad(set_to_none=True)
            batches_iter = iter(loader)
            for i in range(len(loader)):
                t_wait = time.perf_counter()
                x, y = next(batches_iter)
                waited += time.perf_counter() - t_wait
                x = x.to(device, non_blocking=True)
                y = unpack_mask_bits(y.to(device, non_blocking=True))
                if cuda and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                    logits = run_model(x)
                loss = loss_fn(logits.float(), y)
                scaler.scale(loss / cfg.accum).backward()
                if (i + 1) % cfg.accum == 0 or i + 1 == len(loader):
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                seen += x.shape[0]
                loss_sum += loss.detach()
                batches += 1
                stop = bool(cfg.max_steps and step >= cfg.max_steps)
                if batches % SYNC_EVERY == 0 or i + 1 == len(loader) or stop:
                    # the host waits for the device only here, so it can queue the next steps meanwhile
                    mean_loss = float(loss_sum) / batches
                    if not math.isfinite(mean_loss):
                        raise HandsegError(f"loss became {mean_loss} at epoch {epoch + 1}, by step {step}: lower --lr, "
                                           "try --amp off, or check the data")
                    if progress:
                        rate = seen * d.world / max(time.perf_counter() - t0, 1e-9)
                        progress(f"loss {mean_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} img/s")
                elif progress:
                    progress("")
                if stop:
                    break
            if progress:
                progress(None)
            seconds = time.perf_counter() - t0
            counts = torch.tensor([batches, seen, waited], dtype=torch.float64, device=device)
            stats = all_reduce_sum(torch.cat([loss_sum.view(1), counts]), d)
            train_loss = float(stats[0] / max(float(stats[1]), 1))
            images_per_s = float(stats[2]) / max(seconds, 1e-9)
            data_wait = float(stats[3]) / d.world / max(seconds, 1e-9)
            card.epoch, card.step = epoch + 1, step
            last_epoch = epoch + 1 == cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)
            per_class = None
            if val_items and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
                broadcast_buffers(model, d)
                per_class = validate(unwrap(run_model), card, val_items, device, dtype, d)
                last_dice = float(per_class.mean())
            if d.main:
                card.score = last_dice
                save_checkpoint(out / LAST, model, card)
                if per_class is not None and last_dice > best:
                    best = last_dice
                    save_checkpoint(out / BEST, model, card)
                elif not val_items:
                    save_checkpoint(out / BEST, model, card)
                _save_resume(resume_path, optimizer, scheduler, scaler, epoch + 1, step, best)
                row = {"epoch": epoch + 1, "step": step, "train_loss": round(train_loss, 6),
                       "lr": scheduler.get_last_lr()[0], "images_per_s": round(images_per_s, 3),
                       "seconds": round(seconds, 2), "data_wait": round(data_wait, 4),
                       "val_dice": "" if per_class is None else round(last_dice, 6)}
                if per_class is not None:
                    row.update({c: round(float(v), 6) for c, v in zip(CLASSES, per_class)})
                _append_metrics(metrics_path, row)
                if writer:
                    writer(row, step)
                dice_text = f" val dice {last_dice:.4f}" if per_class is not None else ""
                log(f"epoch {epoch + 1}: loss {train_loss:.4f}{dice_text} ({images_per_s:.1f} img/s, {seconds:.1f}s)")
                if data_wait > DATA_WAIT_HINT and cfg.workers < (os.cpu_count() or 1):
                    log(f"  the loop waited for data {data_wait:.0%} of this epoch: more --workers (now {cfg.workers}) "
                        "or `handseg prep` caches would help")
            if cfg.max_steps and step >= cfg.max_steps:
                break
    shutdown(d)
    return {"best_dice": best if best >= 0 else None, "last_dice": last_dice, "epochs": card.epoch,
            "steps": step, "out": str(out)}


@contextlib.contextmanager
def _run_folder(out: Path, main: bool):
    """Create the run folder (rank 0); if the run fails before its first checkpoint, remove it again."""
    created = main and not out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and not (out / LAST).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _seed_worker(worker_id: int) -> None:
    import torch
    from torch.utils.data import get_worker_info

    seed = torch.initial_seed() % 2**32  # differs per worker; derived from the loader's seeded generator
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def _save_resume(path: Path, optimizer, scheduler, scaler, epoch: int, step: int, best: float) -> None:
    import torch

    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "step": step, "best": best, "torch_rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state()}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def _append_metrics(path: Path, row: dict) -> None:
    """Append an epoch's row; a file from another handseg version (other columns) is rewritten with
    today's columns first, so a resumed run keeps one well-formed table."""
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != METRIC_FIELDS:
                old = list(reader)
                with atomic_open(path, "w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(old)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _make_logger(cfg: TrainConfig, out: Path):
    if cfg.logger == "none":
        return None
    if cfg.logger == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise HandsegError("--logger tensorboard needs the tensorboard package (pip install tensorboard)") from None
        tb = SummaryWriter(str(out / "tensorboard"))

        def write(row, step):
            for k, v in row.items():
                if isinstance(v, float | int) and k not in ("epoch", "step"):
                    tb.add_scalar(k, v, step)
            tb.flush()

        return write
    if cfg.logger == "wandb":
        try:
            import wandb
        except ImportError:
            raise HandsegError("--logger wandb needs the wandb package (pip install wandb)") from None
        wandb.init(project="handseg", config=cfg.to_json(), dir=str(out))
        return lambda row, step: wandb.log({k: v for k, v in row.items() if v != ""}, step=step)
    raise HandsegError(f"unknown --logger {cfg.logger!r}; valid: none, tensorboard, wandb")
