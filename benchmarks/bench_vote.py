"""Hard vote of three CSVs: handseg (on RLE runs) against the baseline-style decode/sum/encode loop.

    python benchmarks/bench_vote.py [--images 288] [--size 2048] [--baseline-images 24]

The job is a test-set-sized vote (default 288 images x 29 classes at 2048 px). The baseline
decodes every mask to a full-size array, sums, thresholds and re-encodes, as notebook ensembles
do; it is timed on --baseline-images images and scaled to the full job, since it is linear in
images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rle import baseline_decode, baseline_encode  # noqa: E402

from handseg.data.labels import class_masks  # noqa: E402
from handseg.data.synth import sample_pose, synth_hand  # noqa: E402
from handseg.ensemble.votes import hard_vote  # noqa: E402
from handseg.formats.rle import rle_encode  # noqa: E402
from handseg.formats.submission import read_predictions, write_predictions  # noqa: E402


def baseline_hard_vote(csvs: list[Path], out: Path, size: int, limit: int) -> int:
    import pandas as pd

    frames = [pd.read_csv(p) for p in csvs]
    rows = []
    for i in range(min(limit * 29, len(frames[0]))):
        total = np.zeros((size, size), dtype=np.uint8)
        for f in frames:
            rle = f["rle"].iloc[i]
            if isinstance(rle, str):
                total += baseline_decode(rle, size, size)
        rows.append(baseline_encode((total >= 2).astype(np.uint8)))
    pd.DataFrame({"rle": rows}).to_csv(out, index=False)
    return len(rows) // 29


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=288)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--baseline-images", type=int, default=24)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # three "models": the true masks shifted by a few pixels, as three different predictions
        hands = []
        for k in range(8):
            _, polys = synth_hand(sample_pose(rng, "right" if k % 2 else "left", 0.3, False), args.size, rng)
            hands.append(class_masks(polys, (args.size, args.size)))
        csvs = []
        for m, shift in enumerate((0, 2, -3)):
            encoded = [[rle_encode(np.roll(c, shift, axis=1)) for c in h] for h in hands]
            path = tmp / f"model{m}.csv"
            write_predictions(path, ((f"image{i:04d}.png", encoded[i % len(hands)]) for i in range(args.images)))
            csvs.append(path)
        t = time.perf_counter()
        hard_vote(csvs, tmp / "vote.csv")
        ours = time.perf_counter() - t
        n = min(args.baseline_images, args.images)
        t = time.perf_counter()
        baseline_hard_vote(csvs, tmp / "base.csv", args.size, n)
        base = (time.perf_counter() - t) / n * args.images
        a = read_predictions(tmp / "vote.csv")
        import pandas as pd

        b = pd.read_csv(tmp / "base.csv", keep_default_na=False)["rle"].tolist()
        assert [a.rle(im, c) for im in a.images[:n] for c in range(29)] == b, "votes disagree"
    print(f"hard vote of 3 CSVs, {args.images} images x 29 classes at {args.size} px "
          f"(baseline timed on {n} images, scaled)")
    print("| job | baseline (s) | handseg (s) | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| 3-CSV hard vote | {base:.1f} | {ours:.2f} | {base / ours:.0f}x |")


if __name__ == "__main__":
    main()
