"""Loading one training sample: handseg's prep cache against decoding PNG + rasterising JSON.

    python benchmarks/bench_loading.py [--size 2048] [--images 4]

Both produce the same thing: the (H, W) uint8 image and the (29, H, W) bool multi-label masks.
The baseline is what notebook data sets do in __getitem__: cv2.imread, json.load, and a
full-size cv2.fillPoly per class.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_of, report  # noqa: E402

from handseg.common.constants import CLASSES  # noqa: E402
from handseg.data.cache import build_cache, load_sample  # noqa: E402
from handseg.data.layout import discover  # noqa: E402
from handseg.data.synth import make_dataset  # noqa: E402


def baseline_load(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    with open(label_path) as f:
        annotations = json.load(f)["annotations"]
    label = np.zeros((*image.shape, len(CLASSES)), dtype=np.uint8)
    for ann in annotations:
        class_label = np.zeros(image.shape, dtype=np.uint8)
        cv2.fillPoly(class_label, [np.array(ann["points"])], 1)
        label[..., CLASSES.index(ann["label"])] = class_label
    return image, label.transpose(2, 0, 1).astype(bool)


def baseline_masks_resized(masks: np.ndarray, size: int) -> np.ndarray:
    """The notebooks' training-time mask resize: each class to ``size`` with nearest-neighbour, uint8."""
    return np.stack([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in masks])


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, ids=max(1, args.images // 2), test_ids=0, size=args.size, seed=0)
        cache = Path(tmp) / "cache"
        build_cache("masks", data / "train", cache)
        build_cache("images", data / "train", cache)
        samples = discover(data / "train", labels="required")
        for s in samples:  # same result, so the comparison is fair
            a, b = baseline_load(s.image_path, s.label_path), load_sample(cache, s)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        n = len(samples)
        base = best_of(lambda: [baseline_load(s.image_path, s.label_path) for s in samples], args.repeat) / n
        ours = best_of(lambda: [load_sample(cache, s) for s in samples], args.repeat) / n
    print(f"one training sample at {args.size} px (mean of {n} images, warm page cache)")
    rows = [("image + 29 masks", base, ours)]
    report(rows)
    return rows


if __name__ == "__main__":
    main()
