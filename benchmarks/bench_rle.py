"""RLE encode and decode at 2048 px: handseg against the official baseline's numpy code, one run.

    python benchmarks/bench_rle.py [--size 2048]

Jobs: one bone mask; and one image's 29 class masks, as a submission writer (encode) and a
scorer or voter (decode into a (29, H, W) stack) handle them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_of, report  # noqa: E402

from handseg.analysis.metrics import dice_from_runs  # noqa: E402
from handseg.common.constants import DICE_EPS  # noqa: E402
from handseg.data.labels import class_masks  # noqa: E402
from handseg.data.synth import sample_pose, synth_hand  # noqa: E402
from handseg.formats.rle import rle_decode, rle_encode, rle_to_runs, rles_to_masks  # noqa: E402


def baseline_encode(img: np.ndarray) -> str:
    pixels = img.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def baseline_decode(rle: str, height: int, width: int) -> np.ndarray:
    s = rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(height * width, dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(height, width)


def baseline_dice(rles_a: list[str], rles_b: list[str], h: int, w: int) -> list[float]:
    out = []
    for a, b in zip(rles_a, rles_b):
        ma, mb = baseline_decode(a, h, w), baseline_decode(b, h, w)
        inter = (ma & mb).sum()
        out.append((2 * inter + DICE_EPS) / (ma.sum() + mb.sum() + DICE_EPS))
    return out


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    _, polygons = synth_hand(sample_pose(rng, "right", 0.0, False), args.size, rng)
    masks = class_masks(polygons, (args.size, args.size))
    masks_u8 = masks.astype(np.uint8)
    bone = masks_u8[27]  # the radius: the largest bone
    rles = [rle_encode(m) for m in masks]
    assert all(a == baseline_encode(m) for a, m in zip(rles, masks_u8)), "encoders disagree"
    h = w = args.size
    shifted = [rle_encode(np.roll(m, 3, axis=1)) for m in masks]  # a second, slightly different prediction

    rows = [
        ("encode 1 mask", best_of(lambda: baseline_encode(bone), args.repeat),
         best_of(lambda: rle_encode(bone), args.repeat)),
        ("decode 1 mask", best_of(lambda: baseline_decode(rles[27], h, w), args.repeat),
         best_of(lambda: rle_decode(rles[27], (h, w)), args.repeat)),
        ("encode 29 masks of an image", best_of(lambda: [baseline_encode(m) for m in masks_u8], args.repeat),
         best_of(lambda: [rle_encode(m) for m in masks], args.repeat)),
        ("decode 29 RLEs to (29,H,W)", best_of(lambda: np.stack([baseline_decode(r, h, w) for r in rles]),
                                              args.repeat),
         best_of(lambda: rles_to_masks(rles, (h, w)), args.repeat)),
        ("Dice of 29 classes from two RLE sets", best_of(lambda: baseline_dice(rles, shifted, h, w), args.repeat),
         best_of(lambda: [dice_from_runs(rle_to_runs(a), rle_to_runs(b)) for a, b in zip(rles, shifted)],
                 args.repeat)),
    ]
    print(f"RLE at {args.size} x {args.size}")
    report(rows)
    return rows


if __name__ == "__main__":
    main()
