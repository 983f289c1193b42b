"""The ``compare --out`` report: scores per class and per image, model similarity, and every image's
masks and differences from the reference at full resolution."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from handseg.analysis.compare import Comparison, empty_words
from handseg.analysis.metrics import dice_scores
from handseg.analysis.reports.overlays import OverlayWriter
from handseg.analysis.reports.page import Report, column, link, pyplot, text_colour
from handseg.common.constants import CLASSES, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.data.images import read_image


def similarity_figure(names: list[str], sim: np.ndarray):
    """A heatmap of pairwise mean Dice whose cell text is black or white by the cell's luminance."""
    plt = pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1))
    im = ax.imshow(sim, vmin=min(0.9, float(sim.min())), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.3f}", ha="center", va="center", fontsize=7,
                    color=text_colour(im.cmap(im.norm(sim[i, j]))))
    fig.colorbar(im)
    return fig


def _read_xray(path: Path, shape: tuple[int, int]) -> np.ndarray:

    image = read_image(path)
    if image.shape != shape:
        raise HandsegError(f"decodes to {image.shape[1]} x {image.shape[0]}, its PNG header says "
                           f"{shape[1]} x {shape[0]}", path)
    return image


def compare_report(result: Comparison, out: Path, progress: Callable[..., None] | None = None, worst: int = 6,
                   thumb_width: int = 240) -> Path:
    """Write ``index.html`` and ``overlays/`` for a comparison into ``out``.

    Needs the images (``result.samples`` and ``result.shapes``, from ``--gt`` or ``--data``): every
    image is read, its masks decoded and its overlay files written one image at a time.

    Args:
        result: from :func:`handseg.analysis.compare.score_comparison`.
        out: the report folder (written into as it is; build it inside ``atomic_dir``).
        progress: ``progress(total=n)`` once, then ``progress()`` per image.
        worst: how many of each CSV's worst images get an embedded thumbnail.

    Raises:
        HandsegError: the images are not known, or an X-ray does not decode to its header's size.
    """

    plt = pyplot()
    ref = result.reference_set
    if any(name not in result.samples for name in ref.images):
        raise HandsegError("the report needs the images: give --data DIR (the X-rays) or --gt DIR")
    ref_key = "gt" if result.gt_dir is not None else "ref"
    keys = [f"csv{k + 1}" for k in range(len(result.sets))]
    short = result.labels  # the shortest distinct path suffixes: teams name every file submission.csv
    panels = [{"key": ref_key, "label": "ground truth" if result.gt_dir is not None
               else f"{result.reference_label} (reference)", "title": result.reference}]
    panels += [{"key": key, "label": s, "title": n, "diff": True} for key, s, n in zip(keys, short, result.names)]

    dice = np.stack([r.dice for r in result.reports])  # (K, n_images, 29)
    worst_of = [set(np.argsort(d.mean(axis=1), kind="stable")[:worst].tolist()) for d in dice]
    thumbs: list[list[tuple[float, str, np.ndarray, str, str]]] = [[] for _ in keys]
    with OverlayWriter(out) as writer:
        if progress is not None:
            progress(total=len(ref.images))
        rows = []
        for i, name in enumerate(ref.images):
            rows.append(_image_row(result, writer, i, name, keys, ref_key, dice, worst_of, thumbs, thumb_width, out))
            if progress is not None:
                progress()
    rep = Report("handseg compare", out)
    rep.p(f"Reference: {result.reference}. Dice per image and class, mean over images, then over classes "
          f"({len(ref.images)} images).")
    _warn_empty(rep, result, short)
    rep.table(["CSV", "path", "mean Dice"],
              [[s, n, r.mean_dice] for s, n, r in zip(short, result.names, result.reports)])

    _images_section(rep, result, keys, panels, rows)
    _charts(rep, result, plt)
    _worst(rep, result, thumbs)
    return rep.write()


def _image_row(result: Comparison, writer: OverlayWriter, i: int, name: str, keys: list[str], ref_key: str,
               dice: np.ndarray, worst_of: list[set], thumbs: list, thumb_width: int, out: Path) -> dict:
    """One image: its masks and differences written, its worst images' thumbnails kept, its table row."""
    short = result.labels
    ref = result.reference_set
    sample, shape = result.samples[name], result.shapes[name]
    # the X-ray's pixels are needed only for the thumbnails of the worst images
    xray = _read_xray(sample.image_path, shape) if any(i in w for w in worst_of) else None
    prefix = writer.prefix(sample.patient, Path(name).stem)
    truth = writer.decode(ref.runs[name], shape)
    layers = {ref_key: writer.masks(prefix, ref_key, truth, shape)[0]}
    diffs = {}
    for k, (key, pred_set) in enumerate(zip(keys, result.sets)):
        pred = writer.decode(pred_set.runs[name], shape)
        layers[key] = writer.masks(prefix, key, pred, shape)[0]
        width = thumb_width if i in worst_of[k] else 0
        diffs[key], thumb = writer.diff(prefix, key, truth, pred, shape, xray if width else None, width)
        if thumb is not None:
            score = float(dice[k, i].mean())
            c = int(np.argmin(dice[k, i]))
            caption = f"{name}: mean {score:.4f}, worst {CLASSES[c]} {dice[k, i, c]:.3f}"
            thumbs[k].append((score, f"diff_{key}_{prefix}.png", thumb, caption, name))
    k_worst, c_worst = np.unravel_index(int(np.argmin(dice[:, i])), (len(keys), NUM_CLASSES))
    values = {"image": name, "patient": sample.patient, "size": f"{shape[1]} x {shape[0]}",
              **{key: float(dice[k, i].mean()) for k, key in enumerate(keys)},
              "worst": CLASSES[c_worst], "worst_dice": float(dice[k_worst, i, c_worst])}
    if len(keys) > 1:
        values["worst_in"] = short[k_worst]
    return {"image": name, "size": list(shape), "xray": link(sample.image_path, out), "values": values,
            "class_dice": {key: [round(float(v), 4) for v in dice[k, i]] for k, key in enumerate(keys)},
            "layers": layers, "diffs": diffs}


def _images_section(rep: Report, result: Comparison, keys: list[str], panels: list, rows: list) -> None:
    """The per-image table and its viewer."""
    short = result.labels
    rep.h2("Images", anchor="images")
    columns = [column("image", "image"), column("patient", "patient"), column("size", "W x H")]
    columns += [column(key, s, "dice", f"mean Dice of {n} (or of the class picked above)", dice=True)
                for key, s, n in zip(keys, short, result.names)]
    columns += [column("worst", "worst class", title="the lowest Dice of the image, over classes and CSVs"),
                column("worst_dice", "its Dice", "dice")]
    if len(keys) > 1:
        columns.append(column("worst_in", "in", title="the CSV with the worst class"))
    rep.images(columns, rows, panels, note="Every image, one row each: click a row to see its masks at full "
               "resolution, the reference and every CSV side by side, one class at a time or all, with the "
               "differences from the reference. Sort by a column; filter by text or e.g. 'Dice<0.9'. The X-rays are "
               "linked from the data folder, not copied: keep the two together.")
    rep.legend()


def _charts(rep: Report, result: Comparison, plt) -> None:
    """Per-class Dice of every CSV, and how alike the CSVs are."""
    short, ref = result.labels, result.reference_set
    rep.h2("Per-class Dice")
    fig, ax = plt.subplots(figsize=(13, 4))
    k = len(result.reports)
    x = np.arange(NUM_CLASSES)
    for j, (s, r) in enumerate(zip(short, result.reports)):
        ax.bar(x + (j - (k - 1) / 2) * 0.8 / k, r.dice.mean(axis=0), 0.8 / k, label=s)
    ax.set_xticks(x, CLASSES, rotation=70, fontsize=8)
    ax.set_ylabel("Dice")
    ax.set_ylim(max(0.0, min(float(r.dice.mean(axis=0).min()) for r in result.reports) - 0.05), 1.0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    rep.figure("per_class.png", fig)
    rep.table(["class", *short], [[c, *[_dice_cell(r, c) for r in result.reports]] for c in CLASSES])

    if len(result.sets) > 2 or (result.gt_dir is None and len(result.sets) > 1):
        rep.h2("Model similarity (pairwise mean Dice)")
        sets = result.sets if result.gt_dir is not None else [ref, *result.sets]
        names = short if result.gt_dir is not None else [result.reference_label, *short]
        n = len(sets)
        sim = np.ones((n, n))
        for a in range(n):
            for b in range(a + 1, n):
                sim[a, b] = sim[b, a] = dice_scores(sets[a], sets[b]).mean_dice
        rep.figure("similarity.png", similarity_figure(names, sim))


def _worst(rep: Report, result: Comparison, thumbs: list) -> None:
    """Each CSV's worst images (thumbnails of the differences) and the first CSV's worst classes."""
    short = result.labels
    rep.h2("Worst images")
    rep.p("Class by class against the reference. White: both agree; red: only in the reference (missed); "
          "green: only in the CSV (extra); yellow: a bone found but labelled as another class. Click to open.")
    for s, tiles in zip(short, thumbs):
        rep.p(f"{s}:")
        tiles.sort(key=lambda t: t[0])
        rep.image_grid([(file, rgb, caption, image) for _, file, rgb, caption, image in tiles])

    rep.h2("Worst classes")
    first = result.reports[0]
    per_class = first.dice.mean(axis=0)
    rep.p(f"{short[0]} against the reference.")
    rep.table(["class", "mean Dice", "worst image", "its Dice"],
              [[CLASSES[c], per_class[c], first.images[int(np.argmin(first.dice[:, c]))],
                float(first.dice[:, c].min())] for c in np.argsort(per_class)[:10]])


def _warn_empty(rep, result, short: list[str]) -> None:
    """Say which CSVs (and the reference) predict no pixel of a class: a Dice of 1 there is no score."""
    for label, report in zip(short, result.reports):
        words = empty_words(label, report)
        if words:
            rep.warn(f"Empty: {words}; a Dice of 1 there only means the reference is empty too.")
    reference_empty = result.reports[0].reference_empty_classes if result.reports else []
    if reference_empty:
        rep.warn(f"Empty: the reference has no pixel of {', '.join(reference_empty)} on any image.")


def _dice_cell(report, c: str):
    """A per-class Dice for the static table, marked where the CSV predicts the class on no image."""
    return f"{report.per_class[c]:.4f} (empty)" if c in report.empty_classes else report.per_class[c]
