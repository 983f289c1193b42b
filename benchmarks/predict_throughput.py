"""Prediction throughput, PNG to CSV at each image's full size: handseg against a baseline-style loop.

    python benchmarks/predict_throughput.py --device cuda                        (2048 px, UNet++/HRNet-W48 at 1024)
    python benchmarks/predict_throughput.py --checkpoint runs/f0 --data data/test (your model, your images)
    python benchmarks/predict_throughput.py --image-size 128 --size 64 --images 2 --device cpu   (tiny, as tested)

Baseline-style, as the competition's baseline notebook infers: per image cv2.imread, resize to the
model's size, normalise, fp32 forward, F.interpolate to the full size, sigmoid, ``> 0.5`` on the host,
and the per-class numpy RLE (flatten, concatenate, diff); TTA through ttach's
SegmentationTTAWrapper (mean). handseg: the code of ``handseg predict`` / ``handseg tta``: AMP (bf16
where supported) and channels_last on GPU, PNGs decoded ahead in threads, thresholds and runs on the
device, the CSV written. Without ``--checkpoint`` the model has random weights (the default
``--arch/--encoder``), so its masks are sparse; the two loops' masks are compared and the agreement
(mean Dice between them) printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rle import baseline_encode  # noqa: E402


def baseline_predict(checkpoint: Path, samples, device: str, tta: bool) -> list[tuple[str, list[str]]]:
    import torch
    import torch.nn.functional as F
    import ttach

    from handseg.core.checkpoint import load_checkpoint

    model, card = load_checkpoint(checkpoint, device)  # both loops pay for loading the model
    net = model
    if tta:
        net = ttach.SegmentationTTAWrapper(model, ttach.Compose([ttach.HorizontalFlip()]), merge_mode="mean")
    mean, std = card.norm["mean"], card.norm["std"]
    rows = []
    with torch.no_grad():
        for s in samples:
            image = cv2.imread(str(s.image_path), cv2.IMREAD_GRAYSCALE)
            x = cv2.resize(image, (card.size, card.size)).astype(np.float32) / 255.0
            x = torch.from_numpy((x - mean) / std)[None, None].expand(1, card.in_channels, -1, -1).to(device)
            logits = F.interpolate(net(x), size=image.shape, mode="bilinear", align_corners=False)
            masks = (torch.sigmoid(logits)[0] > 0.5).cpu().numpy()
            rows.append((s.name, [baseline_encode(m) for m in masks]))
    return rows


def _agreement(a_csv: Path, b_csv: Path) -> float:
    from handseg.core.metrics import dice_scores
    from handseg.core.submission import read_predictions

    return float(dice_scores(read_predictions(a_csv), read_predictions(b_csv)).dice.mean())


def run(checkpoint: Path | None, data: Path | None, arch: str, encoder: str, size: int, image_size: int,
        images: int, device: str) -> list[dict]:
    import torch

    from handseg.core.checkpoint import ModelCard, save_checkpoint
    from handseg.core.data import discover
    from handseg.core.inference import pick_device
    from handseg.core.models import build_model
    from handseg.core.prediction import parse_transforms, run_predictions
    from handseg.core.submission import write_predictions
    from handseg.core.synth import make_dataset

    device = pick_device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if checkpoint is None:
            checkpoint = tmp / "model.safetensors"
            save_checkpoint(checkpoint, build_model(arch, encoder, "none"), ModelCard(arch=arch, encoder=encoder,
                                                                                       size=size))
        if data is None:
            data = tmp / "data"
            make_dataset(data, ids=0, test_ids=max(1, (images + 1) // 2), size=image_size, seed=0)
            data = data / "test"
        samples = discover(data, labels="optional")[:images]
        for tta in (False, True):
            base_rows = baseline_predict(checkpoint, samples[:1], device, tta)  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            base_rows = baseline_predict(checkpoint, samples, device, tta)
            base_s = time.perf_counter() - t0
            write_predictions(tmp / "base.csv", base_rows)

            subset = tmp / "subset"  # run_predictions reads a folder: link exactly these images
            for s in samples:
                dest = subset / "DCM" / s.image_path.parent.name / s.image_path.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    dest.symlink_to(s.image_path.resolve())
            transforms = parse_transforms("hflip" if tta else "")
            run_predictions([checkpoint], subset, tmp / "warm.csv", transforms=transforms, device=device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_predictions([checkpoint], subset, tmp / "ours.csv", transforms=transforms, device=device)
            ours_s = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
            rows.append({"tta": "hflip" if tta else "none", "images": len(samples), "baseline_img_s":
                         len(samples) / base_s, "handseg_img_s": len(samples) / ours_s, "peak_gib": peak,
                         "agreement": _agreement(tmp / "base.csv", tmp / "ours.csv")})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: random weights)")
    parser.add_argument("--data", type=Path, help="a folder of PNGs (default: synthetic X-rays)")
    parser.add_argument("--arch", default="unetplusplus")
    parser.add_argument("--encoder", default="hrnet_w48")
    parser.add_argument("--size", type=int, default=1024, help="model input size (random model)")
    parser.add_argument("--image-size", type=int, default=2048, help="side of the synthetic X-rays")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    rows = run(args.checkpoint, args.data, args.arch, args.encoder, args.size, args.image_size, args.images,
               args.device)
    model = args.checkpoint or f"{args.arch}/{args.encoder} at {args.size} px (random weights)"
    print(f"prediction throughput, PNG to CSV, {rows[0]['images']} images: {model}")
    print("| TTA | baseline img/s | handseg img/s | speed-up | peak GiB | agreement (mean Dice) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        print(f"| {r['tta']} | {r['baseline_img_s']:.2f} | {r['handseg_img_s']:.2f} | "
              f"{r['handseg_img_s'] / r['baseline_img_s']:.2f}x | {peak} | {r['agreement']:.4f} |")
    return rows


if __name__ == "__main__":
    main()
