"""Training throughput: handseg's data path and loop against a baseline-style loop, in one run.

    python benchmarks/train_throughput.py --size 1024 --steps 20 --device cuda
    python benchmarks/train_throughput.py --size 64 --steps 2 --device cpu     (tiny, as the tests run it)

Configurations: UNet++/HRNet-W48 (batch 4) and UNet/ResNet34 (batch 8). Baseline: PNG + JSON decoded
on the fly in the loop, fp32. handseg: prep cache through a DataLoader with workers, AMP (bf16 where
supported) and channels_last on CUDA, optionally torch.compile. Reports images/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loading import baseline_load  # noqa: E402

CONFIGS = {"unetplusplus/hrnet_w48": ("unetplusplus", "hrnet_w48", 4), "unet/resnet34": ("unet", "resnet34", 8)}


def _step_loop(model, batches, device, dtype, channels_last, steps):
    import torch

    from handseg.core.losses import build_loss

    loss_fn = build_loss("bce:0.5,dice:0.5")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if i == 1:  # the first step pays for warm-up and compilation
            if device.startswith("cuda"):
                torch.cuda.synchronize()
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
        if i + 1 >= steps + 1:
            break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def run(size: int, steps: int, device: str, compile_too: bool, configs: list[str]) -> list[dict]:
    import cv2
    import torch
    from torch.utils.data import DataLoader

    from handseg.core.cache import build_cache
    from handseg.core.data import discover
    from handseg.core.inference import amp_dtype
    from handseg.core.models import build_model
    from handseg.core.synth import make_dataset
    from handseg.core.training import Item, SegmentationDataset, TrainConfig

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, ids=4, test_ids=0, size=max(size, 128), seed=0)
        build_cache("masks", data / "train", data / "train" / "cache")
        build_cache("images", data / "train", data / "train" / "cache")
        samples = discover(data / "train", labels="required")
        for name in configs:
            arch, encoder, batch = CONFIGS[name]
            if device == "cpu":
                batch = 2

            def baseline_batches(batch=batch):
                while True:
                    xs, ys = [], []
                    for _ in range(batch):
                        s = samples[np.random.randint(len(samples))]
                        img, masks = baseline_load(s.image_path, s.label_path)
                        img = cv2.resize(img, (size, size)).astype(np.float32) / 255
                        m = np.stack([cv2.resize(c.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
                                      for c in masks])
                        xs.append(torch.from_numpy(img)[None])
                        ys.append(torch.from_numpy(m))
                    yield torch.stack(xs), torch.stack(ys)

            model = build_model(arch, encoder, "none").to(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            base = _step_loop(model, baseline_batches(), device, None, False, steps)
            base_mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            cfg = TrainConfig(size=size, augment="none", batch_size=batch)
            ds = SegmentationDataset([Item(s, data / "train" / "cache") for s in samples] * 50, cfg)
            loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=min(8, max(1, steps // 2)) if
                                device.startswith("cuda") else 0, pin_memory=device.startswith("cuda"))
            row = {"config": name, "size": size, "batch": batch, "baseline_img_s": base, "baseline_gib": base_mem}
            variants = [("handseg", False)] + ([("handseg+compile", True)] if compile_too else [])
            for label, use_compile in variants:
                m = build_model(arch, encoder, "none").to(device)
                cl = device.startswith("cuda")
                if cl:
                    m = m.to(memory_format=torch.channels_last)
                    torch.cuda.reset_peak_memory_stats()
                if use_compile:
                    m = torch.compile(m)
                row[f"{label}_img_s"] = _step_loop(m, iter(loader), device, amp_dtype(device), cl, steps)
                row[f"{label}_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cl else None
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args(argv)
    rows = run(args.size, args.steps, args.device, args.compile, args.configs.split(","))
    print(f"training throughput at {args.size} px on {args.device} ({args.steps} timed steps)")
    print("| model | batch | baseline img/s | handseg img/s | speed-up | peak GiB (baseline / handseg) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        mem = f"{r['baseline_gib']:.1f} / {r['handseg_gib']:.1f}" if r["baseline_gib"] is not None else "n/a (CPU)"
        print(f"| {r['config']} | {r['batch']} | {r['baseline_img_s']:.2f} | {r['handseg_img_s']:.2f} | "
              f"{r['handseg_img_s'] / r['baseline_img_s']:.2f}x | {mem} |")
        if "handseg+compile_img_s" in r:
            print(f"| {r['config']} (compiled) | {r['batch']} | | {r['handseg+compile_img_s']:.2f} | "
                  f"{r['handseg+compile_img_s'] / r['baseline_img_s']:.2f}x | |")
    return rows


if __name__ == "__main__":
    main()
