"""``handseg prep``: PNG + JSON to fast, memory-mappable caches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import DataDir, Workers

app = typer.Typer(help="Cache images and masks for fast loading (idempotent: up-to-date files are skipped). "
                  "train reads DATA/cache when it is there.",
                  epilog="Example: handseg prep json2npy --data data && handseg prep png2npy --data data",
                  no_args_is_help=True)

CacheOut = Annotated[Path | None, typer.Option("--out", "-o", help="Cache folder (default: DATA/cache).")]


def _run(kind: str, data: Path, out: Path | None, workers: int | None) -> None:
    from handseg.commands.options import say_data
    from handseg.console import progress_task, stdout
    from handseg.data.cache import build_cache, default_cache_dir, default_workers
    from handseg.data.layout import resolve_data
    from handseg.formats.files import check_output

    source = resolve_data(data, "train")
    say_data(source)
    data = source.root
    out = out or default_cache_dir(data)
    if out.exists() and not out.is_dir():
        check_output(out, kind="dir")
    workers = workers or default_workers()
    with progress_task(f"prep {kind}") as tick:
        result = build_cache(kind, data, out, workers=workers, progress=tick)
    stdout.print(f"{kind}: {result.written} written, {result.skipped} up to date -> {result.folder}")


@app.command("json2npy")
def json2npy(data: DataDir = Path("data/train"), out: CacheOut = None, workers: Workers = None) -> None:  # type: ignore[assignment]
    """Rasterise every polygon JSON into packed multi-label masks (29 channels, overlaps kept).

    Example: handseg prep json2npy --data data/train --out cache/train --workers 8
    """
    _run("masks", data, out, workers)


@app.command("png2npy")
def png2npy(data: DataDir = Path("data/train"), out: CacheOut = None, workers: Workers = None) -> None:  # type: ignore[assignment]
    """Decode every PNG into a memory-mappable uint8 .npy.

    Example: handseg prep png2npy --data data/train --out cache/train
    """
    _run("images", data, out, workers)
