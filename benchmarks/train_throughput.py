"""Training throughput: handseg's own loop against a baseline-style loop and a data-on-device bound.

    python benchmarks/train_throughput.py --size 1024 --compile                  (on a GPU)
    python benchmarks/train_throughput.py --size 2048 --configs unetplusplus/hrnet_w48 --batch 2
    python benchmarks/train_throughput.py --size 64 --image-size 128 --steps 2 --device cpu   (tiny, as tested)

For each model, in one run and on the same synthetic data:

- baseline: the notebook loop: PNG + JSON decoded and rasterised in the loop, fp32, no channels_last;
- on-device: random batches already on the device, AMP (bf16 where supported), channels_last, the
  same loss and optimiser: the most any loop can reach, the issue's "data already on the GPU";
- handseg: ``handseg.core.training.train`` itself (the code of ``handseg train``) from the prep cache
  with ``--workers`` DataLoader workers, the default augmentation, AMP and channels_last; images/s
  of its second epoch as metrics.csv records it (the first pays for start-up and compilation);
- loader: the DataLoader alone, no model: how many images/s the workers can deliver.

With ``--compile`` the on-device and handseg loops also run under torch.compile. Peak GPU memory is
reported per loop. The goal: handseg >= 95% of on-device, so data loading never limits the GPU.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loading import baseline_load, baseline_masks_resized  # noqa: E402

CONFIGS = {"unetplusplus/hrnet_w48": ("unetplusplus", "hrnet_w48", 4), "unet/resnet34": ("unet", "resnet34", 8)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _peak(device: str):
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _steps(model, batches, device: str, dtype, channels_last: bool, steps: int) -> float:
    """images/s of ``steps`` optimiser steps after one warm-up step."""
    import torch

    from handseg.core.losses import build_loss

    loss_fn = build_loss("bce:0.5,dice:0.5")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen, t0 = 0, 0.0
    for i, (x, y) in enumerate(batches):
        if i == 1:
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
        if i >= steps:
            break
    _sync(device)
    return seen / (time.perf_counter() - t0)


def _baseline_batches(samples, size: int, batch: int):
    import cv2
    import torch

    rng = np.random.default_rng(0)
    while True:
        xs, ys = [], []
        for i in rng.integers(len(samples), size=batch):
            img, masks = baseline_load(samples[i].image_path, samples[i].label_path)
            img = cv2.resize(img, (size, size)).astype(np.float32) / 255
            ys.append(torch.from_numpy(baseline_masks_resized(masks, size)))
            xs.append(torch.from_numpy(img)[None])
        yield torch.stack(xs), torch.stack(ys)


def _device_batches(size: int, batch: int, device: str):
    import torch

    x = torch.randn(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 29, size, size, device=device) > 0.9).to(torch.uint8)
    while True:
        yield x, y


def _loader_rate(cfg, items, batches: int) -> float:
    """Images/s the DataLoader alone delivers (after its first batch)."""
    from torch.utils.data import DataLoader

    from handseg.core.training import SegmentationDataset, seed_worker

    loader = DataLoader(SegmentationDataset(items, cfg), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=cfg.workers, worker_init_fn=seed_worker if cfg.workers else None)
    seen, t0 = 0, 0.0
    for i, (x, _) in enumerate(loader):
        if i == 1:
            t0, seen = time.perf_counter(), 0
        seen += x.shape[0]
        if i >= batches:
            break
    return seen / (time.perf_counter() - t0)


def run(size: int, steps: int, device: str, compile_too: bool, configs: list[str], batch: int | None,
        workers: int, image_size: int = 2048) -> list[dict]:
    import torch

    from handseg.core.cache import build_cache, find_cache
    from handseg.core.data import discover
    from handseg.core.inference import amp_dtype, pick_device
    from handseg.core.models import build_model
    from handseg.core.synth import make_dataset
    from handseg.core.training import Item, TrainConfig, train

    device = pick_device(device)
    cuda = device.startswith("cuda")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, ids=4, test_ids=0, size=image_size, seed=0)
        for kind in ("masks", "images"):
            build_cache(kind, data / "train", data / "train" / "cache")
        samples = discover(data / "train", labels="required")
        items = [Item(s, find_cache(data / "train")) for s in samples]
        for name in configs:
            arch, encoder, default_batch = CONFIGS[name]
            b = batch or (default_batch if cuda else 2)
            row = {"config": name, "size": size, "batch": b, "workers": workers}

            _reset_peak(device)
            model = build_model(arch, encoder, "none").to(device)
            row["baseline_img_s"] = _steps(model, _baseline_batches(samples, size, b), device, None, False, steps)
            row["baseline_gib"] = _peak(device)
            del model

            variants = [("", False)] + ([("compiled_", True)] if compile_too else [])
            for prefix, use_compile in variants:
                _reset_peak(device)
                model = build_model(arch, encoder, "none").to(device)
                if cuda:
                    model = model.to(memory_format=torch.channels_last)
                run_model = torch.compile(model) if use_compile else model
                row[f"{prefix}device_img_s"] = _steps(run_model, _device_batches(size, b, device), device,
                                                      amp_dtype(device), cuda, steps)
                row[f"{prefix}device_gib"] = _peak(device)
                del model, run_model

                # the real loop: enough copies of the data that each epoch has ``steps`` steps
                copies = max(1, -(-steps * b // len(samples)))
                out = Path(tmp) / f"run_{name.replace('/', '_')}_{prefix}"
                cfg = TrainConfig(data=data / "train", fold=-1, arch=arch, encoder=encoder, encoder_weights="none",
                                  size=size, epochs=2, batch_size=b, workers=workers, device=device, out=out,
                                  extra=[data / "train"] * (copies - 1), compile=use_compile, lr=1e-4)
                _reset_peak(device)
                train(cfg, log=lambda *a: None)
                epochs = list(csv.DictReader(open(out / "metrics.csv")))
                row[f"{prefix}handseg_img_s"] = float(epochs[-1]["images_per_s"])
                row[f"{prefix}handseg_data_wait"] = float(epochs[-1]["data_wait"])
                row[f"{prefix}handseg_gib"] = _peak(device)
            cfg = TrainConfig(data=data / "train", size=size, batch_size=b, workers=workers)
            row["loader_img_s"] = _loader_rate(cfg, items * max(1, -(-(steps + 2) * b // len(items))), steps)
            results.append(row)
    return results


def _gib(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=2048, help="side of the synthetic X-rays")
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time the loops under torch.compile")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--batch", type=int, help="batch size (default: 4 for HRNet, 8 for ResNet34; 2 on CPU)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of handseg's loop")
    args = parser.parse_args(argv)
    rows = run(args.size, args.steps, args.device, args.compile, args.configs.split(","), args.batch, args.workers,
               args.image_size)
    print(f"training throughput at {args.size} px from {args.image_size} px X-rays ({args.steps} timed steps, "
          f"{args.workers} workers), images/s")
    print("| model | batch | baseline | on-device | handseg | handseg / on-device | handseg / baseline | loader "
          "alone | handseg's data wait | peak GiB (baseline / on-device / handseg) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        for prefix, label in (("", ""), ("compiled_", " compiled")):
            if f"{prefix}handseg_img_s" not in r:
                continue
            dev, ours = r[f"{prefix}device_img_s"], r[f"{prefix}handseg_img_s"]
            print(f"| {r['config']}{label} | {r['batch']} | {r['baseline_img_s']:.2f} | {dev:.2f} | {ours:.2f} | "
                  f"{ours / dev:.0%} | {ours / r['baseline_img_s']:.2f}x | {r['loader_img_s']:.1f} | "
                  f"{r[f'{prefix}handseg_data_wait']:.0%} | "
                  f"{_gib(r['baseline_gib'])} / {_gib(r[f'{prefix}device_gib'])} / {_gib(r[f'{prefix}handseg_gib'])} |")
    return rows


if __name__ == "__main__":
    main()
