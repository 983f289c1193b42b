"""One self-contained ``index.html``: static sections and figures, plus the page's data as JSON in a
``<script type="application/json">`` element and one small script (``assets/report.js``) that draws
the per-image table, its filters and the image viewer. No server, no CDN, no build step: the page
opens from the file system, offline.

Figures are matplotlib PNGs, written beside the page and embedded in it (so the page alone still
shows them); full-resolution overlays are files under ``overlays/`` that the page links to.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from handseg.analysis.reports.overlays import CLASS_COLOURS, DIFF_COLOURS
from handseg.common.constants import CLASSES


def asset(name: str) -> str:
    """The text of a file shipped in ``handseg/analysis/reports/assets/``."""
    return resources.files("handseg.analysis.reports").joinpath("assets", name).read_text(encoding="utf-8")


def pyplot():
    """matplotlib's pyplot on the Agg backend (reports are drawn without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def link(target: str | Path, folder: str | Path) -> str:
    """How a page in ``folder`` links to a file: a relative path where there is one (the report and
    the data can then move together), else a ``file://`` URI."""
    target, folder = Path(target).resolve(), Path(folder).resolve()
    try:
        return Path(os.path.relpath(target, folder)).as_posix()
    except ValueError:  # another drive (Windows)
        return target.as_uri()


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))


def relative_luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour given as 0..1 floats (or 0..255 ints)."""
    values = np.asarray(rgb[:3], dtype=np.float64)
    if values.max() > 1.0:
        values = values / 255.0
    linear = np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)
    return float(linear @ np.array([0.2126, 0.7152, 0.0722]))


def text_colour(background) -> str:
    """``"black"`` or ``"white"``: whichever has the higher WCAG contrast on ``background`` (RGB)."""
    lum = relative_luminance(background)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def page_json(obj: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>`` or ``<!--`` can appear in it)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def column(key: str, label: str, kind: str = "text", title: str = "", dice: bool = False) -> dict:
    """A per-image table column: ``kind`` is ``text``, ``num`` or ``dice``; ``dice=True`` makes it switch
    to one class's Dice when the table's class filter picks a class (see :meth:`Report.images`)."""
    col = {"key": key, "label": label, "type": kind}
    if title:
        col["title"] = title
    if dice:
        col["dice"] = True
    return col


def fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.4f}"
    return str(v)


class Report:
    """Collects sections, figures and the per-image data; :meth:`write` puts ``index.html`` in ``folder``."""

    def __init__(self, title: str, folder: str | Path):
        self.title, self.folder, self.parts = title, Path(folder), []
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data: dict | None = None

    def h2(self, text: str, anchor: str | None = None) -> None:
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self.parts.append(f"<h2{ident}>{html.escape(text)}</h2>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def warn(self, text: str) -> None:
        """A paragraph the reader must not miss (empty predictions)."""
        self.parts.append(f'<p class="hs-warn">{html.escape(text)}</p>')

    def table(self, header: list[str], rows: list[list]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
        # in a box of the page's width that scrolls sideways: six long CSV names do not widen the page
        self.parts.append(f'<div class="table-box"><table class="static"><tr>{head}</tr>{body}</table></div>')

    def _png(self, name: str, data: bytes) -> str:
        (self.folder / name).write_bytes(data)
        return f"data:image/png;base64,{base64.b64encode(data).decode()}"

    def figure(self, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        self.parts.append(f'<img class="figure" alt="{html.escape(name)}" src="{self._png(name, buf.getvalue())}">')

    def image_grid(self, items: list[tuple[str, np.ndarray, str, str | None]]) -> None:
        """Thumbnails ``(file name, RGB uint8 image, caption, image name to open in the viewer or None)``."""
        import cv2

        tiles = []
        for name, rgb, caption, image in items:
            # embedded only: small, so compressed hard (a third of the bytes of a fast encoding)
            png = cv2.imencode(".png", rgb[..., ::-1].copy(), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
            img = f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            if image is not None:
                img = f'<a href="#image={html.escape(_hash_value(image))}" title="open">{img}</a>'
            tiles.append(f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>")
        self.parts.append(f'<div class="grid">{"".join(tiles)}</div>')

    def legend(self) -> None:
        """The 29 class colours, as the overlays use them."""
        items = "".join(f'<span class="legend-item"><span class="swatch" style="background:{hex_colour(c)}">'
                        f"</span>{html.escape(n)}</span>" for n, c in zip(CLASSES, CLASS_COLOURS))
        self.parts.append(f'<div class="legend">{items}</div>')

    def images(self, columns: list[dict], rows: list[dict], panels: list[dict], note: str = "") -> None:
        """The per-image table and viewer, drawn by the page's script from this data.

        Args:
            columns: ``{"key", "label", "type": "text" | "num" | "dice", "dice": bool}``; a column with
                ``"dice": true`` switches to one class's Dice (``row["class_dice"][key]``) when the
                table's class filter picks a class.
            rows: one per image: ``{"image", "values": {key: value}, "class_dice": {key: [29]},
                "size": [H, W], "xray": path, "layers": {panel key: layer}, "diffs": {panel key: layer}}``
                (a layer as :class:`~handseg.analysis.reports.overlays.OverlayWriter` returns it).
            panels: the viewer's side-by-side panels, ``{"key", "label", "diff": bool}``.
        """
        self.data = {"classes": list(CLASSES), "colours": [hex_colour(c) for c in CLASS_COLOURS],
                     "diff_colours": {k: hex_colour(v) for k, v in DIFF_COLOURS.items()},
                     "columns": columns, "rows": rows, "panels": panels}
        if note:
            self.p(note)
        self.parts.append('<div id="hs-images"><noscript>The per-image table needs JavaScript.</noscript></div>')

    def write(self) -> Path:
        data = ""
        if self.data is not None:
            data = f'<script type="application/json" id="hs-data">{page_json(self.data)}</script>'
        page = ("<!doctype html><html><head><meta charset='utf-8'>"
                "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{html.escape(self.title)}</title><style>{asset('report.css')}</style></head>"
                f"<body><main><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</main>{data}"
                f"<script>{asset('report.js')}</script></body></html>")
        path = self.folder / "index.html"
        path.write_text(page, encoding="utf-8")
        return path


def _hash_value(image: str) -> str:
    from urllib.parse import quote

    return quote(image, safe="")
