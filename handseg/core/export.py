"""Shareable models: run folders (and a recipe) in one zip file that another machine predicts with.

``model.zip`` holds ``handseg_model.json`` (what is inside), the checkpoints as
``models/<name>/best.safetensors`` (weights and model card: nothing pickled), and with a recipe its
``recipe.json`` whose run paths point at those folders. ``handseg predict model.zip`` opens it into
a temporary folder beside its output, reading only the members the index names.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from handseg import __version__
from handseg.core.checkpoint import BEST, ModelCard, read_card, resolve_checkpoint
from handseg.core.errors import HandsegError

INDEX = "handseg_model.json"
FORMAT = "handseg-model"
VERSION = 1
MAX_MEMBER_BYTES = 16 * 2**30
"""A member larger than this is refused (a zip can claim any size; a checkpoint is a few GB at most)."""


def _safe(name: str) -> str:
    from handseg.core.files import safe_name

    return safe_name(name, "model", "@+")


def export_models(runs: list[Path], out: Path, recipe: Path | None = None) -> dict:
    """Write ``out`` (a zip) with the runs' checkpoints, or with every run a recipe uses.

    Returns the index written into the zip.

    Raises:
        HandsegError: a run has no checkpoint, or the recipe is not valid.
    """
    from handseg.core.files import atomic_open

    if recipe is not None and runs:
        raise HandsegError("export either run folders or --recipe (which names its own runs), not both")
    entries: list[tuple[str, Path]] = []
    pinned: dict[str, tuple[dict, str]] = {}
    recipe_doc = None
    if recipe is not None:
        from handseg.core.files import read_json
        from handseg.core.selection import read_recipe

        parsed = read_recipe(recipe)  # checked, with absolute run paths
        recipe_doc = read_json(recipe, "recipe")
        for doc_cfg, cfg in zip(recipe_doc["configurations"], parsed.configs):
            new_runs = {}
            for fold, run in sorted(cfg.runs.items()):
                name = f"models/{_safe(cfg.name)}/fold{fold}"
                entries.append((name, resolve_checkpoint(run)))
                new_runs[str(fold)] = name
                pinned[name] = (doc_cfg, str(fold))
            doc_cfg["runs"] = new_runs
    for run in runs:
        entries.append((f"models/{_safe(Path(run).name)}", resolve_checkpoint(run)))
    entries = _with_context(entries)
    for name, path, _ in entries:  # a cascade's rewritten card changes its bytes: the recipe pins the new ones
        if isinstance(path, bytes) and name in pinned:
            import hashlib

            doc_cfg, fold = pinned[name]
            doc_cfg.setdefault("sha256", {})[fold] = hashlib.sha256(path).hexdigest()
    names = [n for n, _, _ in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise HandsegError(f"two runs would be stored as {dup}; give run folders with distinct names")
    if not entries:
        raise HandsegError("nothing to export: give run folders or --recipe")
    index = {"format": FORMAT, "version": VERSION, "handseg_version": __version__,
             "models": [{"name": n, "file": f"{n}/{BEST}", "card": asdict(card),
                         "role": "stage-1" if "/context/" in n else "model"} for n, _, card in entries],
             "recipe": "recipe.json" if recipe_doc is not None else None}
    with atomic_open(out, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        for name, path, _ in entries:
            if isinstance(path, bytes):
                z.writestr(f"{name}/{BEST}", path)
            else:
                z.write(path, f"{name}/{BEST}")
        if recipe_doc is not None:
            z.writestr("recipe.json", json.dumps(recipe_doc, indent=2))
        z.writestr(INDEX, json.dumps(index, indent=2))
    return index


def _with_context(entries: list[tuple[str, Path]]) -> list[tuple[str, Path | bytes, ModelCard]]:
    """``(name, checkpoint file or its rewritten bytes, card)`` of every member: a cascade's stage-2
    checkpoint goes in with its stage-1 checkpoints (``NAME/context/I``), and its card is rewritten to
    name them there."""
    from dataclasses import replace

    from handseg.core.cascade import resolve_context
    from handseg.core.checkpoint import with_card

    out = []
    for name, path in entries:
        card = read_card(path)
        if not card.context:
            out.append((name, path, card))
            continue
        stage1 = resolve_context(card.context, path, card.context_sha256)
        card = replace(card, context=[f"context/{i}/{BEST}" for i in range(len(stage1))])
        out.append((name, with_card(path, card), card))
        out += [(f"{name}/context/{i}", p, read_card(p)) for i, p in enumerate(stage1)]
    return out


@dataclass
class ModelBundle:
    """An opened model zip: the checkpoints to average, or a recipe to apply."""

    checkpoints: list[Path]
    recipe: Path | None


def is_model_zip(path: Path) -> bool:
    return Path(path).suffix.lower() == ".zip"


@contextlib.contextmanager
def open_model_zip(path: Path, workdir: Path) -> Iterator[ModelBundle]:
    """Unpack the members a model zip's index names into a temporary folder inside ``workdir``.

    Raises:
        HandsegError: not a zip, no or a malformed index, a named member missing or too large.
    """
    path = Path(path)
    if not path.is_file():
        raise HandsegError("model file not found", path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise HandsegError(f"not a handseg model zip ({e})", path) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.unpacked-", dir=workdir))
    try:
        with archive:
            index = _read_index(archive, path)
            wanted = {m["file"] for m in index["models"]}
            if index.get("recipe"):
                wanted.add(index["recipe"])
            for name in sorted(wanted):
                if not re.fullmatch(r"[A-Za-z0-9_.@+/-]+", name) or ".." in name.split("/") or name.startswith("/"):
                    raise HandsegError(f"member name {name!r} is not allowed", path)
                try:
                    info = archive.getinfo(name)
                except KeyError:
                    raise HandsegError(f"the index names {name}, which the zip does not hold", path) from None
                if info.file_size > MAX_MEMBER_BYTES:
                    raise HandsegError(f"member {name} claims {info.file_size:,} bytes", path)
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if index.get("recipe"):
            yield ModelBundle([], tmp / index["recipe"])
        else:
            yield ModelBundle([tmp / m["name"] for m in index["models"] if m.get("role", "model") == "model"], None)
    except zipfile.BadZipFile as e:
        raise HandsegError(f"corrupt model zip ({e})", path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_index(archive: zipfile.ZipFile, path: Path) -> dict:
    try:
        doc = json.loads(archive.read(INDEX))
    except KeyError:
        raise HandsegError(f"not a handseg model zip (no {INDEX}; made by `handseg export`?)", path) from None
    except (ValueError, UnicodeDecodeError):
        raise HandsegError(f"{INDEX} is not valid JSON", path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HandsegError(f"not a handseg model zip ({INDEX} has no format {FORMAT!r})", path)
    if doc.get("version") != VERSION:
        raise HandsegError(f"model zip version {doc.get('version')!r}; this handseg reads version {VERSION}", path)
    models = doc.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("file"), str)
                                               and isinstance(m.get("name"), str) for m in models):
        raise HandsegError(f"{INDEX} lists no models", path)
    return doc
