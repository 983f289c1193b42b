"""A short training run: handseg's recipe against the official baseline recipe, same data, same time.

    python benchmarks/baseline_recipe.py --budget 600 --image-size 1024 --ids 24 --test-ids 6 --workers 14
    python benchmarks/baseline_recipe.py --budget 2 --image-size 128 --size 64 --ids 3 --test-ids 1  (tests)

Baseline, as the competition's official baseline notebook trains: torchvision FCN-ResNet50, images
resized to 512 px, 3-channel input scaled to [0, 1], BCE with logits, Adam at 1e-4, batch 8, PNG and
JSON decoded in the data set's __getitem__ by ``--baseline-workers`` DataLoader workers (as the
notebook ran it), fp32. handseg: ``handseg train --arch unet --encoder resnet34 --size 512`` with
its defaults (BCE + Dice, AdamW at 1e-3 with warm-up and cosine decay, the default augmentation,
the prep cache, AMP on GPU). Both start from random weights (nothing is
downloaded), train on the same synthetic train split for the same wall-clock budget, and are scored
with the leaderboard Dice on the held-out labelled test split at each image's full size.
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
from bench_loading import baseline_load, baseline_masks_resized  # noqa: E402


def _baseline_model(num_classes: int):
    import torchvision

    return torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)


def _baseline_input(image: np.ndarray, size: int):
    import torch

    rgb = cv2.cvtColor(cv2.resize(image, (size, size)), cv2.COLOR_GRAY2RGB).astype(np.float32) / 255.0
    return torch.from_numpy(rgb.transpose(2, 0, 1))


class RecipeDataset:
    """The official baseline's XRayDataset (a map-style torch Dataset): PNG and JSON decoded per item,
    29 full-size masks rasterised, image and masks resized. Items: ``(image (3, S, S), masks (29, S, S))``."""

    def __init__(self, samples: list, size: int):
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        import torch

        s = self.samples[index]
        image, masks = baseline_load(s.image_path, s.label_path)
        return _baseline_input(image, self.size), torch.from_numpy(baseline_masks_resized(masks, self.size))


def train_baseline(samples, size: int, budget_s: float, device: str, batch: int = 8, seed: int = 0,
                   workers: int = 0):
    """The official recipe for ``budget_s`` seconds (checked after every step), its data loaded by a
    DataLoader with ``workers`` workers as the notebook ran it; returns (model, steps, seconds)."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    model = _baseline_model(29).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    batch = min(batch, len(samples))
    loader = DataLoader(RecipeDataset(samples, size), batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=device.startswith("cuda"), drop_last=True, generator=generator)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget_s:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).float()
            loss = criterion(model(x)["out"], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - t0 >= budget_s:
                break
    return model, steps, time.perf_counter() - t0


def score_baseline(model, samples, size: int, device: str) -> float:
    """Mean leaderboard Dice: logits resized back to the image's size, sigmoid > 0.5."""
    import torch
    import torch.nn.functional as F

    from handseg.analysis.metrics import dice_masks
    from handseg.data.images import read_image
    from handseg.data.labels import class_masks, read_polygons

    model.eval()
    scores = []
    with torch.no_grad():
        for s in samples:
            image = read_image(s.image_path)
            logits = model(_baseline_input(image, size)[None].to(device))["out"]
            probs = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False).sigmoid()[0]
            pred = (probs > 0.5).cpu().numpy()
            scores.append(dice_masks(class_masks(read_polygons(s.label_path), image.shape), pred))
    return float(np.mean(scores))


def _seconds_per_image(arch: str, encoder: str, size: int, device: str, batch: int) -> float:
    """One forward and backward pass of the handseg model, timed (after a warm-up step)."""
    import torch

    from handseg.models.build import build_model

    model = build_model(arch, encoder, "none").to(device)
    x = torch.randn(batch, 1, size, size, device=device)
    for i in range(2):
        if i == 1:
            t = time.perf_counter()
        model(x).float().mean().backward()
    return (time.perf_counter() - t) / batch


def run(budget: float, image_size: int, size: int, ids: int, test_ids: int, device: str, workers: int,
        baseline_workers: int | None = None) -> dict:
    from handseg.data.cache import build_cache
    from handseg.data.layout import discover
    from handseg.data.synth import make_dataset
    from handseg.inference.run import PredictConfig, run_predictions
    from handseg.inference.runtime import pick_device
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    device = pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, ids=ids, test_ids=test_ids, size=image_size, seed=0)
        train_samples = discover(data / "train", labels="required")
        test_samples = discover(data / "test_gt", labels="required")

        baseline_workers = workers if baseline_workers is None else baseline_workers
        base_model, base_steps, base_s = train_baseline(train_samples, size, budget, device, workers=baseline_workers)
        base_dice = score_baseline(base_model, test_samples, size, device)
        del base_model

        t0 = time.perf_counter()
        build_cache("masks", data / "train", data / "train" / "cache")
        build_cache("images", data / "train", data / "train" / "cache")
        prep_s = time.perf_counter() - t0
        batch = 4
        per_image = _seconds_per_image("unet", "resnet34", size, device, batch)
        epochs = max(1, int(budget / (per_image * len(train_samples))))  # fill the same budget
        cfg = TrainConfig(data=data / "train", fold=-1, arch="unet", encoder="resnet34", encoder_weights="none",
                          size=size, epochs=epochs, batch_size=batch, workers=workers, device=device,
                          out=Path(tmp) / "run", val_every=epochs)
        t0 = time.perf_counter()
        result = train(cfg, log=lambda *a: None)
        ours_s = time.perf_counter() - t0
        ours = run_predictions([Path(tmp) / "run" / "last.safetensors"], data / "test_gt", Path(tmp) / "p.csv",
                               config=PredictConfig(device=device))
    return {"device": device, "workers": workers, "baseline_workers": baseline_workers,
            "train_images": len(train_samples), "test_images": len(test_samples),
            "image_size": image_size, "size": size, "budget_s": budget,
            "baseline": {"steps": base_steps, "images": base_steps * min(8, len(train_samples)), "seconds": base_s,
                         "dice": base_dice},
            "handseg": {"steps": result["steps"], "epochs": epochs, "images": result["steps"] * batch,
                        "seconds": ours_s, "prep_seconds": prep_s, "dice": ours.dice["identity"]}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600, help="training seconds for each recipe")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic X-rays")
    parser.add_argument("--size", type=int, default=512, help="training resolution of both recipes")
    parser.add_argument("--ids", type=int, default=24, help="synthetic train patients (two hands each)")
    parser.add_argument("--test-ids", type=int, default=6, help="held-out labelled patients")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="handseg DataLoader workers")
    parser.add_argument("--baseline-workers", type=int, help="the baseline's DataLoader workers (default: --workers)")
    args = parser.parse_args(argv)
    r = run(args.budget, args.image_size, args.size, args.ids, args.test_ids, args.device, args.workers,
            args.baseline_workers)
    b, h = r["baseline"], r["handseg"]
    print(f"same budget ({r['budget_s']:.0f} s of training each) on {r['device']}: {r['train_images']} synthetic "
          f"train images at {r['image_size']} px, trained at {r['size']} px; mean Dice on {r['test_images']} "
          f"held-out images at full size; DataLoader workers: baseline {r['baseline_workers']}, handseg {r['workers']}")
    print("| recipe | steps | images seen | train time (s) | mean Dice |")
    print("|---|---:|---:|---:|---:|")
    print(f"| official baseline: FCN-ResNet50, BCE, Adam 1e-4, batch 8 | {b['steps']} | {b['images']} | "
          f"{b['seconds']:.0f} | {b['dice']:.4f} |")
    print(f"| handseg: UNet/ResNet34, BCE+Dice, AdamW 1e-3 cosine, batch 4 | {h['steps']} | {h['images']} | "
          f"{h['seconds']:.0f} (+{h['prep_seconds']:.0f} prep) | {h['dice']:.4f} |")
    return r


if __name__ == "__main__":
    main()
