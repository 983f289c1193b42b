"""Patient-grouped folds: both hands of a person always land in the same fold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from handseg.common.errors import HandsegError
from handseg.data.anatomy import wrist_bend
from handseg.data.labels import read_polygons
from handseg.data.layout import Sample, discover
from handseg.data.meta import read_meta
from handseg.formats.files import MANIFEST_NAME, read_json

STRATIFY_CHOICES = ("none", "bend", "age", "sex", "nail")


def stratum_values(samples: list[Sample], by: str, meta_path: Path | None = None,
                   progress: Callable[[], None] | None = None) -> dict[str, float]:
    """One number per patient to stratify on.

    ``bend``: the largest |wrist bend| of the patient's hands, estimated from the labels;
    ``age``/``sex``/``nail``: from ``meta_data.xlsx`` (patients missing there get NaN).
    """
    patients = sorted({s.patient for s in samples})
    if by == "bend":
        values: dict[str, float] = {}
        for s in samples:
            if s.label_path is None:
                raise HandsegError("stratifying by wrist bend needs labels for every image", s.image_path)
            bend = abs(wrist_bend(read_polygons(s.label_path)))
            values[s.patient] = max(values.get(s.patient, 0.0), bend)
            if progress:
                progress()
        return values

    if meta_path is None:
        raise HandsegError(f"stratifying by {by} needs meta_data.xlsx (--meta PATH)")
    meta = read_meta(meta_path)
    column = {"age": "age", "sex": "sex", "nail": "nail_art"}[by]
    out = {}
    for p in patients:
        v = meta[column].get(p) if p in meta.index else None
        if by == "sex":
            v = {"M": 0.0, "F": 1.0}.get(v, np.nan)
        out[p] = float(v) if v is not None and v == v else np.nan
    return out


def assign_folds(patients: list[str], n_folds: int, seed: int,
                 strata: dict[str, float] | None = None) -> dict[str, int]:
    """Assign each patient a fold in ``0..n_folds-1``, deterministically.

    Without strata, patients are shuffled and dealt round-robin. With strata, patients are sorted
    by value (ties and NaN broken by the seeded shuffle) and dealt in blocks of ``n_folds``, each
    block's folds in a fresh random order, so every fold gets a similar spread of the value.
    """
    if n_folds < 2:
        raise HandsegError("--folds must be at least 2")
    if len(patients) < n_folds:
        raise HandsegError(f"{len(patients)} patients cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    order = [patients[i] for i in rng.permutation(len(patients))]
    if strata:
        key = {p: (np.isnan(strata.get(p, np.nan)), strata.get(p, 0.0)) for p in order}
        order = sorted(order, key=lambda p: (key[p][0], 0.0 if key[p][0] else key[p][1]))
    folds = {}
    for start in range(0, len(order), n_folds):
        block = order[start : start + n_folds]
        for p, f in zip(block, rng.permutation(n_folds)):
            folds[p] = int(f)
    return folds


def make_splits(data_dir: str | Path, n_folds: int = 5, seed: int = 0, stratify: str = "none",
                meta_path: Path | None = None, progress: Callable[[], None] | None = None) -> dict:
    """Folds of a labelled (or unlabelled) data folder, as the JSON that ``kfold`` writes.

    Returns ``{"n_folds", "seed", "stratify", "patients": {ID: fold}, "images": [{"path", "patient",
    "fold"}], "folds": [{"fold", "val": [paths]}]}`` with paths relative to ``DCM/``.
    """
    if stratify not in STRATIFY_CHOICES:
        raise HandsegError(f"unknown stratification {stratify!r}; choose from {', '.join(STRATIFY_CHOICES)}")
    samples = discover(data_dir, labels="required" if stratify == "bend" else "optional")
    patients = sorted({s.patient for s in samples})
    strata = None if stratify == "none" else stratum_values(samples, stratify, meta_path, progress)
    folds = assign_folds(patients, n_folds, seed, strata)
    images = [{"path": s.rel, "patient": s.patient, "fold": folds[s.patient]} for s in samples]
    return {
        "n_folds": n_folds,
        "seed": seed,
        "stratify": stratify,
        "patients": dict(sorted(folds.items())),
        "images": images,
        "folds": [{"fold": k, "val": [im["path"] for im in images if im["fold"] == k]} for k in range(n_folds)],
    }


def read_splits(path: str | Path) -> dict:
    """Read a ``splits.json`` written by ``handseg kfold``."""

    doc = read_json(path, "splits file")
    if not isinstance(doc, dict) or "images" not in doc or "n_folds" not in doc:
        raise HandsegError("not a handseg splits file (no 'images' / 'n_folds')", path)
    return doc


def fold_samples(splits_path: str | Path, fold: int, data: str | Path | None = None,
                 runs: list | None = None) -> tuple[Path, list[Sample]]:
    """The held-out images of ``fold``: ``(data folder, samples)`` in submission order.

    Every run must have held that fold out (its manifest's fold and splits): otherwise its
    "out-of-fold" maps would be predictions on its own training images. ``data`` defaults to the
    folder the first run was trained on (its manifest), else the one the splits were made from.

    Raises:
        HandsegError: the splits do not name that fold, a run was trained with another fold or other
            splits, or the fold's images are not in the data folder.
    """
    import hashlib


    splits = read_splits(splits_path)
    if not 0 <= fold < splits["n_folds"]:
        raise HandsegError(f"--fold {fold} but the splits have {splits['n_folds']} folds", splits_path)
    wanted_sha = hashlib.sha256(Path(splits_path).read_bytes()).hexdigest()
    for run in runs or []:
        folder = Path(run) if Path(run).is_dir() else Path(run).parent
        if not (folder / MANIFEST_NAME).is_file():
            raise HandsegError(f"has no manifest to show it held fold {fold} out; give run folders", run)
        doc = read_json(folder / MANIFEST_NAME, "manifest")
        options, inputs = doc.get("options") or {}, doc.get("inputs") or {}
        if options.get("fold") != fold:
            raise HandsegError(f"was trained with --fold {options.get('fold')}, so fold {fold}'s images are among its "
                               "training images", run)
        used = inputs.get("splits")
        if used in (None, "None") or not Path(used).is_file() or \
                hashlib.sha256(Path(used).read_bytes()).hexdigest() != wanted_sha:
            raise HandsegError(f"was not trained with these splits ({used}), so its fold {fold} may differ", run)
        if data is None:
            data = inputs.get("data")
    if data is None:
        data = ((splits.get("manifest") or {}).get("inputs") or {}).get("data")
    if data is None:
        raise HandsegError("cannot tell which data folder the splits belong to; pass --data", splits_path)
    wanted = {im["path"] for im in splits["images"] if im.get("fold") == fold}
    samples = [s for s in discover(data, labels="optional") if s.rel in wanted]
    missing = wanted - {s.rel for s in samples}
    if missing:
        raise HandsegError(f"{len(missing)} images of fold {fold} are not in {data} (e.g. {sorted(missing)[0]})",
                           splits_path)
    if not samples:
        raise HandsegError(f"fold {fold} has no images", splits_path)
    return Path(data), samples
