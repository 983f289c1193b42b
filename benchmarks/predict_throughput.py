"""Prediction throughput, PNG to CSV at each image's full size: handseg against the seed notebooks' loop.

    python benchmarks/predict_throughput.py --arch unet --encoder resnet34 --size 1024 --batch 8 --tta  (on a GPU)
    python benchmarks/predict_throughput.py --checkpoint runs/f0 --data data/test --batch 8 --tta   (your model, images)
    python benchmarks/predict_throughput.py --arch unet --encoder resnet34 --size 512 --image-size 2048 --images 8 \\
        --batch 4 --device cpu
    python benchmarks/predict_throughput.py --arch unet --encoder resnet18 --size 64 --image-size 128 --images 3 \\
        --batch 2 --train-steps 2 --device cpu     (tiny, as tested)

Baseline, as the seed notebooks infer: a DataLoader with ``--baseline-workers`` workers over the test
PNGs (cv2.imread and the resize to the model's size in the Dataset; pin_memory on CUDA), ``--batch``
images per forward pass, fp32, F.interpolate of the logits to each image's size, sigmoid, the
per-class threshold on the device and the bool masks copied to the host (as the official notebook
does), the numpy RLE per class (``bench_rle.baseline_encode``), the CSV written with pandas; TTA
through ttach's SegmentationTTAWrapper (mean of the logits). Its resize is cv2.INTER_AREA, the one
handseg trains and predicts with (the notebooks' albumentations Resize is bilinear), so both loops
see the same input and must predict the same masks.

handseg: :func:`handseg.inference.run.run_predictions` (the code of ``handseg predict`` / ``tta``)
with ``batch=--batch``: AMP (bf16 where supported) and channels_last on GPU, PNGs decoded in threads
ahead of the model, thresholds and runs on the device, the RLE text made in a thread behind it.
Its time shares are measured by timing the pieces alone, one after another, on the same images:
decoding every PNG (one thread), the forward passes on decoded images (``Predictor.predict``: resize,
model, resize back, sigmoid; and the threshold), the runs (``masks_to_runs``, on the device), the RLE
text (``runs_to_rle``) and the CSV; the sum of the pieces exceeds the pipeline's wall time by what
the pipeline overlaps.

Without ``--checkpoint`` a model is trained briefly with handseg's ``train()`` on synthetic X-rays
(``--train-steps`` steps, few on CPU), so its masks look like bones rather than noise; its mean Dice
on the benchmark's (labelled, synthetic) images is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import memory_kind, peak_gib, reset_peak  # noqa: E402
from bench_rle import baseline_encode  # noqa: E402


class BaselineTestDataset:
    """The seed notebooks' test set (a map-style torch Dataset): item ``i`` is
    ``(input (C, S, S) float32, height, width, basename)``."""

    def __init__(self, samples: list, size: int, mean: float, std: float, channels: int):
        self.samples, self.size, self.mean, self.std, self.channels = samples, size, mean, std, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        import torch

        s = self.samples[index]
        image = cv2.imread(str(s.image_path), cv2.IMREAD_GRAYSCALE)
        x = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        x = torch.from_numpy((x - self.mean) / self.std)[None].expand(self.channels, -1, -1).clone()
        return x, image.shape[0], image.shape[1], s.name


def baseline_predict(checkpoint: Path, samples, out_csv: Path, device: str, tta: bool, batch: int,
                     workers: int) -> None:
    """The seed notebooks' inference loop, PNGs to CSV."""
    import pandas as pd
    import torch
    import torch.nn.functional as F
    import ttach
    from torch.utils.data import DataLoader

    from handseg.common.constants import CLASSES
    from handseg.models.checkpoint import load_checkpoint

    model, card = load_checkpoint(checkpoint, device)  # both loops pay for loading the model
    net = model
    if tta:
        net = ttach.SegmentationTTAWrapper(model, ttach.Compose([ttach.HorizontalFlip()]), merge_mode="mean")
    thr = torch.tensor(card.thresholds, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    dataset = BaselineTestDataset(samples, card.size, card.norm["mean"], card.norm["std"], card.in_channels)
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                        pin_memory=device.startswith("cuda"), drop_last=False)
    names, classes, rles = [], [], []
    with torch.no_grad():
        for x, heights, widths, batch_names in loader:
            logits = net(x.to(device))
            sizes = list(zip(heights.tolist(), widths.tolist()))
            if len(set(sizes)) == 1:  # the notebooks' case: one size, one interpolation for the batch
                groups = [(logits, sizes[0], batch_names)]
            else:
                groups = [(logits[j : j + 1], hw, [n]) for j, (hw, n) in enumerate(zip(sizes, batch_names))]
            for part, hw, part_names in groups:
                probs = torch.sigmoid(F.interpolate(part, size=hw, mode="bilinear", align_corners=False))
                masks = (probs > thr).cpu().numpy()
                for name, image_masks in zip(part_names, masks):
                    for c, m in enumerate(image_masks):
                        names.append(name)
                        classes.append(CLASSES[c])
                        rles.append(baseline_encode(m))
    pd.DataFrame({"image_name": names, "class": classes, "rle": rles}).to_csv(out_csv, index=False)


def _agreement(a_csv: Path, b_csv: Path) -> tuple[float, int]:
    """Mean Dice between two CSVs of the same images, and the masked pixels of ``b_csv``."""
    from handseg.analysis.metrics import dice_scores
    from handseg.formats.submission import read_predictions

    report = dice_scores(read_predictions(a_csv), read_predictions(b_csv))
    return float(report.dice.mean()), int(report.pred_area.sum())


def _truth_dice(samples, csv_path: Path) -> float | None:
    """Mean leaderboard Dice of a CSV against the samples' labels (``None`` without labels)."""
    from handseg.analysis.metrics import dice_from_runs
    from handseg.data.images import image_size
    from handseg.data.labels import class_runs, read_polygons
    from handseg.formats.submission import read_predictions

    if any(s.label_path is None for s in samples):
        return None
    pred = read_predictions(csv_path)
    scores = []
    for s in samples:
        truth = class_runs(read_polygons(s.label_path), image_size(s.image_path), s.label_path)
        scores.append([dice_from_runs(t, p) for t, p in zip(truth, pred.runs[s.name])])
    return float(np.mean(scores))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def onnx_row(checkpoint: Path, data: Path, samples, tmp: Path, device: str, transforms, batch: int,
             torch_csv: Path) -> dict | None:
    """The same prediction through onnxruntime (the checkpoint exported to ONNX beside a copy of it, as a
    model zip unpacks), end to end and the forward pass alone, against torch's forward pass alone; None
    without onnxruntime."""

    import torch

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from handseg.data.images import read_image
    from handseg.inference.onnx import ONNX_NAME, export_onnx
    from handseg.inference.predictor import Predictor
    from handseg.inference.run import PredictConfig, run_predictions

    copy = tmp / "onnx_model" / "best.safetensors"
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(Path(checkpoint) if Path(checkpoint).is_file() else Path(checkpoint) / "best.safetensors", copy)
    copy.with_name(ONNX_NAME).write_bytes(export_onnx(copy)[0])
    config = PredictConfig(transforms=transforms, device=device, batch=batch)
    run_predictions([copy], data, tmp / "warm_onnx.csv", config=config, samples=samples[:batch])
    reset_peak(device)
    t0 = time.perf_counter()
    run_predictions([copy], data, tmp / "onnx.csv", config=config, samples=samples)
    seconds = time.perf_counter() - t0
    gib = peak_gib(device)
    images = [read_image(s.image_path) for s in samples]
    forward = {}
    for name, path in (("torch", checkpoint), ("onnxruntime", copy)):
        predictor = Predictor.load([path], device, True, batch)
        with torch.inference_mode():
            predictor.predict(images[:batch], transforms)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            for start in range(0, len(images), batch):
                predictor.predict(images[start : start + batch], transforms)
            _sync(device)
            forward[name] = time.perf_counter() - t0
    return {"seconds": seconds, "img_s": len(samples) / seconds, "gib": gib, "forward": forward,
            "agreement": _agreement(torch_csv, tmp / "onnx.csv")[0]}


def handseg_pieces(checkpoint: Path, samples, out_csv: Path, device: str, transforms, batch: int) -> dict[str, float]:
    """Seconds of each piece of handseg's prediction pipeline, each timed alone on the same images."""
    import torch

    from handseg.data.images import read_image
    from handseg.ensemble.masks import level_cuts
    from handseg.formats.probs import quantise_probs
    from handseg.formats.rle import runs_to_rle
    from handseg.formats.submission import write_predictions
    from handseg.inference.predictor import Predictor, masks_to_runs

    t = {}
    t0 = time.perf_counter()
    predictor = Predictor.load([checkpoint], device, True, batch)
    t["load"] = time.perf_counter() - t0
    # handseg's one cut rule: the stored uint8 level against 255 t
    cuts = torch.as_tensor(level_cuts(predictor.thresholds), dtype=torch.float64, device=predictor.device)
    cuts = cuts.view(-1, 1, 1)
    t0 = time.perf_counter()
    images = [read_image(s.image_path) for s in samples]
    t["decode"] = time.perf_counter() - t0
    t["forward"] = t["runs"] = t["rle"] = 0.0
    rows = []
    with torch.inference_mode():
        predictor.predict(images[:batch], transforms)  # warm-up
        _sync(device)
        for start in range(0, len(images), batch):
            t0 = time.perf_counter()
            masks = [quantise_probs(p) > cuts for p in predictor.predict(images[start : start + batch], transforms)]
            _sync(device)
            t1 = time.perf_counter()
            runs = [masks_to_runs(m) for m in masks]  # copies the run boundaries to the host: synchronises
            del masks
            t2 = time.perf_counter()
            rows += [[runs_to_rle(r) for r in image_runs] for image_runs in runs]
            t3 = time.perf_counter()
            t["forward"] += t1 - t0
            t["runs"] += t2 - t1
            t["rle"] += t3 - t2
    t0 = time.perf_counter()
    write_predictions(out_csv, zip([s.name for s in samples], rows))
    t["csv"] = time.perf_counter() - t0
    return t


def train_briefly(root: Path, arch: str, encoder: str, size: int, image_size: int, steps: int, device: str,
                  batch: int) -> Path:
    """A checkpoint from ``steps`` steps (``batch`` images each) of handseg's ``train()`` on eight
    synthetic X-rays (seed 1: other hands than the benchmark's, seed 0), all of them train (fold -1)."""
    from handseg.data.cache import build_cache
    from handseg.data.synth import make_dataset
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    make_dataset(root, ids=4, test_ids=0, size=image_size, seed=1)
    for kind in ("masks", "images"):
        build_cache(kind, root / "train", root / "train" / "cache")
    per_epoch = max(1, 8 // batch)
    cfg = TrainConfig(data=root / "train", fold=-1, arch=arch, encoder=encoder, encoder_weights="none", size=size,
                      epochs=math.ceil(steps / per_epoch), max_steps=steps, batch_size=batch, workers=2,
                      device=device, out=root / "run")
    train(cfg, log=lambda *a: None)
    return root / "run" / "last.safetensors"


def run(checkpoint: Path | None, data: Path | None, arch: str, encoder: str, size: int, image_size: int,
        images: int, device: str, batch: int = 4, tta: bool = False, baseline_workers: int = 4,
        train_steps: int | None = None, with_onnx: bool = True) -> dict:
    from handseg.data.layout import discover
    from handseg.data.synth import make_dataset
    from handseg.formats.tta import parse_transforms
    from handseg.inference.run import PredictConfig, run_predictions
    from handseg.inference.runtime import pick_device

    device = pick_device(device)
    cuda = device.startswith("cuda")
    info = {"device": device, "trained": None, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if checkpoint is None:
            steps = train_steps or (300 if cuda else 30)
            t0 = time.perf_counter()
            checkpoint = train_briefly(tmp / "train", arch, encoder, size, image_size, steps, device, 4 if cuda else 2)
            info["trained"] = {"steps": steps, "seconds": time.perf_counter() - t0}
        if data is None:
            make_dataset(tmp / "data", ids=0, test_ids=max(1, (images + 1) // 2), size=image_size, seed=0)
            data = tmp / "data" / "test_gt"  # labelled, so the masks can be scored; timed without labels
        os.sync()  # the training's checkpoints and the data reach the disk now, not during the timed loops
        samples = discover(data, labels="optional", role="test")[:images]
        unlabelled = [type(s)(s.patient, s.image_path, None, s.rel_dir) for s in samples]
        for use_tta in (False, True) if tta else (False,):
            transforms = parse_transforms("hflip" if use_tta else "")
            # warm-up (model load, CUDA kernels, worker start) on one batch of each loop
            baseline_predict(checkpoint, samples[:batch], tmp / "warm.csv", device, use_tta, batch, baseline_workers)
            run_predictions([checkpoint], data, tmp / "warm.csv",
                            config=PredictConfig(transforms=transforms, device=device, batch=batch),
                            samples=unlabelled[:batch])

            reset_peak(device)
            t0 = time.perf_counter()
            baseline_predict(checkpoint, samples, tmp / "base.csv", device, use_tta, batch, baseline_workers)
            base_s = time.perf_counter() - t0
            base_gib = peak_gib(device)

            reset_peak(device)
            t0 = time.perf_counter()
            run_predictions([checkpoint], data, tmp / "ours.csv",
                            config=PredictConfig(transforms=transforms, device=device, batch=batch),
                            samples=unlabelled)
            ours_s = time.perf_counter() - t0
            ours_gib = peak_gib(device)

            shutil.copy(tmp / "ours.csv", tmp / f"ours_{'hflip' if use_tta else 'none'}.csv")
            pieces = handseg_pieces(checkpoint, unlabelled, tmp / "pieces.csv", device, transforms, batch)
            agreement, pixels = _agreement(tmp / "base.csv", tmp / "ours.csv")
            info["rows"].append({"tta": "hflip" if use_tta else "none", "images": len(samples), "batch": batch,
                                 "baseline_s": base_s, "handseg_s": ours_s, "baseline_img_s": len(samples) / base_s,
                                 "handseg_img_s": len(samples) / ours_s, "baseline_gib": base_gib,
                                 "handseg_gib": ours_gib, "agreement": agreement, "handseg_pixels": pixels,
                                 "pieces_agree": _agreement(tmp / "ours.csv", tmp / "pieces.csv")[0],
                                 "truth_dice": _truth_dice(samples, tmp / "ours.csv"), "pieces": pieces,
                                 "onnx": None})
        # onnxruntime last: no DataLoader worker is forked once its sessions have run in this process
        for row in info["rows"] if with_onnx else []:
            row["onnx"] = onnx_row(checkpoint, data, unlabelled, tmp, device,
                                   parse_transforms("hflip" if row["tta"] == "hflip" else ""), batch,
                                   tmp / f"ours_{row['tta']}.csv")
    return info


PIECES = (("load", "load the checkpoint"), ("decode", "decode the PNGs (1 thread)"),
          ("forward", "forward: resize, model, resize back, sigmoid, threshold"),
          ("runs", "post: runs on the device"), ("rle", "post: RLE text"), ("csv", "post: CSV write"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint or run folder (default: train one briefly)")
    parser.add_argument("--data", type=Path, help="a folder of PNGs (default: synthetic X-rays)")
    parser.add_argument("--arch", default="unet", help="architecture of the briefly trained model")
    parser.add_argument("--encoder", default="resnet34", help="encoder of the briefly trained model")
    parser.add_argument("--size", type=int, default=1024, help="input size of the briefly trained model")
    parser.add_argument("--image-size", type=int, default=2048, help="side of the synthetic X-rays")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="images per forward pass, in both loops")
    parser.add_argument("--tta", action="store_true", help="also time hflip TTA (ttach in the baseline)")
    parser.add_argument("--baseline-workers", type=int, default=4, help="DataLoader workers of the baseline")
    parser.add_argument("--train-steps", type=int, help="steps of the brief training (default: 300 on GPU, 30 on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows (default: when installed)")
    args = parser.parse_args(argv)
    for name in ("images", "batch", "size", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    info = run(args.checkpoint, args.data, args.arch, args.encoder, args.size, args.image_size, args.images,
               args.device, args.batch, args.tta, args.baseline_workers, args.train_steps, not args.no_onnx)
    rows = info["rows"]
    if info["trained"]:
        tiny = ", a tiny CPU training" if info["device"] == "cpu" else ""
        model = (f"{args.arch}/{args.encoder} at {args.size} px trained {info['trained']['steps']} steps on synthetic "
                 f"X-rays ({info['trained']['seconds']:.0f} s{tiny})")
    else:
        model = str(args.checkpoint)
    truth = rows[0]["truth_dice"]
    print(f"prediction throughput on {info['device']}, PNG to CSV, {rows[0]['images']} images "
          f"{'(synthetic, ' + str(args.image_size) + ' px)' if args.data is None else 'of ' + str(args.data)}, "
          f"batch {args.batch}: {model}" + (f"; handseg's mean Dice on them {truth:.4f}" if truth is not None else ""))
    print(f"baseline: seed-style DataLoader, {args.baseline_workers} workers, fp32; handseg: run_predictions; "
          f"peak memory: {memory_kind(info['device'])}")
    print("| TTA | baseline img/s | handseg img/s | handseg / baseline | peak GiB (baseline / handseg) | "
          "agreement (mean Dice) |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['tta']} | {r['baseline_img_s']:.2f} | {r['handseg_img_s']:.2f} | "
              f"{r['handseg_img_s'] / r['baseline_img_s']:.2f}x | {r['baseline_gib']:.2f} / {r['handseg_gib']:.2f} | "
              f"{r['agreement']:.4f} |")
    if rows[0]["onnx"] is not None:
        print()
        print("the same through onnxruntime (the checkpoint exported to ONNX, as `export --format onnx` does): end to "
              "end, and the forward passes alone (resize, network, resize back, sigmoid) on decoded images")
        print("| TTA | torch img/s | onnxruntime img/s | onnxruntime / torch | forward alone: torch s / "
              "onnxruntime s | peak GiB (torch / onnxruntime) | agreement (mean Dice) |")
        print("|---|---:|---:|---:|---|---|---:|")
        for r in rows:
            o = r["onnx"]
            ratio = o["img_s"] / r["handseg_img_s"]
            print(f"| {r['tta']} | {r['handseg_img_s']:.2f} | {o['img_s']:.2f} | {ratio:.2f}x "
                  f"| {o['forward']['torch']:.2f} / {o['forward']['onnxruntime']:.2f} "
                  f"({o['forward']['torch'] / o['forward']['onnxruntime']:.2f}x) | {r['handseg_gib']:.2f} / "
                  f"{o['gib']:.2f} | {o['agreement']:.4f} |")
    print()
    print("handseg's pieces, each timed alone on the same images, as shares of its pipeline's wall time: a sum "
          "above 100% is what the pipeline overlaps (decoding ahead in threads, RLE text behind)")
    print("| piece | " + " | ".join(f"TTA {r['tta']}: s (share)" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for key, label in PIECES:
        print(f"| {label} | " + " | ".join(f"{r['pieces'][key]:.2f} ({r['pieces'][key] / r['handseg_s']:.0%})"
                                          for r in rows) + " |")
    print("| sum of the pieces | " + " | ".join(
        f"{sum(r['pieces'].values()):.2f} ({sum(r['pieces'].values()) / r['handseg_s']:.0%})" for r in rows) + " |")
    print("| handseg's pipeline (wall) | " + " | ".join(f"{r['handseg_s']:.2f} (100%)" for r in rows) + " |")
    return info


if __name__ == "__main__":
    main()
