"""The ``eda --out`` report: a data set (and a prediction on it), with per-image facts and every image's
labels (and predicted masks) at full resolution."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handseg.analysis.metrics import dice_value
from handseg.analysis.reports.overlays import ClassCrops, OverlayWriter, crops_from_polygons
from handseg.analysis.reports.page import Report, column, link, pyplot
from handseg.common.constants import CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data.anatomy import hand_side, wrist_bend
from handseg.data.images import image_size, read_image
from handseg.data.labels import read_polygons
from handseg.data.layout import Sample, discover
from handseg.data.meta import read_meta
from handseg.formats.rle import EMPTY_RUNS, crop_to_runs, intersection_area
from handseg.formats.submission import PredictionSet, check_fits, check_same_images, read_predictions


@dataclass
class EdaInputs:
    """A data folder, its sizes, and the optional prediction and meta data, all read and checked."""

    data: Path
    samples: list[Sample]
    shapes: dict[str, tuple[int, int]]
    """``Sample.rel`` -> ``(H, W)`` from the PNG header."""
    pred: PredictionSet | None = None
    meta: object | None = None
    """The meta-data DataFrame (indexed by patient ID), or None."""
    meta_path: Path | None = None
    patients: list[str] = field(default_factory=list)


def read_eda_inputs(data: Path, pred_csv: Path | PredictionSet | None = None, meta: Path | None = None) -> EdaInputs:
    """Read and check everything ``eda`` needs before it starts: the images' sizes (PNG headers), the
    prediction CSV (same images as the folder, every run inside its image) and the meta data.

    Args:
        data: a folder with ``DCM/`` (and ``outputs_json/`` for labels).
        pred_csv: a prediction CSV for the folder's images, or predictions already read (the runs of a CV).
        meta: ``meta_data.xlsx``; without it ``DATA/../meta_data.xlsx`` is used if it exists.

    Raises:
        HandsegError: naming the file and the problem.
    """

    samples = discover(data, labels="optional")
    inputs = EdaInputs(Path(data), samples, {s.rel: image_size(s.image_path) for s in samples})
    inputs.patients = sorted({s.patient for s in samples})
    if pred_csv is not None:
        pred = pred_csv if isinstance(pred_csv, PredictionSet) else read_predictions(pred_csv)
        names = [s.name for s in samples]
        if len(set(names)) != len(names):
            dup = next(n for n, c in Counter(names).items() if c > 1)
            raise HandsegError(f"two images are named {dup}; the CSV's rows could not tell them apart", data)
        check_same_images(PredictionSet(Path(data), images=names), pred)
        check_fits(pred, {s.name: inputs.shapes[s.rel] for s in samples})
        inputs.pred = pred
    if meta is None and (Path(data).parent / "meta_data.xlsx").is_file():
        meta = Path(data).parent / "meta_data.xlsx"
    if meta is not None:
        inputs.meta, inputs.meta_path = read_meta(meta), Path(meta)
    return inputs


def _boxes_overlap(a, b) -> tuple[slice, slice, slice, slice] | None:
    """Where two crops ``(crop, row0, col0)`` overlap, as slices into each; None if their boxes are apart."""
    (ca, ra, xa), (cb, rb, xb) = a, b
    r0, r1 = max(ra, rb), min(ra + ca.shape[0], rb + cb.shape[0])
    c0, c1 = max(xa, xb), min(xa + ca.shape[1], xb + cb.shape[1])
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0 - ra, r1 - ra), slice(c0 - xa, c1 - xa), slice(r0 - rb, r1 - rb), slice(c0 - xb, c1 - xb)


class _Overlaps:
    """Counts multi-label pixels and overlapping class pairs from crops, with one reusable count image."""

    def __init__(self):
        self.pairs: Counter = Counter()
        self.multi = self.total = 0
        self._count = np.zeros((0, 0), np.uint8)

    def add(self, crops: ClassCrops, shape: tuple[int, int]) -> None:
        if self._count.shape != shape:
            self._count = np.zeros(shape, np.uint8)
        present = [(c, it) for c, it in enumerate(crops) if it is not None]
        if not present:
            return
        for _, (crop, r0, c0) in present:
            self._count[r0 : r0 + crop.shape[0], c0 : c0 + crop.shape[1]] += crop.view(np.uint8)
        r0 = min(it[1] for _, it in present)
        r1 = max(it[1] + it[0].shape[0] for _, it in present)
        c0 = min(it[2] for _, it in present)
        c1 = max(it[2] + it[0].shape[1] for _, it in present)
        region = self._count[r0:r1, c0:c1]
        self.multi += int(np.count_nonzero(region > 1))
        self.total += int(np.count_nonzero(region))
        region[:] = 0
        for i, (a, ia) in enumerate(present):
            for b, ib in present[i + 1 :]:
                where = _boxes_overlap(ia, ib)
                if where is not None and (ia[0][where[0], where[1]] & ib[0][where[2], where[3]]).any():
                    self.pairs[(CLASSES[a], CLASSES[b])] += 1


def _meta_facts(meta, patient: str) -> dict:
    if meta is None or patient not in meta.index:
        return {}
    row = meta.loc[[patient]].iloc[0]

    def number(v):
        return None if v is None or v != v else float(v)

    sex = row.get("sex")
    return {"age": number(row.get("age")), "sex": sex if isinstance(sex, str) else "",
            "nail_art": "yes" if bool(row.get("nail_art")) else "no"}


@dataclass
class _Scan:
    """What one pass over the images gathers for the report."""

    sizes: Counter = field(default_factory=Counter)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(256))
    areas: list = field(default_factory=list)
    bends: list = field(default_factory=list)
    dice_rows: list = field(default_factory=list)
    scored: list = field(default_factory=list)
    sides: Counter = field(default_factory=Counter)
    overlaps: _Overlaps = field(default_factory=lambda: _Overlaps())
    tiles: list = field(default_factory=list)
    rows: list = field(default_factory=list)


def eda_report(inputs: EdaInputs, out: Path, progress: Callable[..., None] | None = None, grid: int = 8,
               thumb_width: int = 240) -> Path:
    """A data-set report: counts, sizes, intensities, areas, overlaps, handedness, wrist bend, meta
    data of the folder's patients, a per-image table and every image's overlays; with a prediction
    also its masks, its differences from the labels and its Dice.

    Images are read and drawn one at a time (``progress()`` after each, ``progress(total=n)`` first).

    Args:
        inputs: from :func:`read_eda_inputs`.
        out: the report folder (written into as it is; build it inside ``atomic_dir``).
        grid: how many labelled images get an embedded thumbnail.
    """
    plt = pyplot()
    labelled = [s for s in inputs.samples if s.label_path is not None]
    scan = _Scan()
    with OverlayWriter(out) as writer:
        if progress is not None:
            progress(total=len(inputs.samples))
        for s in inputs.samples:
            _scan_image(s, inputs, writer, scan, out, thumb_width if len(scan.tiles) < grid else 0)
            if progress is not None:
                progress()
    rep = Report(f"handseg eda: {inputs.data}", out)
    _overview(rep, inputs, labelled, scan)
    _images_section(rep, inputs, labelled, scan)
    _distributions(rep, plt, labelled, scan)
    if inputs.meta is not None:
        _meta_section(rep, plt, inputs.meta, inputs)
    if scan.dice_rows:
        _prediction_section(rep, plt, inputs, labelled, scan)
    return rep.write()


def _scan_image(s, inputs: EdaInputs, writer: OverlayWriter, scan: _Scan, out: Path, thumb_width: int) -> None:
    """One image: its facts, its labels' overlays and statistics, and the prediction's masks and Dice."""
    shape = inputs.shapes[s.rel]
    image = read_image(s.image_path)
    if image.shape != shape:
        raise HandsegError(f"decodes to {image.shape[1]} x {image.shape[0]}, its PNG header says "
                           f"{shape[1]} x {shape[0]}", s.image_path)
    scan.sizes[f"{shape[1]}x{shape[0]}"] += 1
    scan.hist += np.bincount(image.ravel(), minlength=256)
    prefix = writer.prefix(s.patient, s.stem)
    values: dict = {"image": s.rel, "patient": s.patient, "size": f"{shape[1]} x {shape[0]}",
                    "intensity": float(image.mean()), "labelled": "yes" if s.label_path else "no",
                    **_meta_facts(inputs.meta, s.patient)}
    row: dict = {"image": s.rel, "size": list(shape), "values": values, "layers": {}, "diffs": {}}
    truth: ClassCrops | None = None
    if s.label_path is not None:
        polygons = read_polygons(s.label_path)
        truth = crops_from_polygons(polygons, shape, s.label_path)
        scan.areas.append([0.0 if it is None else np.count_nonzero(it[0]) / image.size for it in truth])
        scan.overlaps.add(truth, shape)
        side = hand_side(polygons) or "unknown"
        scan.sides[side] += 1
        bend = wrist_bend(polygons)
        scan.bends.append(bend)
        values.update(side=side, bend=round(bend, 2))
        row["layers"]["gt"], thumb = writer.masks(prefix, "gt", truth, shape, image if thumb_width else None,
                                                  thumb_width)
        if thumb is not None:
            scan.tiles.append((f"labels_{prefix}.png", thumb, f"{s.rel} ({side} hand)", s.rel))
    if inputs.pred is not None:
        _scan_prediction(s, inputs.pred.runs[s.name], truth, shape, prefix, writer, scan, values, row)
    row["xray"] = link(s.image_path, out)
    scan.rows.append(row)


def _scan_prediction(s, runs, truth, shape, prefix: str, writer: OverlayWriter, scan: _Scan, values: dict,
                     row: dict) -> None:
    guess = writer.decode(runs, shape)
    row["layers"]["pred"] = writer.masks(prefix, "pred", guess, shape)[0]
    if truth is None:
        return
    row["diffs"]["pred"] = writer.diff(prefix, "pred", truth, guess, shape)[0]
    truth_runs = [EMPTY_RUNS if it is None else crop_to_runs(*it, shape[1]) for it in truth]
    d = np.array([dice_value(intersection_area(t, p), int(t[1].sum()), int(p[1].sum()))
                  for t, p in zip(truth_runs, runs)])
    scan.dice_rows.append(d)
    scan.scored.append(s.rel)
    c = int(np.argmin(d))
    values.update(pred=float(d.mean()), worst=CLASSES[c], worst_dice=float(d[c]))
    row["class_dice"] = {"pred": [round(float(v), 4) for v in d]}


def _overview(rep: Report, inputs: EdaInputs, labelled: list, scan: _Scan) -> None:
    per_id = Counter(s.patient for s in inputs.samples)
    rep.h2("Overview")
    rep.table(["what", "value"], [["images", len(inputs.samples)], ["patients (IDs)", len(per_id)],
                                  ["labelled images", len(labelled)],
                                  ["images per ID", ", ".join(f"{k} images: {v} IDs" for k, v in
                                                              sorted(Counter(per_id.values()).items()))],
                                  ["sizes", ", ".join(f"{k}: {v}" for k, v in scan.sizes.most_common())],
                                  ["handedness (by geometry)",
                                   ", ".join(f"{k}: {v}" for k, v in scan.sides.items()) or "no labels"]])


def _images_section(rep: Report, inputs: EdaInputs, labelled: list, scan: _Scan) -> None:
    """The per-image table and its viewer."""
    pred = inputs.pred
    rep.h2("Images", anchor="images")
    columns = [column("image", "image"), column("patient", "patient"), column("size", "W x H"),
               column("intensity", "mean intensity", "num")]
    if labelled and len(labelled) < len(inputs.samples):
        columns.append(column("labelled", "labelled"))
    if labelled:
        columns += [column("side", "side", title="hand side, by geometry"),
                    column("bend", "wrist bend", "num", "degrees, + towards the little finger")]
    if inputs.meta is not None:
        columns += [column("age", "age", "num"), column("sex", "sex"), column("nail_art", "nail art")]
    panels = [{"key": "gt", "label": "labels"}]
    if pred is not None:
        panels.append({"key": "pred", "label": Path(str(pred.path)).name, "title": str(pred.path),
                       "diff": bool(labelled)})
        if labelled:
            columns += [column("pred", "Dice", "dice", "mean Dice of the prediction (or of the class picked above)",
                               dice=True),
                        column("worst", "worst class"), column("worst_dice", "its Dice", "dice")]
    rep.images(columns, scan.rows, panels, note="Every image, one row each: click a row to see its labels"
               + (" and the prediction" if pred is not None else "") + " at full resolution, one class at a time "
               "or all. Sort by a column; filter by text or e.g. 'bend>10'. The X-rays are linked from the data "
               "folder, not copied: keep the two together.")
    rep.legend()


def _distributions(rep: Report, plt, labelled: list, scan: _Scan) -> None:
    """Intensities, and with labels: class areas, overlaps, wrist bend and the labels over the images."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(np.arange(256), scan.hist / max(scan.hist.sum(), 1), width=1.0)
    ax.set_xlabel("pixel value")
    ax.set_ylabel("fraction")
    ax.set_yscale("log")
    ax.set_title("Intensity histogram (all images)")
    rep.h2("Intensities")
    rep.figure("intensity.png", fig)

    if labelled:
        area = np.array(scan.areas)
        rep.h2("Per-class area (fraction of the image)")
        fig, ax = plt.subplots(figsize=(13, 4))
        ax.boxplot([area[:, c] for c in range(NUM_CLASSES)], showfliers=False)
        ax.set_xticks(np.arange(1, NUM_CLASSES + 1), CLASSES, rotation=70, fontsize=8)
        ax.set_yscale("log")
        rep.figure("areas.png", fig)
        rep.h2("Overlaps")
        rep.p(f"{scan.overlaps.multi} of {scan.overlaps.total} bone pixels carry two or more labels "
              f"({100 * scan.overlaps.multi / max(scan.overlaps.total, 1):.2f}%).")
        rep.table(["pair", "images"],
                  [[f"{a} / {b}", n] for (a, b), n in scan.overlaps.pairs.most_common(12)])
        rep.h2("Wrist bend (degrees, + towards the little finger)")
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(scan.bends, bins=20)
        ax.set_xlabel("estimated wrist bend")
        rep.figure("wrist_bend.png", fig)
        rep.p(f"|bend| > 10 degrees: {sum(abs(b) > 10 for b in scan.bends)} of {len(scan.bends)} images.")
        rep.h2("Labels over the images")
        rep.image_grid(scan.tiles)


def _prediction_section(rep: Report, plt, inputs: EdaInputs, labelled: list, scan: _Scan) -> None:
    """The prediction's Dice per class against class area, and its worst images and classes."""
    dice = np.array(scan.dice_rows)
    per_class = dice.mean(axis=0)
    rep.h2(f"Prediction {Path(str(inputs.pred.path)).name}: mean Dice {per_class.mean():.4f}")
    rep.p(f"Over the {len(scan.scored)} labelled images.")
    fig, ax = plt.subplots(figsize=(7, 4))
    index = {rel: i for i, rel in enumerate(s.rel for s in labelled)}
    mean_area = np.array(scan.areas)[[index[r] for r in scan.scored]].mean(axis=0)
    ax.scatter(mean_area, per_class)
    for c in range(NUM_CLASSES):
        ax.annotate(CLASSES[c], (mean_area[c], per_class[c]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("mean class area (fraction of image)")
    ax.set_ylabel("Dice")
    rep.figure("dice_vs_area.png", fig)
    worst = np.argsort(dice.ravel(), kind="stable")[:10]
    rep.table(["image", "class", "Dice"], [[scan.scored[i // NUM_CLASSES], CLASSES[i % NUM_CLASSES],
                                            float(dice.ravel()[i])] for i in worst])


def _meta_section(rep: Report, plt, meta, inputs: EdaInputs) -> None:
    """Meta data of the patients whose images are in the folder (not the whole spreadsheet)."""
    table = meta[meta.index.isin(inputs.patients)]
    without = [p for p in inputs.patients if p not in meta.index]
    rep.h2("Meta data")
    note = (f"{table.index.nunique()} of the {len(inputs.patients)} patients in {inputs.data} have a row in "
            f"{inputs.meta_path} (which has {len(meta)} rows; the others are left out).")
    if without:
        note += f" No row for {len(without)}: {', '.join(without[:10])}{' ...' if len(without) > 10 else ''}."
    rep.p(note)
    if table.empty:
        return
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, col in zip(axes, ("age", "height_cm", "weight_kg")):
        if col in table:
            ax.hist(table[col].dropna(), bins=15)
        ax.set_title(col)
    counts = table["sex"].value_counts() if "sex" in table else None
    if counts is not None:
        axes[3].bar(counts.index.astype(str), counts.values)
    nails = int(table["nail_art"].sum()) if "nail_art" in table else 0
    axes[3].set_title(f"sex (nail art: {nails})")
    rep.figure("meta.png", fig)
