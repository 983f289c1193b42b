"""Training throughput: handseg's own loop against the seed notebooks' loop and a data-on-device bound.

    python benchmarks/train_throughput.py --size 1024 --configs unet/resnet34 --workers 14     (on a GPU)
    python benchmarks/train_throughput.py --size 2048 --configs unetplusplus/hrnet_w48 --batch 2 --workers 14
    python benchmarks/train_throughput.py --size 256 --image-size 2048 --configs unet/resnet34 --workers 1 \\
        --baseline-workers 1 --device cpu
    python benchmarks/train_throughput.py --size 64 --image-size 128 --steps 2 --device cpu   (tiny, as tested)

For each model, in one run and on the same synthetic X-rays:

- baseline: the seed notebooks' loop as they ran it: a torch Dataset that decodes each item's PNG
  (cv2.imread) and JSON, rasterises the 29 polygons into full-size masks with cv2.fillPoly and
  resizes image and masks (as the official baseline's XRayDataset does), a DataLoader with
  ``--baseline-workers`` workers (pin_memory on CUDA), fp32, no channels_last, BCE + Dice, AdamW.
  It is timed in its steady state: after the batches its workers prefetched during the first step;
- on-device: random batches already on the device, AMP (bf16 where supported), channels_last, the
  same loss and optimiser: the most any loop can reach ("data already on the GPU");
- handseg: ``handseg.training.train`` itself (the code of ``handseg train``) with its defaults
  (fold 0 of 5 folds validated every epoch, a checkpoint every epoch, the default augmentation, AMP
  and channels_last), from the prep cache with ``--workers`` workers; images/s of its last epoch as
  metrics.csv records it (the first pays for start-up). The share of the train() call's wall time
  spent inside the epochs' training loops (metrics.csv ``seconds``) is reported beside validation
  (``val_seconds``), checkpoint waits (``save_seconds``) and the rest (start-up, data split, ...);
- loader alone: each DataLoader without a model: the images/s its workers can deliver.

The synthetic set is a few rendered patients hard-linked under new names until an epoch of the
training fold holds about ``--steps`` batches (fold 0 keeps a fifth of the patients, as in a
default run). With ``--compile`` the on-device and handseg loops also run under torch.compile.
Peak memory is reported per loop: GPU memory on CUDA, else the main process's host RSS.
The goal: handseg >= 95% of on-device, and >= 90% of a run's wall time inside its training loops.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import memory_kind, peak_gib, reset_peak  # noqa: E402
from bench_loading import baseline_load, baseline_masks_resized  # noqa: E402

CONFIGS = {"unetplusplus/hrnet_w48": 4, "unet/resnet34": 8}
"""The issue's models and their default GPU batch; any other ``arch/encoder`` runs at batch 4 (2 on CPU)."""
BASE_IDS = 5
"""Rendered patients (two hands each): five, so that fold 0 of five folds holds one of them."""
PREFETCH = 2
"""The DataLoader's ``prefetch_factor``: batches each worker prepares ahead."""


class BaselineDataset:
    """The seed notebooks' training set (a map-style torch Dataset): item ``i`` is sample ``i % n``,
    decoded from PNG + JSON, its 29 polygons rasterised at full size, image and masks resized.

    Items: ``(image (1, S, S) float32 in [0, 1], masks (29, S, S) uint8)``.
    """

    def __init__(self, samples: list, size: int, length: int):
        self.samples, self.size, self.length = samples, size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        import torch

        s = self.samples[index % len(self.samples)]
        image, masks = baseline_load(s.image_path, s.label_path)
        image = cv2.resize(image, (self.size, self.size)).astype(np.float32) / 255.0
        return torch.from_numpy(image)[None], torch.from_numpy(baseline_masks_resized(masks, self.size))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _warmup_batches(workers: int) -> int:
    """Batches to skip before timing a DataLoader: the first, and every batch the workers may have
    prefetched meanwhile, so the timed stretch is the loader's steady state."""
    return 1 + PREFETCH * workers


def _steps(model, batches, device: str, dtype, channels_last: bool, steps: int, warmup: int = 1) -> float:
    """images/s of ``steps`` optimiser steps after ``warmup`` untimed ones."""
    import torch

    from handseg.models.losses import build_loss

    loss_fn = build_loss("bce:0.5,dice:0.5")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen, t0 = 0, 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            t0, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += x.shape[0]
        if i + 1 >= warmup + steps:
            break
    _sync(device)
    return seen / (time.perf_counter() - t0)


def baseline_loader(samples, size: int, batch: int, workers: int, batches: int, device: str):
    """The seed notebooks' DataLoader: ``batches`` shuffled batches of :class:`BaselineDataset`."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator()
    generator.manual_seed(0)
    return DataLoader(BaselineDataset(samples, size, batches * batch), batch_size=batch, shuffle=True,
                      num_workers=workers, pin_memory=device.startswith("cuda"), drop_last=True, generator=generator)


def handseg_loader(items, cfg, device: str, batches: int):
    """handseg's training DataLoader as ``train`` builds it, over enough copies of ``items``."""
    import torch
    from torch.utils.data import DataLoader

    from handseg.training.dataset import SegmentationDataset, seed_worker

    generator = torch.Generator()
    generator.manual_seed(0)
    copies = max(1, -(-batches * cfg.batch_size // len(items)))
    return DataLoader(SegmentationDataset(items * copies, cfg, train=True), batch_size=cfg.batch_size, shuffle=True,
                      num_workers=cfg.workers, pin_memory=device.startswith("cuda"), drop_last=True,
                      generator=generator, worker_init_fn=seed_worker if cfg.workers else None)


def _loader_rate(loader, steps: int, warmup: int) -> float:
    """Images/s a DataLoader alone delivers, timed over ``steps`` batches after ``warmup``."""
    seen, t0 = 0, 0.0
    for i, (x, _) in enumerate(loader):
        if i == warmup:
            t0, seen = time.perf_counter(), 0
        seen += x.shape[0]
        if i + 1 >= warmup + steps:
            break
    return seen / (time.perf_counter() - t0)


def mask_agreement(samples, items, size: int) -> float:
    """Mean Dice between the baseline's and handseg's training masks of the same images (no
    augmentation): both loops learn the same task. They differ only at bone edges (nearest-neighbour
    resize against area-average, then at least half bone)."""
    import torch

    from handseg.analysis.metrics import dice_masks
    from handseg.training.dataset import load_item_crops, render_masks, unpack_mask_bits

    scores = []
    for s, item in zip(samples, items):
        base = baseline_masks_resized(baseline_load(s.image_path, s.label_path)[1], size).astype(bool)
        image, crops = load_item_crops(item)
        packed = torch.from_numpy(render_masks(crops, image.shape, size=size))[None]
        scores.append(dice_masks(base, unpack_mask_bits(packed)[0].bool().numpy()).mean())
    return float(np.mean(scores))


def make_data(root: Path, image_size: int, train_images: int, workers: int) -> Path:
    """A labelled folder of at least ``train_images / 0.8`` images with its prep cache.

    :data:`BASE_IDS` patients are rendered; the set is then grown by hard-linking their files under
    new patient folders and names (``C1ID001/image..._c1.png``): decoding, caching and training
    cost the same per image, and rendering thousands of X-rays would cost minutes.
    """
    from handseg.data.cache import build_cache, default_workers
    from handseg.data.synth import make_dataset

    make_dataset(root, ids=BASE_IDS, test_ids=0, size=image_size, seed=0)
    train = root / "train"
    base = sorted((train / "DCM").glob("*/*.png"))
    copies = max(1, math.ceil(train_images / 0.8 / len(base)))
    for k in range(1, copies):
        for png in base:
            pid = png.parent.name
            label = train / "outputs_json" / pid / f"{png.stem}.json"
            for src, sub, ext in ((png, "DCM", ".png"), (label, "outputs_json", ".json")):
                dest = train / sub / f"C{k}{pid}" / f"{png.stem}_c{k}{ext}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dest)
    for kind in ("masks", "images"):
        build_cache(kind, train, train / "cache", workers=max(1, min(workers, default_workers())))
    os.sync()  # the cache reaches the disk now, not during the timed loops
    return train


def run(size: int, steps: int, device: str, compile_too: bool, configs: list[str], batch: int | None,
        workers: int, image_size: int = 2048, baseline_workers: int | None = None, epochs: int = 2) -> list[dict]:
    import torch

    from handseg.data.cache import find_cache
    from handseg.data.layout import discover
    from handseg.inference.runtime import pick_device, resolve_amp
    from handseg.models.build import build_model
    from handseg.training.config import TrainConfig
    from handseg.training.dataset import Item
    from handseg.training.loop import train

    device = pick_device(device)
    cuda = device.startswith("cuda")
    baseline_workers = workers if baseline_workers is None else baseline_workers
    batches = {name: batch or (CONFIGS.get(name, 4) if cuda else 2) for name in configs}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = make_data(Path(tmp) / "data", image_size, steps * max(batches.values()), workers)
        samples = discover(train_dir, labels="required")
        items = [Item(s, find_cache(train_dir)) for s in samples]
        agreement = mask_agreement(samples[:2], items[:2], size)
        for name in configs:
            arch, encoder = name.split("/")
            b = batches[name]
            row = {"config": name, "size": size, "batch": b, "workers": workers, "baseline_workers": baseline_workers,
                   "mask_agreement": agreement}

            warm = _warmup_batches(baseline_workers)
            reset_peak(device)
            model = build_model(arch, encoder, "none").to(device)
            loader = baseline_loader(samples, size, b, baseline_workers, warm + steps, device)
            row["baseline_img_s"] = _steps(model, loader, device, None, False, steps, warm)
            row["baseline_gib"] = peak_gib(device)
            del model, loader
            row["baseline_loader_img_s"] = _loader_rate(
                baseline_loader(samples, size, b, baseline_workers, warm + steps, device), steps, warm)

            variants = [("", False)] + ([("compiled_", True)] if compile_too else [])
            for prefix, use_compile in variants:
                reset_peak(device)
                model = build_model(arch, encoder, "none").to(device)
                if cuda:
                    model = model.to(memory_format=torch.channels_last)
                run_model = torch.compile(model) if use_compile else model
                row[f"{prefix}device_img_s"] = _steps(run_model, _device_batches(size, b, device), device,
                                                      resolve_amp("auto", device), cuda, steps)
                row[f"{prefix}device_gib"] = peak_gib(device)
                del model, run_model

                # the real loop, as `handseg train` runs it by default (fold 0 validated, a checkpoint an epoch)
                out = Path(tmp) / f"run_{name.replace('/', '_')}_{prefix}"
                cfg = TrainConfig(data=train_dir, arch=arch, encoder=encoder, encoder_weights="none", size=size,
                                  epochs=epochs, batch_size=b, workers=workers, device=device, out=out,
                                  compile=use_compile)
                reset_peak(device)
                t0 = time.perf_counter()
                train(cfg, log=lambda *a: None)
                wall = time.perf_counter() - t0
                row[f"{prefix}handseg_gib"] = peak_gib(device)
                with open(out / "metrics.csv", newline="") as f:
                    epochs_rows = list(csv.DictReader(f))
                last = epochs_rows[-1]
                row[f"{prefix}handseg_img_s"] = float(last["images_per_s"])
                row[f"{prefix}handseg_data_wait"] = float(last["data_wait"])
                row[f"{prefix}epoch_steps"] = int(last["step"]) - (int(epochs_rows[-2]["step"]) if len(epochs_rows) > 1
                                                                   else 0)
                loops = sum(float(r["seconds"]) for r in epochs_rows)
                val = sum(float(r["val_seconds"]) for r in epochs_rows)
                save = sum(float(r["save_seconds"]) for r in epochs_rows)
                row[f"{prefix}wall"] = {"epochs": len(epochs_rows), "seconds": wall, "loops": loops, "val": val,
                                        "save": save, "other": wall - loops - val - save}
            cfg = TrainConfig(data=train_dir, size=size, batch_size=b, workers=workers)
            warm = _warmup_batches(workers)
            row["handseg_loader_img_s"] = _loader_rate(handseg_loader(items, cfg, device, warm + steps), steps, warm)
            results.append(row)
    return results


def _device_batches(size: int, batch: int, device: str):
    import torch

    x = torch.randn(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 29, size, size, device=device) > 0.9).to(torch.uint8)
    while True:
        yield x, y


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="training resolution of every loop")
    parser.add_argument("--image-size", type=int, default=2048, help="side of the synthetic X-rays")
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per loop (and per handseg epoch)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of handseg's train() call")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time the loops under torch.compile")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated ARCH/ENCODER models (default: {', '.join(CONFIGS)})")
    parser.add_argument("--batch", type=int, help="batch size (default on GPU: 8 for ResNet34, else 4; 2 on CPU)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of handseg's loop")
    parser.add_argument("--baseline-workers", type=int, help="DataLoader workers of the baseline (default: --workers)")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    bad = [c for c in configs if len(c.split("/")) != 2 or not all(c.split("/"))]
    if bad:
        parser.error(f"--configs: {bad[0]!r} is not ARCH/ENCODER (e.g. {next(iter(CONFIGS))})")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch pays for start-up)")
    rows = run(args.size, args.steps, args.device, args.compile, configs, args.batch, args.workers, args.image_size,
               args.baseline_workers, args.epochs)
    from handseg.inference.runtime import pick_device

    device = pick_device(args.device)
    base_workers = rows[0]["baseline_workers"]
    print(f"training throughput on {device} at {args.size} px from {args.image_size} px X-rays, images/s "
          f"({args.steps} timed steps; baseline: seed-style DataLoader, {base_workers} workers, fp32; handseg: "
          f"train(), {args.workers} workers, last of {args.epochs} epochs)")
    print(f"peak memory: {memory_kind(device)}; the two loaders' training masks agree: mean Dice "
          f"{rows[0]['mask_agreement']:.4f}")
    print("| model | batch | baseline | on-device | handseg | handseg / baseline | handseg / on-device | baseline "
          "loader alone | handseg loader alone | handseg's data wait | peak GiB (baseline / on-device / handseg) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        for prefix, label in (("", ""), ("compiled_", " compiled")):
            if f"{prefix}handseg_img_s" not in r:
                continue
            dev, ours, base = r[f"{prefix}device_img_s"], r[f"{prefix}handseg_img_s"], r["baseline_img_s"]
            print(f"| {r['config']}{label} | {r['batch']} | {base:.2f} | {dev:.2f} | {ours:.2f} | {ours / base:.2f}x | "
                  f"{ours / dev:.0%} | {r['baseline_loader_img_s']:.1f} | {r['handseg_loader_img_s']:.1f} | "
                  f"{r[f'{prefix}handseg_data_wait']:.0%} | {r['baseline_gib']:.2f} / "
                  f"{r[f'{prefix}device_gib']:.2f} / {r[f'{prefix}handseg_gib']:.2f} |")
    print()
    print("where handseg's train() call spent its wall time (default run: fold 0 of 5 validated every epoch, a "
          "checkpoint every epoch)")
    print("| model | epochs x steps | wall (s) | training loops | validation | checkpoint waits | other (start-up) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for prefix, label in (("", ""), ("compiled_", " compiled")):
            if f"{prefix}wall" not in r:
                continue
            w = r[f"{prefix}wall"]
            share = {k: w[k] / w["seconds"] for k in ("loops", "val", "save", "other")}
            print(f"| {r['config']}{label} | {w['epochs']} x {r[f'{prefix}epoch_steps']} | {w['seconds']:.1f} | "
                  f"{share['loops']:.0%} | {share['val']:.0%} | {share['save']:.0%} | {share['other']:.0%} |")
    return rows


if __name__ == "__main__":
    main()
