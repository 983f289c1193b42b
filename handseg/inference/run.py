"""Running checkpoints over a folder: CSV rows, probability maps, TTA, per-class thresholds.

``predict`` and ``tta`` are the same loop; ``tta`` adds test-time transforms (ttach flips, plus
input-size scales) merged by mean, geometric mean or max, and on labelled data reports the Dice of
each transform alone and merged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.analysis.metrics import dice_masks
from handseg.common.constants import CLASSES, NUM_CLASSES
from handseg.common.distributed import Dist, all_gather, dist_env, join_group, shutdown
from handseg.common.errors import HandsegError
from handseg.common.notices import notice
from handseg.common.threads import budget as thread_budget
from handseg.data.images import read_image
from handseg.data.labels import class_masks, read_polygons
from handseg.data.layout import Sample, discover
from handseg.ensemble.masks import GRID, check_thresholds, integer_cuts, keep_largest_classes, level_cuts
from handseg.formats.files import atomic_write_json, read_json
from handseg.formats.probs import PROBS_FORMATS, PROBS_INDEX, levels_inplace, probs_name, quantise_probs, write_probs
from handseg.formats.rle import mask_to_runs, runs_to_mask, runs_to_rle
from handseg.formats.submission import write_predictions
from handseg.formats.tta import IDENTITY, Transform
from handseg.inference.predictor import Predictor, masks_to_runs, run_side


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


@dataclass
class PredictConfig:
    """How ``predict`` and ``tta`` run: everything but the checkpoints, the images and the outputs.

    ``batch`` network inputs go through the model per forward pass (images for resize models, windows
    for sliding-window models). ``thresholds`` default to the checkpoints' own; ``tune`` searches one
    per class on labelled images (the CSV then uses them). ``probs_format``: see
    :data:`~handseg.formats.probs.PROBS_FORMATS`. ``keep_largest`` (one flag per class) keeps only the
    largest connected component of the flagged classes (:mod:`handseg.ensemble.masks`), on runs.
    """

    transforms: list[Transform] = field(default_factory=lambda: [IDENTITY])
    merge: str = "mean"
    thresholds: list[float] | None = None
    tune: bool = False
    device: str = "auto"
    amp: bool = True
    batch: int = 4
    probs_format: str = "packed"
    keep_largest: Sequence[bool] | None = None


def run_predictions(checkpoints: list[Path], data: Path, out_csv: Path, probs_dir: Path | None = None,
                    config: PredictConfig | None = None, *, samples: list[Sample] | None = None,
                    progress: Callable[..., None] | None = None, context_source=None,
                    distributed: bool = True) -> PredictResult:
    """Predict every image of ``data`` and write the CSV (and probability maps) in submission order.

    PNGs are decoded in threads ahead of the model, and the RLE text is made in a thread behind it;
    thresholds and runs are computed on the device, so only run boundaries (and uint8 maps, with
    ``probs_dir``) cross to the host. With labels in ``data`` the Dice of each transform and of the
    merge is measured (that of the masks written). Under torchrun each rank predicts a shard; rank 0
    writes the CSV in order. ``samples`` replaces the images of ``data`` (e.g. a fold's held-out
    images). ``context_source`` gives a cascade's stage-1 maps per image
    (:class:`~handseg.inference.cascade.ContextSource`) instead of running stage 1;
    ``distributed=False`` keeps a torchrun process to its own work (no shards, no gather).

    Example:
        >>> run_predictions([Path("runs/f0")], Path("data/test"), Path("pred.csv"),
        ...                 config=PredictConfig(transforms=parse_transforms("hflip"), device="cpu"))
    """
    cfg = config or PredictConfig()
    transforms = cfg.transforms or [IDENTITY]
    samples = samples if samples is not None else discover(data, labels="optional", role="test")
    names, labelled, keep = _check_request(samples, data, cfg, probs_dir)
    predictor = Predictor.load(checkpoints, cfg.device, cfg.amp, cfg.batch)
    _say_idle_scales(predictor, transforms)
    thr = check_thresholds(cfg.thresholds if cfg.thresholds is not None else predictor.thresholds)
    d = dist_env() if distributed else Dist()
    if cfg.tune and d.world > 1:
        raise HandsegError("--tune-thresholds runs on one process; run it without torchrun")
    shard = samples[d.rank :: d.world]
    rows, dice_sum, tune_sum, merged_key = _predict_shard(predictor, shard, transforms, cfg, thr, keep, labelled,
                                                          probs_dir, progress, context_source)
    if cfg.tune:
        best = np.argmax(tune_sum, axis=1)
        thr = np.asarray(GRID, dtype=np.float64)[best]
        rows = {n: [per_class[c][best[c]] for c in range(NUM_CLASSES)] for n, per_class in rows.items()}
    if d.world > 1:  # every rank's rows and Dice sums to rank 0
        created = join_group(predictor.device)
        gathered = all_gather((rows, dice_sum), d)
        if created:
            shutdown(d)
        if not d.main:
            return PredictResult(len(shard), thr.tolist(), main=False)
        rows = {name: r for part, _ in gathered for name, r in part.items()}
        dice_sum = {k: sum(sums[k] for _, sums in gathered) for k in dice_sum}
    write_predictions(out_csv, ((n, rows[n]) for n in names))
    if probs_dir is not None:
        what = "per-class bbox crops" if cfg.probs_format == "packed" else "(29, H, W) arrays"
        atomic_write_json(Path(probs_dir) / PROBS_INDEX, {"images": names, "classes": list(CLASSES),
                                                          "format": cfg.probs_format,
                                                          "quantisation": f"uint8 p*255, {what}"})
    return _result(len(samples), thr, cfg.tune, labelled, dice_sum, tune_sum, merged_key)


def _check_request(samples: list[Sample], data: Path, cfg: PredictConfig, probs_dir: Path | None):
    """``(names, labelled, keep-largest flags or None)``, once the request is known to make sense."""
    if cfg.probs_format not in PROBS_FORMATS:
        raise HandsegError(f"unknown --probs-format {cfg.probs_format!r}; valid: {', '.join(PROBS_FORMATS)}")
    labelled = all(s.label_path is not None for s in samples)
    if cfg.tune and not labelled:
        raise HandsegError("--tune-thresholds needs labels (outputs_json/) for every image", data)
    keep = cfg.keep_largest if cfg.keep_largest is not None and any(cfg.keep_largest) else None
    if cfg.tune and keep is not None:
        raise HandsegError("--tune-thresholds and --keep-largest together: `handseg select` tunes both on "
                           "out-of-fold maps")
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise HandsegError(f"two images share the basename {dup}; submission rows could not tell them apart", data)
    if probs_dir is not None:
        stems = [probs_name(n) for n in names]
        if len(set(stems)) != len(stems):
            dup = next(n for n, m in zip(names, stems) if stems.count(m) > 1)
            raise HandsegError(f"two images share the name {Path(dup).stem} (e.g. {dup}); their probability maps "
                               "would be one file", data)
    return names, labelled, keep


def _result(n: int, thr: np.ndarray, tune: bool, labelled: bool, dice_sum: dict, tune_sum, merged_key: str
            ) -> PredictResult:
    result = PredictResult(n, [float(v) for v in thr], tuned=tune)
    if labelled:
        result.dice = {k: float(v.mean() / n) for k, v in dice_sum.items()}
        result.per_class = {c: float(v / n) for c, v in zip(CLASSES, dice_sum[merged_key])}
        if tune:
            result.per_class = {c: float(tune_sum[i].max() / n) for i, c in enumerate(CLASSES)}
            result.dice[merged_key] = float(np.mean(list(result.per_class.values())))
    return result


def _predict_shard(predictor: Predictor, shard: list[Sample], transforms: list[Transform], cfg: PredictConfig,
                   thr: np.ndarray, keep, labelled: bool, probs_dir: Path | None, progress, context_source):
    """This process's images through the model: ``(rows, Dice sums, tuning sums, merged key)``."""
    import torch

    tune, merge, probs_format, batch = cfg.tune, cfg.merge, cfg.probs_format, cfg.batch
    dice_sum = {t.name: np.zeros(NUM_CLASSES) for t in transforms}
    if len(transforms) > 1:
        dice_sum["merged"] = np.zeros(NUM_CLASSES)
    tune_sum = np.zeros((NUM_CLASSES, len(GRID))) if tune else None
    merged_key = "merged" if len(transforms) > 1 else transforms[0].name
    rows: dict[str, object] = {}
    if progress:
        progress(total=len(shard))
    # whole-number cuts: compared with uint8 levels, or with round(255 p) held as float32, without widening either
    whole = integer_cuts(thr)
    cuts = torch.as_tensor(whole, dtype=torch.uint8, device=predictor.device).view(-1, 1, 1)
    float_cuts = torch.as_tensor(whole, dtype=torch.float32, device=predictor.device).view(-1, 1, 1)
    per_forward = 1 if any(c.crop for c in predictor.cards) else max(1, batch)
    saves = []
    # one thread behind the model: RLE text, tuning statistics and map files, in order
    with ThreadPoolExecutor(max_workers=1) as encoder, torch.inference_mode():
        for group in _prefetch_groups(shard, per_forward):
            images = [image for _, image in group]
            truths = [class_masks(read_polygons(s.label_path), image.shape, source=s.label_path) if labelled
                      else None for s, image in group]

            def score(t, probs, truths=truths):
                for truth, p in zip(truths, probs):
                    dice_sum[t.name] += dice_masks(truth, (quantise_probs(p) > cuts).cpu().numpy())

            contexts = None
            if context_source is not None:
                contexts = [context_source.full(s.name, image.shape) for s, image in group]
            merged = predictor.predict(images, transforms, merge, score if labelled and len(transforms) > 1 else None,
                                       contexts=contexts)
            for (s, _), truth, p in zip(group, truths, merged):
                # thresholds, runs and quantisation on the device: only run boundaries (and uint8 maps
                # when asked for) cross to the host, not 29 float maps of the image's full size
                levels_inplace(p)  # p holds round(255 p) now (no copy of the image's 29 maps)
                masks = p > float_cuts
                level = p.to(torch.uint8) if (tune or probs_dir is not None) else None
                if tune:
                    dice_sum[merged_key] += dice_masks(truth, masks.cpu().numpy())
                    rows[s.name] = encoder.submit(_tune_rows, level.cpu().numpy(), truth, tune_sum)
                else:
                    runs = masks_to_runs(masks)
                    if keep is not None:
                        runs = keep_largest_classes(runs, tuple(p.shape[-2:]), keep)
                    if labelled:
                        written = masks.cpu().numpy() if keep is None else _runs_masks(runs, tuple(p.shape[-2:]))
                        dice_sum[merged_key] += dice_masks(truth, written)
                    rows[s.name] = encoder.submit(_rles, runs)
                if probs_dir is not None:
                    saves.append(encoder.submit(write_probs, Path(probs_dir) / probs_name(s.name),
                                                level.cpu().numpy(), probs_format))
                if progress:
                    progress()
            del merged
        rows = {name: future.result() for name, future in rows.items()}
        for future in saves:
            future.result()  # a failed write is an error, not a missing map

    return rows, dice_sum, tune_sum, merged_key


def _say_idle_scales(predictor: Predictor, transforms: list[Transform]) -> None:
    """A scale that rounds to the identity's input size adds nothing but weight in the merge: say so."""

    for model, card in zip(predictor.models, predictor.cards):
        if card.crop:
            continue
        base = run_side(model, card)
        for t in transforms:
            if t.scale != 1.0 and run_side(model, card, t.scale) == base:
                notice(("idle-scale", t.name, card.size), f"TTA {t.name} runs the {card.size} px model at {base} px, "
                                                          "the identity's size: it repeats the identity")


def _runs_masks(runs: list, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros((len(runs), *shape), dtype=bool)
    for c, r in enumerate(runs):
        runs_to_mask(r, shape, out[c])
    return out


def _rles(runs: list) -> list[str]:
    return [runs_to_rle(r) for r in runs]


def _tune_rows(level: np.ndarray, truth: np.ndarray, tune_sum: np.ndarray) -> list[list[str]]:
    """The Dice and the RLE of every class at every threshold of the grid (``level``: the ``(29, H, W)``
    uint8 map): small, and exact once a threshold is chosen, so no probability map is held until the end."""
    grid = [[""] * len(GRID) for _ in range(NUM_CLASSES)]
    for j, t in enumerate(GRID):
        masks = level > level_cuts(t)
        tune_sum[:, j] += dice_masks(truth, masks)
        for c in range(NUM_CLASSES):
            grid[c][j] = runs_to_rle(mask_to_runs(masks[c]))
    return grid


def _prefetch_groups(samples: list[Sample], size: int, ahead: int = 2):
    """Lists of ``(sample, image)`` of ``size`` images, in order, decoded in threads ahead of the model."""
    workers = max(2, min(8, size * ahead, thread_budget()[0]))  # decoding shares the cores with the model
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(read_image, s.image_path) for s in samples[: size * (ahead + 1)]]
        submitted = len(futures)
        for start in range(0, len(samples), size):
            group = [(samples[i], futures[i].result()) for i in range(start, min(start + size, len(samples)))]
            for i in range(start, min(start + size, len(samples))):
                futures[i] = None
            while submitted < min(len(samples), start + size * (ahead + 2)):
                futures.append(pool.submit(read_image, samples[submitted].image_path))
                submitted += 1
            yield group


def write_thresholds(path: Path, thresholds: list[float]) -> None:
    atomic_write_json(path, {c: float(t) for c, t in zip(CLASSES, thresholds)})


def read_thresholds(path: Path) -> list[float]:
    """``{"finger-1": 0.45, ...}`` (missing classes: 0.5) or a list of 29 numbers, each in (0, 1)."""
    doc = read_json(path, "thresholds file")
    if isinstance(doc, list):
        values = doc
    elif isinstance(doc, dict):
        unknown = [k for k in doc if k not in CLASSES]
        if unknown:
            raise HandsegError(f"unknown class {unknown[0]!r}", path)
        values = [doc.get(c, 0.5) for c in CLASSES]
    else:
        raise HandsegError("thresholds must be an object {class: value} or a list", path)
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int | float)), None)
    if bad is not None:
        raise HandsegError(f"threshold {bad!r} is not a number", path)
    return [float(v) for v in check_thresholds(values, path)]
