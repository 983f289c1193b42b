"""Full resolution with global context, on a small proxy: the cascade against a resize model, same time.

    python benchmarks/cascade_proxy.py                              (CPU: 512 px X-rays, a few minutes a model)
    python benchmarks/cascade_proxy.py --image-size 2048 --size 1024 --stage1 512 --crop 1024 \\
        --arch unetplusplus --encoder hrnet_w48 --ids 60 --test-ids 10 --budget 1800 --device cuda   (the GPU goal)

Both recipes train from random weights on the same synthetic train split for the same wall-clock
budget of training, and are scored with the leaderboard Dice on the held-out labelled test split at
full size:

- resize: ``handseg train --size SIZE`` on every train image;
- cascade: stage 1 ``handseg train --size STAGE1`` as two folds of a 2-fold split (so that every
  train image has an out-of-fold stage-1 map), then stage 2 ``handseg train --crop CROP --context
  <both folds>`` on every train image; ``predict`` runs stage 1 (both folds averaged) then stage 2.

The epochs of each model are set from a timed first epoch of it (a probe run, not counted) so that
each recipe's training loops fill the budget (stage 1 gets ``--stage1-share`` of the cascade's);
the table reports the time each recipe's loops and whole runs actually took, and the Dice of the
finger classes (the classes a crop alone confuses).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

FINGERS = [f"finger-{i}" for i in range(1, 20)]


def _loop_seconds(run: Path) -> float:
    """Seconds the run spent in its epochs' training loops (metrics.csv), without start-up or validation."""
    return sum(float(r["seconds"]) for r in csv.DictReader(open(run / "metrics.csv")))


def run(args) -> dict:
    from handseg.data.cache import build_cache
    from handseg.data.kfold import make_splits
    from handseg.data.layout import discover
    from handseg.data.synth import make_dataset
    from handseg.inference.run import PredictConfig, run_predictions
    from handseg.inference.runtime import pick_device
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    device = pick_device(args.device)
    common = dict(arch=args.arch, encoder=args.encoder, encoder_weights="none", batch_size=args.batch,
                  workers=args.workers, device=device, augment="default", lr=args.lr)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        data = tmp / "data"
        make_dataset(data, ids=args.ids, test_ids=args.test_ids, size=args.image_size, seed=args.seed)
        for kind in ("masks", "images"):
            build_cache(kind, data / "train", data / "train" / "cache")
        n = len(discover(data / "train", labels="required"))
        splits = tmp / "splits.json"
        splits.write_text(json.dumps(make_splits(data / "train", n_folds=2, seed=0)))

        def fit(name: str, budget: float, **kw) -> tuple[Path, int, float]:
            """Time one epoch of this model, then train it for as many epochs as fill ``budget`` seconds of
            training loop; returns (run, epochs, wall seconds of the real run)."""
            probe = tmp / f"{name}_probe"
            train(TrainConfig(data=data / "train", epochs=1, out=probe, val_every=1, **common, **kw),
                  log=lambda *a: None)
            epochs = max(1, round(budget / max(_loop_seconds(probe), 1e-3)))
            out = tmp / name
            t0 = time.perf_counter()
            train(TrainConfig(data=data / "train", epochs=epochs, out=out, val_every=epochs, **common, **kw),
                  log=lambda *a: None)
            return out, epochs, time.perf_counter() - t0

        results = {}
        run_, epochs, wall = fit("resize", args.budget, fold=-1, size=args.size)
        results["resize"] = {"epochs": str(epochs), "wall": wall, "loop": _loop_seconds(run_), "runs": [run_]}

        stage1_budget = args.budget * args.stage1_share
        stage1, walls, loops, e1 = [], 0.0, 0.0, []
        for fold in (0, 1):
            r, e, w = fit(f"stage1_f{fold}", stage1_budget / 2, splits=splits, fold=fold, size=args.stage1)
            stage1.append(r)
            walls, loops = walls + w, loops + _loop_seconds(r)
            e1.append(e)
        r, e2, w = fit("cascade", args.budget - stage1_budget, fold=-1, size=args.stage1, crop=args.crop,
                       context=stage1)
        results["cascade"] = {"epochs": f"{e1[0]}+{e1[1]} / {e2}", "wall": walls + w,
                              "loop": loops + _loop_seconds(r), "runs": [r]}

        for name, r in results.items():
            pred = run_predictions(r.pop("runs"), data / "test_gt", tmp / f"{name}.csv",
                                   config=PredictConfig(device=device, batch=args.batch))
            r["dice"] = pred.dice["identity"]
            r["per_class"] = pred.per_class
    return {"device": device, "train_images": n, "test_images": 2 * args.test_ids, "args": vars(args), **results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=512, help="side of the synthetic X-rays")
    parser.add_argument("--size", type=int, default=256, help="the resize model's size")
    parser.add_argument("--stage1", type=int, default=128, help="stage 1's whole-image size")
    parser.add_argument("--crop", type=int, default=256, help="stage 2's full-resolution crops")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--ids", type=int, default=16, help="synthetic train patients (two hands each)")
    parser.add_argument("--test-ids", type=int, default=4, help="held-out labelled patients")
    parser.add_argument("--budget", type=float, default=300, help="training seconds of each recipe")
    parser.add_argument("--stage1-share", type=float, default=0.25, help="share of the cascade's budget for stage 1")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", help="a folder to keep the data, runs and predictions in (default: a temporary one)")
    r = run(parser.parse_args(argv))
    a = r["args"]
    print(f"{r['train_images']} synthetic train images at {a['image_size']} px, {r['test_images']} held-out test "
          f"images; {a['arch']}/{a['encoder']}, {a['budget']:.0f} s of training per recipe on {r['device']}")
    print("| recipe | epochs | training loops (s) | wall (s) | mean Dice | finger mean | worst finger | carpal mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"resize": f"resize {a['size']} px", "cascade": f"cascade: {a['stage1']} px whole image + "
                                                             f"{a['crop']} px crops"}
    for name in ("resize", "cascade"):
        x = r[name]
        pc = x["per_class"]
        fingers = [pc[c] for c in FINGERS]
        worst = min(FINGERS, key=lambda c: pc[c])
        carpals = [v for c, v in pc.items() if not c.startswith("finger") and c not in ("Radius", "Ulna")]
        print(f"| {labels[name]} | {x['epochs']} | {x['loop']:.0f} | {x['wall']:.0f} | {x['dice']:.4f} | "
              f"{sum(fingers) / len(fingers):.4f} | {worst} {pc[worst]:.3f} | {sum(carpals) / len(carpals):.4f} |")
    worse = [c for c in FINGERS if r["cascade"]["per_class"][c] < r["resize"]["per_class"][c]]
    print(f"finger classes where the cascade is below the resize model: {', '.join(worse) or 'none'}")
    return r


if __name__ == "__main__":
    main()
