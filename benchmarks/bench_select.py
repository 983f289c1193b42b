"""``handseg select`` at competition scale against the notebook way, in one run.

    python benchmarks/bench_select.py [--images 800] [--distinct 16] [--size 2048] [--configs 2] [--folds 5]
                                      [--baseline-images 2] [--workers 1]

The job: out-of-fold probability maps of ``--configs`` configurations x ``--folds`` folds for ``--images``
training images at ``--size`` px, and the whole search (each configuration, soft and hard vote, class-wise
picks, 13 thresholds per class, keep-largest per class, with nested estimates), then the chosen recipe
applied once more to check its Dice.

The maps are realistic crops: each bone's true mask, shifted by a pixel or two, blurred (soft edges as
after upsampling), with smooth noise on the edges and, for some classes, a false blob beside the bone,
quantised as ``predict --probs`` stores them. ``--distinct`` hands are generated and their files are
hard-linked under ``--images`` names (so the run reads 800 x configs maps; the page cache holds the
distinct ones, as it would hold 800 real maps on a machine with a few GB of memory).

handseg runs as the real CLI in a child process (wall time; peak resident memory from the kernel's
high-water mark, ``VmHWM``, and ``getrusage`` for worker processes). The baseline is the obvious notebook
way: ``ProbMap.dense()`` of every map, the soft and hard votes as full-size arrays, then for every
threshold and class a numpy Dice and a full-size ``cv2.connectedComponentsWithStats`` for keep-largest;
it runs on ``--baseline-images`` images in another child and is scaled linearly to the full job. Both
compute the Dice of every option for those images, and they must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from handseg.common.constants import DICE_EPS, NUM_CLASSES
from handseg.data.labels import class_masks, polygon_document, read_polygons
from handseg.data.layout import discover
from handseg.data.synth import sample_pose, synth_hand
from handseg.formats.probs import ProbMap, pack_probs, probs_name


def noisy_probs(masks: np.ndarray, rng: np.random.Generator, sigma: float, blob_rate: float) -> np.ndarray:
    """``(29, H, W)`` uint8 probability maps: a model's output imitated from the true masks, class by class
    on a padded crop (never a full-size float stack)."""
    import cv2

    from handseg.formats.cropfile import bbox

    _, height, width = masks.shape
    out = np.zeros(masks.shape, dtype=np.uint8)
    pad = int(4 * sigma) + 48
    for c in range(masks.shape[0]):
        r0, r1, c0, c1 = bbox(masks[c])
        r0, c0 = max(r0 - pad, 0), max(c0 - pad, 0)
        r1, c1 = min(r1 + pad, height), min(c1 + pad, width)
        m = masks[c, r0:r1, c0:c1].astype(np.float32)
        dy, dx = rng.integers(-2, 3, 2)
        m = np.roll(m, (int(dy), int(dx)), axis=(0, 1))
        p = cv2.GaussianBlur(m, (0, 0), sigma)
        field = cv2.GaussianBlur(rng.normal(0, 1, p.shape).astype(np.float32), (0, 0), 6.0)
        p += 0.25 * field / (field.std() + 1e-6) * ((p > 0.02) & (p < 0.98))
        if rng.random() < blob_rate:  # a false positive beside the bone
            y = int(rng.integers(8, max(p.shape[0] - 8, 9)))
            x = int(rng.integers(8, max(p.shape[1] - 8, 9)))
            blob = np.zeros_like(p)
            cv2.circle(blob, (x, y), int(rng.integers(3, 9)), float(rng.uniform(0.4, 0.95)), -1)
            p = np.maximum(p, cv2.GaussianBlur(blob, (0, 0), 1.5))
        out[c, r0:r1, c0:c1] = np.clip(np.rint(np.clip(p, 0, 1) * 255), 0, 255).astype(np.uint8)
    return out


def make_job(root: Path, images: int, distinct: int, size: int, configs: int, folds: int, seed: int = 0) -> list[Path]:
    """Write the data folder and the OOF runs; returns the run folders."""
    import cv2

    rng = np.random.default_rng(seed)
    pool = root / "pool"
    pool.mkdir(parents=True)
    params = [(1.5 + 1.0 * k, 0.15 + 0.1 * k) for k in range(configs)]  # each configuration errs its own way
    for h in range(distinct):
        _, polygons = synth_hand(sample_pose(rng, "right" if h % 2 else "left", 0.3, False), size, rng)
        cv2.imwrite(str(pool / f"{h}.png"), np.zeros((size, size), np.uint8))
        (pool / f"{h}.json").write_text(json.dumps(polygon_document(polygons, f"{h}.jpg", "/x")))
        masks = class_masks(polygons, (size, size))
        for k, (sigma, blob) in enumerate(params):
            np.save(pool / f"{h}_{k}.npy", pack_probs(noisy_probs(masks, rng, sigma, blob)))
    data = root / "data"
    names: dict[int, list[str]] = {f: [] for f in range(folds)}
    for i in range(images):
        pid, h = f"ID{i // 2 + 1:04d}", i % distinct
        stem = f"image{1661130828152 + i}"
        for sub, ext in (("DCM", ".png"), ("outputs_json", ".json")):
            (data / sub / pid).mkdir(parents=True, exist_ok=True)
            os.link(pool / f"{h}{ext}", data / sub / pid / f"{stem}{ext}")
        names[(i // 2) % folds].append(f"{stem}.png")  # both hands of a person in one fold
    runs = []
    for k in range(configs):
        for f in range(folds):
            oof = root / "runs" / f"cfg{k}_f{f}" / "oof"
            oof.mkdir(parents=True)
            for name in names[f]:
                h = (int(Path(name).stem[5:]) - 1661130828152) % distinct
                os.link(pool / f"{h}_{k}.npy", oof / probs_name(name))
            (oof / "index.json").write_text(json.dumps({"images": names[f]}))
            card = {"arch": "unet", "encoder": f"resnet{18 + 16 * k}", "size": size // 2}
            (oof / "manifest.json").write_text(json.dumps({"stage": "oof", "fold": f, "card": card, "data": str(data),
                                                           "transforms": ["identity"], "merge": "mean"}))
            runs.append(oof.parent)
    return runs


# ----------------------------------------------------------------------------------------------
# the baseline


def baseline_option_dice(runs: list[Path], data: Path, images: list[str], grid: list[float]) -> np.ndarray:
    """The notebook way, for the same options in the same order as handseg's ``OptionSpace``."""
    import cv2

    from handseg.selection.configs import read_oof_run

    oof = [read_oof_run(r) for r in runs]
    configs: dict[str, dict[str, Path]] = {}
    for r in oof:
        configs.setdefault(r.card["encoder"], {}).update({im: r.folder / probs_name(im) for im in r.images})
    members = list(configs.values())
    m = len(members)
    samples = {s.name: s for s in discover(data, labels="required")}
    from handseg.selection.scoring import OptionSpace

    space = OptionSpace.build([str(k) for k in range(m)], grid)
    out = np.empty((len(images), NUM_CLASSES, len(space.options)))
    for i, image in enumerate(images):
        dense = [ProbMap(c[image]).dense() for c in members]
        truth = class_masks(read_polygons(samples[image].label_path), dense[0].shape[1:])
        sources = dense + ([np.mean(dense, axis=0), np.sum([d > 0.5 for d in dense], axis=0)] if m >= 2 else [])
        sources += [np.tensordot(np.asarray(space.source_weights[s]) / sum(space.source_weights[s]), dense, axes=1)
                    for s in space.weighted_sources]  # the per-class weightings of the soft vote
        for s, src in enumerate(sources):
            for j, value in enumerate(space.cuts[s]):
                for c in range(NUM_CLASSES):
                    pred = src[c] >= value if space.kinds[s] == "hard" else src[c] > value
                    t = truth[c]
                    inter, ta, pa = np.logical_and(t, pred).sum(), t.sum(), pred.sum()
                    out[i, c, space.index[(s, j, False)]] = (2 * inter + DICE_EPS) / (ta + pa + DICE_EPS)
                    n, labels, stats, _ = cv2.connectedComponentsWithStats(pred.astype(np.uint8), connectivity=8)
                    if n > 2:
                        pred = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
                        inter, pa = np.logical_and(t, pred).sum(), pred.sum()
                    out[i, c, space.index[(s, j, True)]] = (2 * inter + DICE_EPS) / (ta + pa + DICE_EPS)
    return out


def tie_options(space) -> np.ndarray:
    """``(options,)`` bool: soft-vote options whose cut ``255 M t`` is a whole number, where a pixel can sit
    exactly on the threshold; handseg compares the exact integer sum there, a float32 mean rounds either way."""
    from handseg.formats.recipe import SOFT

    ties = np.zeros(len(space.options), dtype=bool)
    for k, o in enumerate(space.options):
        if space.kinds[o.source] == SOFT:
            cut = space.cut_values(o.source)[o.cut]
            ties[k] = abs(cut - round(cut)) < 1e-9
    return ties


def _child(kind: str, args: list[str]) -> dict:
    """Run this script's child mode; it prints one JSON line with its time and peak memory."""
    cmd = [sys.executable, __file__, "--child", kind, *args]
    env = {**os.environ, "HANDSEG_NO_PROGRESS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_main(kind: str, rest: list[str]) -> None:
    t = time.perf_counter()
    if kind == "handseg":
        from handseg.cli import main

        code = main(rest)
        if code != 0:
            raise SystemExit(code)
        result: dict = {}
    else:
        runs_file, data, n, out = rest
        from handseg.ensemble.masks import GRID

        runs = [Path(p) for p in Path(runs_file).read_text().split("\n") if p]
        images = [s.name for s in discover(data, labels="required")][: int(n)]
        np.save(out, baseline_option_dice(runs, Path(data), images, list(GRID)))
        result = {"images": images}
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_mib": _peak_mib(), **result}))


def _peak_mib() -> float:
    """Peak resident memory of this process and of its worker processes (select -j N), in MiB.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` of an exec'd child also counts the parent's resident size at the
    fork (Linux keeps the high-water mark across exec), which here is the job generator's; the kernel's
    ``VmHWM`` is this program's own. Workers are forked from this small process, so their maxrss is theirs.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        status = Path("/proc/self/status").read_text()
        own = int(status.split("VmHWM:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--distinct", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--configs", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--baseline-images", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="handseg select -j (the baseline runs in one)")
    args = parser.parse_args(argv)
    from handseg.ensemble.masks import GRID
    from handseg.selection.configs import TruthSource, group_configurations, read_oof_run
    from handseg.selection.scoring import score_options

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        runs = make_job(root, args.images, args.distinct, args.size, args.configs, args.folds)
        made = time.perf_counter() - t
        ours = _child("handseg", ["select", *runs, "-o", root / "recipe.json", "-j", str(args.workers)])
        recipe = json.loads((root / "recipe.json").read_text())
        (root / "runs.txt").write_text("\n".join(map(str, runs)))
        nb = min(args.baseline_images, args.images)
        base = _child("baseline", [str(root / "runs.txt"), str(root / "data"), str(nb), str(root / "base.npy")])
        # agreement: handseg's Dice of every option on the baseline's images
        configs = group_configurations([read_oof_run(r) for r in runs])
        scores = score_options(configs, TruthSource(root / "data"), base["images"], GRID)
        theirs = np.load(root / "base.npy")
        diff = np.abs(scores.dice - theirs).max(axis=(0, 1))
        ties = tie_options(scores.space)
        exact = float(diff[~ties].max())
        assert exact < 1e-12, f"handseg and the baseline disagree (max |dDice| {exact})"
        rounding = float(diff[ties].max()) if ties.any() else 0.0
    base_full = base["seconds"] / nb * args.images
    print(f"select: {args.images} images x {args.configs} configurations x {args.folds} folds at {args.size} px, "
          f"handseg -j {args.workers} ({args.distinct} distinct hands; job made in {made:.0f} s; "
          f"baseline timed on {nb} images, scaled)")
    print(f"{len(recipe['candidates'])} candidates; chosen: {recipe['chosen']} "
          f"(OOF Dice {recipe['cv_dice']:.4f}, nested {recipe['nested_cv_dice']:.4f}); "
          f"every option's Dice equals the baseline's (to {exact:.0e}) but the soft vote's at thresholds where "
          f"255 * {args.configs} * t is a whole number, where the baseline's float32 mean moves tie pixels "
          f"(max |dDice| {rounding:.1e})")
    print("| job | baseline | handseg | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| select, whole job (s) | {base_full:.0f} | {ours['seconds']:.1f} | {base_full / ours['seconds']:.0f}x |")
    print(f"| per image (ms) | {base['seconds'] / nb * 1e3:.0f} | {ours['seconds'] / args.images * 1e3:.1f} | |")
    print(f"| peak memory (MiB) | {base['peak_mib']:.0f} | {ours['peak_mib']:.0f} | |")
    return {"handseg_s": ours["seconds"], "baseline_s": base_full, "handseg_peak_mib": ours["peak_mib"],
            "baseline_peak_mib": base["peak_mib"], "max_diff": exact, "recipe": recipe}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child_main(sys.argv[2], sys.argv[3:])
    else:
        main()
