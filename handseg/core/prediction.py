"""Running checkpoints over a folder: CSV rows, probability maps, TTA, per-class thresholds.

``predict`` and ``tta`` are the same loop; ``tta`` adds test-time transforms (ttach flips, plus
input-size scales) merged by mean, geometric mean or max, and on labelled data reports the Dice of
each transform alone and merged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.core.constants import CLASSES, NUM_CLASSES
from handseg.core.data import Sample, class_masks, discover, read_image, read_polygons
from handseg.core.distributed import all_gather, dist_env, setup_distributed, shutdown
from handseg.core.errors import HandsegError
from handseg.core.files import atomic_write_json, read_json
from handseg.core.inference import Predictor, masks_to_runs
from handseg.core.metrics import dice_masks
from handseg.core.rle import mask_to_runs, runs_to_rle
from handseg.core.submission import write_predictions

TUNE_GRID = np.round(np.arange(0.20, 0.81, 0.05), 2)
MERGES = ("mean", "gmean", "max")


@dataclass(frozen=True)
class Transform:
    """A test-time transform: ``flip`` is a ttach transform name (or None); ``scale`` the input size factor."""

    name: str
    flip: str | None = None
    scale: float = 1.0


def parse_transforms(spec: str) -> list[Transform]:
    """``"hflip,vflip,scale:0.8,1.2"`` -> identity, hflip, vflip, scale 0.8, scale 1.2.

    The identity is always first. Numbers after ``scale:`` continue the scale list.
    """
    out = [Transform("identity")]
    in_scale = False
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.startswith("scale:"):
            in_scale, token = True, token.split(":", 1)[1]
        if in_scale and _is_number(token):
            s = float(token)
            if not 0.25 <= s <= 4:
                raise HandsegError(f"scale {s} out of range 0.25..4")
            if s != 1.0:
                out.append(Transform(f"scale{s:g}", scale=s))
            continue
        in_scale = False
        if token in ("hflip", "vflip"):
            out.append(Transform(token, flip=token))
        else:
            raise HandsegError(f"unknown TTA transform {token!r}; valid: hflip, vflip, scale:S1,S2,...")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def merge_probs(probs: list, how: str):
    """Merge per-transform probability maps in place (the inputs are consumed), one map at a time."""
    import torch

    if how not in MERGES:
        raise HandsegError(f"unknown --merge {how!r}; valid: {', '.join(MERGES)}")
    if len(probs) == 1:
        return probs[0]
    if how == "max":
        out = probs[0]
        for p in probs[1:]:
            torch.maximum(out, p, out=out)
        return out
    def prep(p):
        return p.clamp_min_(1e-6).log_() if how == "gmean" else p

    out = prep(probs[0])
    for p in probs[1:]:
        out.add_(prep(p))
    out.div_(len(probs))
    return out.exp_() if how == "gmean" else out


@dataclass
class PredictResult:
    images: int
    thresholds: list[float]
    dice: dict[str, float] = field(default_factory=dict)
    """Mean Dice per transform (and ``merged``) when labels were available."""
    per_class: dict[str, float] = field(default_factory=dict)
    tuned: bool = False
    main: bool = True
    """False on torchrun ranks other than 0, which write nothing."""


def run_predictions(checkpoints: list[Path], data: Path, out_csv: Path, probs_dir: Path | None = None,
                    transforms: list[Transform] | None = None, merge: str = "mean",
                    thresholds: list[float] | None = None, tune: bool = False, device: str = "auto",
                    amp: bool = True, progress: Callable[..., None] | None = None, batch: int = 4) -> PredictResult:
    """Predict every image of ``data`` and write the CSV (and probability maps) in submission order.

    With labels in ``data`` the Dice of each transform and of the merge is measured; ``tune``
    searches a threshold per class on those labels (the CSV then uses the tuned thresholds).
    Under torchrun each rank predicts a shard; rank 0 writes the CSV in order.
    """
    import torch

    from handseg.core.ensemble import PROBS_INDEX, pack_probs, probs_name, quantise_probs
    from handseg.core.files import atomic_open

    transforms = transforms or [Transform("identity")]
    samples = discover(data, labels="optional")
    labelled = all(s.label_path is not None for s in samples)
    if tune and not labelled:
        raise HandsegError("--tune-thresholds needs labels (outputs_json/) for every image", data)
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        raise HandsegError("two images share a basename; submission rows could not tell them apart", data)
    predictor = Predictor.load(checkpoints, device, amp, batch)
    thr = np.asarray(thresholds if thresholds is not None else predictor.thresholds, dtype=np.float64)
    if thr.shape != (NUM_CLASSES,):
        raise HandsegError(f"need {NUM_CLASSES} thresholds, got {thr.size}")
    d = dist_env()
    if tune and d.world > 1:
        raise HandsegError("--tune-thresholds runs on one process; run it without torchrun")
    shard = samples[d.rank :: d.world]

    dice_sum = {t.name: np.zeros(NUM_CLASSES) for t in transforms}
    if len(transforms) > 1:
        dice_sum["merged"] = np.zeros(NUM_CLASSES)
    tune_sum = np.zeros((NUM_CLASSES, TUNE_GRID.size)) if tune else None
    merged_key = "merged" if len(transforms) > 1 else transforms[0].name
    rows: dict[str, list] = {}
    if progress:
        progress(total=len(shard))
    thr_device = torch.as_tensor(thr, dtype=torch.float32, device=predictor.device).view(-1, 1, 1)
    with torch.inference_mode():  # the maps are merged in place
        for s, image in _prefetch_images(shard):
            per_t = [predictor.probs(image, t.flip, t.scale).float() for t in transforms]
            if labelled:
                truth = class_masks(read_polygons(s.label_path), image.shape, source=s.label_path)
                if len(transforms) > 1:
                    for t, p in zip(transforms, per_t):
                        dice_sum[t.name] += dice_masks(truth, (p > thr_device).cpu().numpy())
            merged = merge_probs(per_t, merge)
            # thresholds, runs and quantisation on the device: only run boundaries (and uint8 maps
            # when asked for) cross to the host, not 29 float maps of the image's full size
            masks = merged > thr_device
            if labelled:
                dice_sum[merged_key] += dice_masks(truth, masks.cpu().numpy())
            if tune:
                probs = merged.cpu().numpy()
                # the Dice and the RLE of every class at every candidate threshold: small, and exact once
                # a threshold is chosen, so no probability map is held until the end
                grid = [[""] * TUNE_GRID.size for _ in range(NUM_CLASSES)]
                for j, t in enumerate(TUNE_GRID):
                    masks = probs > t
                    tune_sum[:, j] += dice_masks(truth, masks)
                    for c in range(NUM_CLASSES):
                        grid[c][j] = runs_to_rle(mask_to_runs(masks[c]))
                rows[s.name] = grid
            else:
                rows[s.name] = [runs_to_rle(r) for r in masks_to_runs(masks)]
            if probs_dir is not None:
                with atomic_open(Path(probs_dir) / probs_name(s.name), "wb") as f:
                    np.save(f, pack_probs(quantise_probs(merged).cpu().numpy()), allow_pickle=False)
            if progress:
                progress()

    if tune:
        best = np.argmax(tune_sum, axis=1)
        thr = TUNE_GRID[best].astype(np.float64)
        rows = {n: [per_class[c][best[c]] for c in range(NUM_CLASSES)] for n, per_class in rows.items()}

    if d.world > 1:  # every rank's rows and Dice sums to rank 0
        setup_distributed(predictor.device)
        gathered = all_gather((rows, dice_sum), d)
        shutdown(d)
        if not d.main:
            return PredictResult(len(shard), thr.tolist(), main=False)
        rows = {name: r for part, _ in gathered for name, r in part.items()}
        dice_sum = {k: sum(sums[k] for _, sums in gathered) for k in dice_sum}
    write_predictions(out_csv, ((n, rows[n]) for n in names))
    if probs_dir is not None:
        atomic_write_json(Path(probs_dir) / PROBS_INDEX, {"images": names, "classes": list(CLASSES),
                                                          "quantisation": "uint8 p*255, per-class bbox crops"})
    result = PredictResult(len(samples), [float(v) for v in thr], tuned=tune)
    if labelled:
        n = len(samples)
        result.dice = {k: float(v.mean() / n) for k, v in dice_sum.items()}
        result.per_class = {c: float(v / n) for c, v in zip(CLASSES, dice_sum[merged_key])}
        if tune:
            result.per_class = {c: float(tune_sum[i].max() / n) for i, c in enumerate(CLASSES)}
            result.dice[merged_key] = float(np.mean(list(result.per_class.values())))
    return result


def _prefetch_images(samples: list[Sample], ahead: int = 2):
    """``(sample, image)`` in order, decoding the next PNGs in threads while the model runs."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending = [pool.submit(read_image, s.image_path) for s in samples[:ahead]]
        for i, s in enumerate(samples):
            image = pending[i].result()
            if i + ahead < len(samples):
                pending.append(pool.submit(read_image, samples[i + ahead].image_path))
            pending[i] = None
            yield s, image


def write_thresholds(path: Path, thresholds: list[float]) -> None:
    atomic_write_json(path, {c: float(t) for c, t in zip(CLASSES, thresholds)})


def read_thresholds(path: Path) -> list[float]:
    """``{"finger-1": 0.45, ...}`` (missing classes: 0.5) or a list of 29 numbers."""
    doc = read_json(path, "thresholds file")
    if isinstance(doc, list):
        if len(doc) != NUM_CLASSES:
            raise HandsegError(f"need {NUM_CLASSES} thresholds, got {len(doc)}", path)
        return [float(v) for v in doc]
    if isinstance(doc, dict):
        unknown = [k for k in doc if k not in CLASSES]
        if unknown:
            raise HandsegError(f"unknown class {unknown[0]!r}", path)
        return [float(doc.get(c, 0.5)) for c in CLASSES]
    raise HandsegError("thresholds must be an object {class: value} or a list", path)
