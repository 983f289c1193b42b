"""Shareable models: run folders (and a recipe) in one zip file that another machine predicts with.

``model.zip`` holds ``handseg_model.json`` (what is inside), the checkpoints as
``models/<name>/best.safetensors`` (weights and model card: nothing pickled), and with a recipe its
``recipe.json`` whose run paths point at those folders. The index pins every checkpoint by SHA-256.
``handseg predict model.zip`` opens it into a temporary folder beside its output, reading only the
members the index names, and refuses any path (in the index, the recipe or a cascade's card) that
leads outside the zip.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from handseg import __version__
from handseg.common.errors import HandsegError
from handseg.common.limits import env_limit
from handseg.formats.files import atomic_open, read_json, safe_name
from handseg.formats.recipe import read_recipe
from handseg.inference.onnx import ONNX_NAME, export_onnx
from handseg.models.checkpoint import BEST, ModelCard, checkpoint_sha256, read_card, resolve_checkpoint, with_card
from handseg.models.context import resolve_context
from handseg.selection.apply import pinned_checkpoints

INDEX = "handseg_model.json"
FORMAT = "handseg-model"
VERSION = 1
STAGE1_DIR = "stage1"
"""Where a zip keeps the stage-1 checkpoints of its cascades and ROI models, each once (by SHA-256)."""
DEFAULT_MAX_ZIP_BYTES = 8 * 2**30
"""What a model zip may unpack to in all, unless ``HANDSEG_MAX_ZIP_BYTES`` says otherwise: a zip can
claim any size (a 2 MB zip can unpack to gigabytes), and a recipe's checkpoints are a few GB at most."""
MAX_JSON_BYTES = 16 * 2**20
"""The index and the recipe are read into memory: a few KB, never this."""
_MEMBER = re.compile(r"[A-Za-z0-9_.@+-]+(/[A-Za-z0-9_.@+-]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def _safe(name: str) -> str:

    return safe_name(name, "model", "@+")


def export_models(runs: list[Path], out: Path, recipe: Path | None = None, fmt: str = "torch") -> dict:
    """Write ``out`` (a zip) with the runs' checkpoints, or with every run a recipe uses; with
    ``fmt="onnx"`` each checkpoint also gets its ONNX graph (``NAME/best.onnx``, pinned by SHA-256), which
    ``handseg predict`` then runs with onnxruntime.

    Returns the index written into the zip.

    Raises:
        HandsegError: a run has no checkpoint, or the recipe is not valid.
    """

    if recipe is not None and runs:
        raise HandsegError("export either run folders or --recipe (which names its own runs), not both")
    entries: list[tuple[str, Path]] = []
    pinned: dict[str, tuple[dict, str]] = {}
    recipe_doc = None
    if recipe is not None:

        parsed = read_recipe(recipe)  # checked, with absolute run paths
        members = parsed.members()  # only what the recipe uses: five folds of an unused model are gigabytes
        checkpoints = pinned_checkpoints(parsed, recipe, members)  # an unpinned or changed checkpoint is not zipped
        recipe_doc = _used_only(read_json(recipe, "recipe"), [c.name for c in parsed.configs], members)
        for doc_cfg, cfg in zip(recipe_doc["configurations"], [parsed.config(m) for m in members]):
            new_runs = {}
            for fold, path in checkpoints[cfg.name].items():
                name = f"models/{_safe(cfg.name)}/fold{fold}"
                entries.append((name, path))
                new_runs[str(fold)] = name
                pinned[name] = (doc_cfg, str(fold))
            doc_cfg["runs"] = new_runs
    for run in runs:
        entries.append((f"models/{_safe(Path(run).name)}", resolve_checkpoint(run)))
    entries = _with_context(entries)
    digests = [_digest(path) for _, path, _ in entries]
    for (name, _, _), digest in zip(entries, digests):  # a cascade's rewritten card changes its bytes: pin the new
        if name in pinned:
            doc_cfg, fold = pinned[name]
            doc_cfg.setdefault("sha256", {})[fold] = digest
    names = [n for n, _, _ in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise HandsegError(f"two runs would be stored as {dup}; give run folders with distinct names")
    if not entries:
        raise HandsegError("nothing to export: give run folders or --recipe")
    if fmt not in ("torch", "onnx"):
        raise HandsegError(f"unknown --format {fmt!r}; valid: torch, onnx")
    graphs = _graphs(entries) if fmt == "onnx" else {}
    index = {"format": FORMAT, "version": VERSION, "handseg_version": __version__,
             "models": [{"name": n, "file": f"{n}/{BEST}", "sha256": digest, "card": asdict(card),
                         "role": "stage-1" if n.startswith(f"{STAGE1_DIR}/") else "model",
                         **({"onnx": graphs[n][1]} if n in graphs else {})}
                        for (n, _, card), digest in zip(entries, digests)],
             "recipe": "recipe.json" if recipe_doc is not None else None}
    with atomic_open(out, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        for name, path, _ in entries:
            if isinstance(path, bytes):
                z.writestr(f"{name}/{BEST}", path)
            else:
                z.write(path, f"{name}/{BEST}")
            if name in graphs:
                z.writestr(f"{name}/{ONNX_NAME}", graphs[name][0])
        if recipe_doc is not None:
            z.writestr("recipe.json", json.dumps(recipe_doc, indent=2))
        z.writestr(INDEX, json.dumps(index, indent=2))
    return index


def _graphs(entries: list[tuple[str, Path | bytes, ModelCard]]) -> dict[str, tuple[bytes, dict]]:
    """Each member's ONNX graph and its index entry (file, SHA-256, opset, input shape)."""
    import hashlib

    out = {}
    for name, path, _ in entries:
        if isinstance(path, bytes):  # a cascade's rewritten card: same weights, exported from a copy
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / BEST
                copy.write_bytes(path)
                graph, info = export_onnx(copy)
        else:
            graph, info = export_onnx(path)
        out[name] = (graph, {"file": f"{name}/{ONNX_NAME}", "sha256": hashlib.sha256(graph).hexdigest(), **info})
    return out


def _used_only(doc: dict, names: list[str], members: list[str]) -> dict:
    """The recipe document with only the configurations it uses (and their soft-vote weights); a recipe
    whose classes all come from some configurations predicts the same without the others."""
    keep = [names.index(m) for m in members]
    doc["configurations"] = [doc["configurations"][i] for i in keep]
    soft = (doc.get("ensemble") or {}).get("soft") or {}
    if isinstance(soft.get("weights"), list) and len(soft["weights"]) == len(names):
        soft["weights"] = [soft["weights"][i] for i in keep]
    return doc


def _digest(member: Path | bytes) -> str:
    """The SHA-256 of a checkpoint file, or of the rewritten bytes that go into the zip instead."""
    if isinstance(member, bytes):
        import hashlib

        return hashlib.sha256(member).hexdigest()

    return checkpoint_sha256(member)


def _with_context(entries: list[tuple[str, Path]]) -> list[tuple[str, Path | bytes, ModelCard]]:
    """``(name, checkpoint file or its rewritten bytes, card)`` of every member: a cascade's stage-2
    checkpoint goes in with its stage-1 checkpoints (``NAME/context/I``), and its card is rewritten to
    name them there."""
    from dataclasses import replace


    out, shared = [], {}
    for name, path in entries:
        card = read_card(path)
        if not card.context:
            out.append((name, path, card))
            continue
        stage1 = resolve_context(card.context, path, card.context_sha256)
        refs = []
        for p in stage1:  # stored once however many stage-2 folds name it (five folds: 25 names, 5 files)
            member = f"{STAGE1_DIR}/{checkpoint_sha256(p)[:16]}"
            shared.setdefault(member, p)
            refs.append(os.path.relpath(f"{member}/{BEST}", f"{name}"))
        card = replace(card, context=refs)
        out.append((name, with_card(path, card), card))
    return out + [(member, p, read_card(p)) for member, p in shared.items()]


@dataclass
class ModelBundle:
    """An opened model zip: the checkpoints to average, or a recipe to apply, unpacked into ``root``."""

    checkpoints: list[Path]
    recipe: Path | None
    zip: Path
    sha256: str
    """The zip's own SHA-256, for the run's manifest."""
    root: Path

    def label(self, path: str | Path) -> str:
        """How a run's manifest names an unpacked file: ``ZIP:MEMBER``, never the temporary folder."""
        return f"{self.zip}:{Path(path).relative_to(self.root).as_posix()}"

    def inputs(self) -> dict:
        return {"model_zip": str(self.zip), "model_zip_sha256": self.sha256}


def is_model_zip(path: Path) -> bool:
    return Path(path).suffix.lower() == ".zip"


def max_zip_bytes() -> int:
    """The most a model zip may unpack to, in bytes: ``HANDSEG_MAX_ZIP_BYTES`` (default 8 GiB)."""

    return env_limit("HANDSEG_MAX_ZIP_BYTES", DEFAULT_MAX_ZIP_BYTES)


@contextlib.contextmanager
def open_model_zip(path: Path, workdir: Path, output: str | None = None) -> Iterator[ModelBundle]:
    """Unpack the members a model zip's index names into a temporary folder inside ``workdir``.

    The zip is self-contained: every path its index, its recipe or a cascade's card names lies inside
    it, and every checkpoint is checked against the SHA-256 its index pins it by. Sizes are checked
    from the central directory before anything is written. An error raised while the bundle is used
    names the zip (and the member), never the temporary folder, which is gone by then.

    Raises:
        HandsegError: not a zip, no or a malformed index, a member missing, too large, encrypted,
            compressed in a way Python cannot read, unpinned, changed, or naming a path outside the zip.
    """
    path = Path(path)
    if not path.is_file():
        raise HandsegError("model file not found", path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise HandsegError(f"not a handseg model zip ({e})", path) from None
    # named after the output it serves: a later writer of that output removes it if this one is killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{output or path.stem}.unpacked-", dir=workdir)).resolve()
    try:
        try:
            with archive:
                bundle = _unpack(archive, path, tmp)
        except (zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError, zlib.error, lzma.LZMAError) as e:
            raise HandsegError(f"corrupt model zip ({e})", path) from None
        except OSError as e:  # reading the zip, or writing beside the output
            raise HandsegError(f"cannot unpack the model zip ({e.strerror or e})", path) from None
        yield bundle
    except HandsegError as e:
        raise _naming_the_zip(e, tmp, path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(archive: zipfile.ZipFile, path: Path, tmp: Path) -> ModelBundle:

    limit = max_zip_bytes()
    total = sum(i.file_size for i in archive.infolist())
    if total > limit:
        raise HandsegError(f"the zip claims {total:,} bytes unpacked, more than the limit of {limit:,} "
                           "(set HANDSEG_MAX_ZIP_BYTES to raise it)", path)
    index = _read_index(archive, path)
    wanted = {m["file"]: m["sha256"] for m in index["models"]}
    wanted.update({m["onnx"]["file"]: m["onnx"]["sha256"] for m in index["models"] if m.get("onnx")})
    if index.get("recipe"):
        wanted[index["recipe"]] = None
    infos = {name: _member(archive, path, name) for name in sorted(wanted)}
    if index.get("recipe") and infos[index["recipe"]].file_size > MAX_JSON_BYTES:
        raise HandsegError(f"{index['recipe']} claims {infos[index['recipe']].file_size:,} bytes", path)
    need, free = sum(i.file_size for i in infos.values()), shutil.disk_usage(tmp).free
    if need > free:
        raise HandsegError(f"unpacking needs {need:,} bytes and {tmp.parent} has {free:,} free", path)
    for name, info in infos.items():
        dest = tmp / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if wanted[name] is not None and checkpoint_sha256(dest) != wanted[name]:
            what = "graph" if name.endswith(ONNX_NAME) else "checkpoint"
            raise HandsegError(f"{name} is not the {what} its index pins (its SHA-256 differs)", path)
    for m in index["models"]:  # a cascade's stage-1 checkpoints are the zip's own
        _inside_card(tmp / m["file"], tmp, path)
    if index.get("recipe"):
        recipe = tmp / index["recipe"]
        _inside_recipe(recipe, {(tmp / m["file"]).parent for m in index["models"]}, path)
        return ModelBundle([], recipe, path, checkpoint_sha256(path), tmp)
    models = [tmp / m["file"] for m in index["models"] if m.get("role", "model") == "model"]
    return ModelBundle(models, None, path, checkpoint_sha256(path), tmp)


def _member(archive: zipfile.ZipFile, path: Path, name: str) -> zipfile.ZipInfo:
    """A member the index names, checked to be one this handseg can unpack."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise HandsegError(f"the index names {name}, which the zip does not hold", path) from None
    if info.flag_bits & 0x1:
        raise HandsegError(f"member {name} is encrypted; handseg reads unencrypted model zips only", path)
    if info.compress_type not in _METHODS:
        raise HandsegError(f"member {name} uses compression method {info.compress_type}, which handseg cannot "
                           "read (stored, deflate, bzip2 or lzma)", path)
    return info


def _inside(target: Path, root: Path) -> bool:
    """``target`` lies in the (resolved) folder ``root``, after links and ``..`` are followed."""
    return Path(target).resolve().is_relative_to(root)


def _inside_card(checkpoint: Path, tmp: Path, path: Path) -> None:
    """A cascade's card names its stage-1 checkpoints inside the zip (its own index pins them)."""

    for ref in read_card(checkpoint).context or []:
        target = checkpoint.parent / ref
        if Path(ref).is_absolute() or not _inside(target, tmp) or not target.is_file():
            member = checkpoint.relative_to(tmp).as_posix()
            raise HandsegError(f"the model card of {member} names the stage-1 checkpoint {ref}, which is not in "
                               "the zip", path)


def _inside_recipe(recipe: Path, runs: set[Path], path: Path) -> None:
    """Every run the zip's recipe names is one of the zip's checkpoints (their pins are checked when used)."""

    for cfg in read_recipe(recipe).configs:
        for fold, run in sorted(cfg.runs.items()):
            if not _inside(run, recipe.parent) or Path(run).resolve() not in {r.resolve() for r in runs}:
                shown = os.path.relpath(run, recipe.parent) if _inside(run, recipe.parent) else run
                raise HandsegError(f"{recipe.name} names the run {shown} (configuration {cfg.name!r}, fold {fold}), "
                                   "which is not in the zip", path)


def _naming_the_zip(e: HandsegError, tmp: Path, path: Path) -> HandsegError:
    """The same error, naming the zip and its member instead of the temporary folder it was unpacked in."""
    message = e.message.replace(f"{tmp}/", "").replace(str(tmp), str(path))
    if e.path is not None and _inside(e.path, tmp):
        return HandsegError(f"{Path(e.path).resolve().relative_to(tmp).as_posix()}: {message}", path)
    if message == e.message:
        return e
    return HandsegError(message, e.path)


def _read_index(archive: zipfile.ZipFile, path: Path) -> dict:
    try:
        info = _member(archive, path, INDEX)
    except HandsegError:
        if INDEX not in archive.namelist():
            raise HandsegError(f"not a handseg model zip (no {INDEX}; made by `handseg export`?)", path) from None
        raise
    if info.file_size > MAX_JSON_BYTES:
        raise HandsegError(f"{INDEX} claims {info.file_size:,} bytes", path)
    try:
        doc = json.loads(archive.read(info))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HandsegError(f"{INDEX} is not valid JSON (or nested too deeply)", path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HandsegError(f"not a handseg model zip ({INDEX} has no format {FORMAT!r})", path)
    if doc.get("version") != VERSION:
        raise HandsegError(f"model zip version {doc.get('version')!r}; this handseg reads version {VERSION}", path)
    models = doc.get("models")
    if not isinstance(models, list) or not models or not all(
            isinstance(m, dict) and isinstance(m.get("file"), str) and isinstance(m.get("name"), str) for m in models):
        raise HandsegError(f"{INDEX} lists no models", path)
    for m in models:  # one place for each model: NAME/best.safetensors, inside the zip
        if not _MEMBER.fullmatch(m["name"]) or ".." in m["name"].split("/") or m["file"] != f"{m['name']}/{BEST}":
            raise HandsegError(f"{INDEX}: model name {m['name']!r} is not a folder inside the zip (with its "
                               f"{BEST})", path)
        if not isinstance(m.get("sha256"), str) or not _SHA256.fullmatch(m["sha256"]):
            raise HandsegError(f'{INDEX} gives no "sha256" for {m["name"]}: its checkpoint is not pinned '
                               "(made by an older `handseg export`? export it again)", path)
        graph = m.get("onnx")
        if graph is not None and (not isinstance(graph, dict) or graph.get("file") != f"{m['name']}/{ONNX_NAME}"
                                  or not _SHA256.fullmatch(str(graph.get("sha256")))):
            raise HandsegError(f"{INDEX}: the ONNX graph of {m['name']} is not {m['name']}/{ONNX_NAME} pinned by "
                               "SHA-256", path)
    recipe = doc.get("recipe")
    if recipe is not None and (not isinstance(recipe, str) or not _MEMBER.fullmatch(recipe)
                               or ".." in recipe.split("/")):
        raise HandsegError(f"{INDEX}: recipe {recipe!r} is not a file inside the zip", path)
    return doc
