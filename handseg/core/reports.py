"""HTML reports that a browser opens offline: every figure is a PNG beside ``index.html`` and is
also embedded in it (base64), so the page works when copied alone."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import numpy as np

from handseg.core.constants import CLASSES, NUM_CLASSES
from handseg.core.files import atomic_open, atomic_write_bytes

CSS = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}"
       "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
       "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:6px 0}"
       ".grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:280px}"
       "figcaption{font-size:12px;color:#555}")


class Report:
    """Collects sections and figures; ``write()`` puts index.html and the PNGs in a folder."""

    def __init__(self, title: str, folder: Path):
        self.title, self.folder, self.parts = title, Path(folder), []
        self.folder.mkdir(parents=True, exist_ok=True)

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def _png(self, name: str, data: bytes) -> str:
        atomic_write_bytes(self.folder / name, data)
        return f"data:image/png;base64,{base64.b64encode(data).decode()}"

    def figure(self, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        self.parts.append(f'<img alt="{html.escape(name)}" src="{self._png(name, buf.getvalue())}">')

    def image_grid(self, items: list[tuple[str, np.ndarray, str]]) -> None:
        """``(file name, RGB uint8 image, caption)`` tiles."""
        import cv2

        tiles = []
        for name, rgb, caption in items:
            ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            tiles.append(f'<figure><img alt="{html.escape(name)}" src="{self._png(name, png.tobytes())}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        self.parts.append(f'<div class="grid">{"".join(tiles)}</div>')

    def write(self) -> Path:
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}"
                "</body></html>")
        path = self.folder / "index.html"
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(page)
        return path


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.4f}"
    return str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _thumb(image: np.ndarray, width: int = 280) -> float:
    return width / image.shape[1]


def diff_overlay(image: np.ndarray | None, a: np.ndarray, b: np.ndarray, width: int = 280) -> np.ndarray:
    """RGB thumbnail comparing ``(C, H, W)`` masks class by class, on the X-ray: white where A and B
    give a pixel the same classes, red where A has a class B lacks (missed), green where B has a
    class A lacks (extra), yellow where both happen (a bone found but labelled as another)."""
    import cv2

    h, w = a.shape[1:]
    missed = (a & ~b).any(axis=0)
    extra = (b & ~a).any(axis=0)
    agree = (a & b).any(axis=0) & ~missed & ~extra
    base = np.zeros((h, w), np.uint8) if image is None else image
    rgb = np.repeat((base.astype(np.float32) * 0.6)[..., None], 3, axis=2)
    rgb[agree] = (255, 255, 255)
    rgb[missed & ~extra] = (255, 40, 40)
    rgb[extra & ~missed] = (40, 220, 40)
    rgb[missed & extra] = (255, 210, 0)
    s = _thumb(base, width)
    return cv2.resize(rgb.astype(np.uint8), (width, max(1, int(h * s))), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------------------------
# compare


def compare_report(result, out: Path, worst: int = 8) -> Path:
    """Per-class Dice bars, a similarity matrix (3+ CSVs), and diff overlays of the worst images."""
    from handseg.core.data import discover, read_image
    from handseg.core.metrics import dice_scores
    from handseg.core.rle import runs_to_mask

    plt = _plt()
    rep = Report("handseg compare", out)
    rep.p(f"Reference: {result.reference}. Dice per image and class, mean over images, then over classes.")
    rep.table(["CSV", "mean Dice"], [[n, r.mean_dice] for n, r in zip(result.names, result.reports)])

    rep.h2("Per-class Dice")
    fig, ax = plt.subplots(figsize=(13, 4))
    k = len(result.reports)
    x = np.arange(NUM_CLASSES)
    for i, (name, r) in enumerate(zip(result.names, result.reports)):
        ax.bar(x + (i - (k - 1) / 2) * 0.8 / k, r.dice.mean(axis=0), 0.8 / k, label=Path(name).name)
    ax.set_xticks(x, CLASSES, rotation=70, fontsize=8)
    ax.set_ylabel("Dice")
    ax.set_ylim(max(0.0, min(float(r.dice.mean(axis=0).min()) for r in result.reports) - 0.05), 1.0)
    ax.legend(fontsize=8)
    rep.figure("per_class.png", fig)
    rep.table(["class", *[Path(n).name for n in result.names]],
              [[c, *[r.per_class[c] for r in result.reports]] for c in CLASSES])

    if len(result.sets) > 2 or (result.gt_dir is None and len(result.sets) > 1):
        rep.h2("Model similarity (pairwise mean Dice)")
        sets = result.sets if result.gt_dir is not None else [result.reference_set, *result.sets]
        names = result.names if result.gt_dir is not None else [result.reference, *result.names]
        n = len(sets)
        sim = np.ones((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                sim[i, j] = sim[j, i] = dice_scores(sets[i], sets[j]).mean_dice
        fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1))
        im = ax.imshow(sim, vmin=min(0.9, float(sim.min())), vmax=1.0, cmap="viridis")
        short = [Path(s).name for s in names]
        ax.set_xticks(range(n), short, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), short, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{sim[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im)
        rep.figure("similarity.png", fig)

    rep.h2("Worst images (first CSV against the reference)")
    rep.p("Class by class. White: both agree; red: only in the reference (missed); green: only in the "
          "prediction (extra); yellow: a bone found but labelled as another class.")
    first, report = result.sets[0], result.reports[0]
    images = {}
    if result.gt_dir is not None:
        images = {s.name: s.image_path for s in discover(result.gt_dir, labels="ignore")}
    order = np.argsort(report.dice.mean(axis=1))[:worst]
    tiles = []
    for i in order:
        name = report.images[i]
        xray = read_image(images[name]) if name in images else None
        if xray is not None:
            shape = xray.shape
        else:
            ends = [int(r[0][-1] + r[1][-1]) for r in first.runs[name] + result.reference_set.runs[name] if r[0].size]
            side = int(np.ceil(np.sqrt(max(ends, default=1))))
            shape = (side, side)
        a = np.zeros((NUM_CLASSES, *shape), bool)
        b = np.zeros((NUM_CLASSES, *shape), bool)
        for c in range(NUM_CLASSES):
            runs_to_mask(result.reference_set.runs[name][c], shape, a[c])
            runs_to_mask(first.runs[name][c], shape, b[c])
        worst_c = int(np.argmin(report.dice[i]))
        caption = f"{name}: mean {report.dice[i].mean():.4f}, worst {CLASSES[worst_c]} {report.dice[i, worst_c]:.3f}"
        tiles.append((f"diff_{Path(name).stem}.png", diff_overlay(xray, a, b), caption))
    rep.image_grid(tiles)

    rep.h2("Worst classes")
    per_class = report.dice.mean(axis=0)
    rep.table(["class", "mean Dice", "worst image", "its Dice"],
              [[CLASSES[c], per_class[c], report.images[int(np.argmin(report.dice[:, c]))],
                float(report.dice[:, c].min())] for c in np.argsort(per_class)[:10]])
    return rep.write()


# ----------------------------------------------------------------------------------------------
# eda


def eda_report(data: Path, out: Path, pred_csv: Path | None = None, meta: Path | None = None,
               grid: int = 8, progress=None) -> Path:
    """A data-set report: counts, sizes, intensities, areas, overlaps, handedness, wrist bend, meta
    data, label overlays; with ``pred_csv`` and labels also Dice against area and the worst cases."""
    import cv2

    from handseg.core.data import class_masks, class_runs, discover, hand_side, read_image, read_polygons, wrist_bend
    from handseg.core.meta import read_meta
    from handseg.core.submission import PredictionSet

    plt = _plt()
    samples = discover(data, labels="optional")
    labelled = [s for s in samples if s.label_path is not None]
    rep = Report(f"handseg eda: {data}", out)
    per_id = Counter(s.patient for s in samples)
    sizes = Counter()
    hist = np.zeros(256)
    areas = np.zeros((len(labelled), NUM_CLASSES))
    pairs = Counter()
    multi_px = total_px = 0
    sides = Counter()
    bends = []
    tiles = []
    colours = (plt.get_cmap("tab20")(np.linspace(0, 1, NUM_CLASSES))[:, :3] * 255).astype(np.uint8)
    label_index = {s.rel: i for i, s in enumerate(labelled)}
    # with a prediction to score, the ground truth is collected in the same pass over the labels
    truth = PredictionSet(Path(data)) if pred_csv is not None else None
    if progress:
        progress(total=len(samples))
    for s in samples:
        image = read_image(s.image_path)
        sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
        hist += np.bincount(image.ravel(), minlength=256)
        if s.label_path is not None:
            polys = read_polygons(s.label_path)
            masks = class_masks(polys, image.shape)
            i = label_index[s.rel]
            areas[i] = masks.reshape(NUM_CLASSES, -1).sum(axis=1) / image.size
            count = masks.sum(axis=0)
            multi_px += int((count > 1).sum())
            total_px += int((count > 0).sum())
            for a in range(NUM_CLASSES):
                for b in range(a + 1, NUM_CLASSES):
                    if (masks[a] & masks[b]).any():
                        pairs[(CLASSES[a], CLASSES[b])] += 1
            side = hand_side(polys) or "unknown"
            sides[side] += 1
            if truth is not None:
                truth.images.append(s.name)
                truth.runs[s.name] = class_runs(polys, image.shape)
            bends.append(wrist_bend(polys))
            if len(tiles) < grid:
                rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
                for c in range(NUM_CLASSES):
                    rgb[masks[c]] = 0.5 * rgb[masks[c]] + 0.5 * colours[c]
                s_ = _thumb(image)
                thumb = cv2.resize(rgb.astype(np.uint8), (280, int(image.shape[0] * s_)), interpolation=cv2.INTER_AREA)
                tiles.append((f"labels_{s.stem}.png", thumb, f"{s.rel} ({side} hand)"))
        if progress:
            progress()

    rep.h2("Overview")
    rep.table(["what", "value"], [["images", len(samples)], ["patients (IDs)", len(per_id)],
                                  ["labelled images", len(labelled)],
                                  ["images per ID", ", ".join(f"{k} images: {v} IDs" for k, v in
                                                              sorted(Counter(per_id.values()).items()))],
                                  ["sizes", ", ".join(f"{k}: {v}" for k, v in sizes.most_common())],
                                  ["handedness (by geometry)", ", ".join(f"{k}: {v}" for k, v in sides.items())]])
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(np.arange(256), hist / max(hist.sum(), 1), width=1.0)
    ax.set_xlabel("pixel value")
    ax.set_ylabel("fraction")
    ax.set_yscale("log")
    ax.set_title("Intensity histogram (all images)")
    rep.figure("intensity.png", fig)

    if labelled:
        rep.h2("Per-class area (fraction of the image)")
        fig, ax = plt.subplots(figsize=(13, 4))
        ax.boxplot([areas[:, c] for c in range(NUM_CLASSES)], showfliers=False)
        ax.set_xticks(np.arange(1, NUM_CLASSES + 1), CLASSES, rotation=70, fontsize=8)
        ax.set_yscale("log")
        rep.figure("areas.png", fig)
        rep.h2("Overlaps")
        rep.p(f"{multi_px} of {total_px} bone pixels carry two or more labels "
              f"({100 * multi_px / max(total_px, 1):.2f}%).")
        rep.table(["pair", "images"], [[f"{a} / {b}", n] for (a, b), n in pairs.most_common(12)])
        rep.h2("Wrist bend (degrees, + towards the little finger)")
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(bends, bins=20)
        ax.set_xlabel("estimated wrist bend")
        rep.figure("wrist_bend.png", fig)
        rep.p(f"|bend| > 10 degrees: {sum(abs(b) > 10 for b in bends)} of {len(bends)} images.")
        rep.h2("Labels over the images")
        rep.image_grid(tiles)

    meta = meta or Path(data).parent / "meta_data.xlsx"
    if meta.is_file():
        table = read_meta(meta)
        rep.h2("Meta data")
        fig, axes = plt.subplots(1, 4, figsize=(14, 3))
        for ax, col in zip(axes, ("age", "height_cm", "weight_kg")):
            ax.hist(table[col].dropna(), bins=15)
            ax.set_title(col)
        counts = table["sex"].value_counts()
        axes[3].bar(counts.index.astype(str), counts.values)
        axes[3].set_title(f"sex (nail art: {int(table['nail_art'].sum())})")
        rep.figure("meta.png", fig)

    if pred_csv is not None and labelled:
        from handseg.core.metrics import dice_scores
        from handseg.core.submission import read_predictions

        rep_scores = dice_scores(truth, read_predictions(pred_csv))
        rep.h2(f"Prediction {pred_csv.name}: mean Dice {rep_scores.mean_dice:.4f}")
        fig, ax = plt.subplots(figsize=(7, 4))
        mean_area = areas.mean(axis=0)
        per_class = rep_scores.dice.mean(axis=0)
        ax.scatter(mean_area, per_class)
        for c in range(NUM_CLASSES):
            ax.annotate(CLASSES[c], (mean_area[c], per_class[c]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("mean class area (fraction of image)")
        ax.set_ylabel("Dice")
        rep.figure("dice_vs_area.png", fig)
        worst = np.argsort(rep_scores.dice.ravel())[:10]
        rep.table(["image", "class", "Dice"], [[rep_scores.images[i // NUM_CLASSES], CLASSES[i % NUM_CLASSES],
                                                float(rep_scores.dice.ravel()[i])] for i in worst])
    return rep.write()
