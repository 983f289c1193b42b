"""The levers of issue 20 on CPU: a small model trained with and without each, the same number of steps,
scored on held-out synthetic images.

Synthetic data from ``handseg synth`` (its defaults; nothing here is tuned to favour a lever): a training
set (the default fold 0 of 5 is the validation fold that ``--patience`` and ``--ema``'s ``best`` see) and
a separate held-out set made with another seed, predicted by each run's ``best`` checkpoint.

Rows: the baseline; ``--preprocess clahe``; ``--ema``; ``--patience`` (stops when it says, so it may take
fewer steps); ``--init`` (the baseline's weights, then the same number of steps again at a tenth of the
learning rate: it has seen twice the steps, which is what fine-tuning is); ``--roi carpals`` (a model of the
carpals on a box around them at the same input size, its stage 1 the baseline, predicted beside it: the
carpals replaced, the rest the baseline's). Per-class soft-vote weights
are chosen by ``select`` over fold runs; their hand-made case is in tests/selection/test_search.py.

Tiny sizes on a shared 2-core machine: the Dice differences are what these settings give on this data,
not an estimate of the gains the teams measured at 1024-2048 px on real X-rays.

    PYTHONPATH=. python benchmarks/levers.py [--epochs 8] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _train(data: Path, out: Path, args, **levers) -> dict:
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    cfg = TrainConfig(data=data, arch="unet", encoder="resnet18", encoder_weights="none", size=args.size,
                      epochs=args.epochs, batch_size=4, workers=0, device="cpu", out=out, lr=args.lr,
                      augment="none", seed=args.seed, **levers)
    return train(cfg, log=lambda *a: None)


def _held_out_dice(runs: list[Path], held_out: Path, out: Path) -> tuple[float, float]:
    """The held-out Dice of the runs' prediction (predict RUN...): over all classes, and over the carpals."""
    import numpy as np

    from handseg.common.constants import CARPALS
    from handseg.inference.run import PredictConfig, run_predictions

    result = run_predictions(runs, held_out, out / "pred.csv", None, PredictConfig(device="cpu", batch=4))
    return float(result.dice["identity"]), float(np.mean([result.per_class[c] for c in CARPALS]))


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from handseg.data.synth import make_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--ids", type=int, default=8, help="training patients (two hands each)")
    p.add_argument("--held-out-ids", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root / "train_set", ids=args.ids, test_ids=0, size=args.image_size, seed=7)
        make_dataset(root / "held_set", ids=args.held_out_ids, test_ids=0, size=args.image_size, seed=1234)
        data, held = root / "train_set" / "train", root / "held_set" / "train"
        rows = []
        baseline = root / "baseline"
        plans = [("baseline", {}), ("--preprocess clahe", {"preprocess": "clahe"}), ("--ema 0.9", {"ema": 0.9}),
                 ("--patience 2", {"patience": 2}),
                 ("--init baseline, lr / 10", {"init": baseline, "lr": args.lr / 10}),
                 # the box from the baseline's masks (its stage 1): predicted with it, the carpals replaced
                 ("--roi carpals, beside baseline", {"roi": "carpals", "context": [baseline]})]
        for name, levers in plans:
            out = root / name.split()[0].strip("-,") if name != "baseline" else baseline
            run_args = argparse.Namespace(**{**vars(args), "lr": levers.pop("lr", args.lr)})
            result = _train(data, out, run_args, **levers)
            runs = [baseline, out] if "roi" in levers else [out]
            dice, carpals = _held_out_dice(runs, held, root / f"pred_{len(rows)}")
            rows.append({"run": name, "steps": result["steps"], "val_dice": result["best_dice"], "held_out": dice,
                         "carpals": carpals})
            print(f"  {name}: {result['steps']} steps, held-out Dice {dice:.4f} (carpals {carpals:.4f})",
                  file=sys.stderr)
    base, base_carpals = rows[0]["held_out"], rows[0]["carpals"]
    print(f"\nunet/resnet18 at {args.size} px, {args.epochs} epochs of {args.ids * 2} synthetic images (fold 0 "
          f"validates), held-out: {args.held_out_ids * 2} images of another seed; CPU, one thread\n")
    print("| run | steps | best val Dice | held-out Dice | vs baseline | held-out carpals | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['val_dice']:.4f} | {r['held_out']:.4f} | "
              f"{r['held_out'] - base:+.4f} | {r['carpals']:.4f} | {r['carpals'] - base_carpals:+.4f} |")
    print("\n(--roi: its best val Dice is over its 8 classes; its held-out Dice is predict baseline + ROI model)")
    return rows


if __name__ == "__main__":
    main()
