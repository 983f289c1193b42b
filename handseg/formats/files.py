"""Atomic writes and the manifest that every stage leaves beside its outputs.

A file is written as ``name.tmp-<random>`` in its own folder and moved into place with
``os.replace``, so a crash never leaves a file that looks finished. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

from handseg import __version__
from handseg.common import threads
from handseg.common.constants import CLASSES
from handseg.common.errors import HandsegError

MANIFEST_NAME = "manifest.json"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; move it onto ``path`` only on success.

    Example:
        >>> with atomic_open("out/pred.csv", "w", newline="") as f:
        ...     f.write("image_name,class,rle\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
        f.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path, what: str) -> Any:
    """Load a JSON file; a missing or malformed file is a HandsegError naming it (``what`` says which file)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HandsegError(f"{what} not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HandsegError(f"not valid JSON ({e})", path) from None


OutputKind = Literal["file", "dir"]


def check_output(path: str | Path, overwrite: bool = False, kind: OutputKind = "file",
                 inputs: Iterable[str | Path | None] = ()) -> Path:
    """The one rule for every output a command writes, checked before any work starts.

    The output must not be, hold, or lie inside any of ``inputs`` (run folders, map folders, data
    folders, recipes; see :func:`check_not_input`). An existing output is replaced only with
    ``--overwrite``; a file path must not be a folder (nor a
    folder path a file); the path must not lie under a file; and its folder must be writable (tried
    by creating and removing a probe file, which also works for root and read-only mounts).

    Raises:
        HandsegError: naming the path and what is wrong with it.
    """
    path, inputs = Path(path), list(inputs)
    check_not_input(path, inputs)
    if kind == "file":  # a CSV's manifest is written beside it: it must not replace an input either
        check_not_input(sidecar_manifest_path(path), inputs, path)
    if path.is_dir() and kind == "file":
        raise HandsegError("is a folder; give a file name", path)
    if path.exists() and not path.is_dir() and kind == "dir":
        raise HandsegError("is a file; give a folder name", path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise HandsegError(f"cannot write here: {parent} is a file, not a folder", path)
            _check_writable(parent, path)
            break
    if path.exists() and not overwrite:
        if kind == "dir" and not any(path.iterdir()):
            return path  # an empty folder holds nothing to lose
        raise HandsegError("already exists; pass --overwrite to replace it", path)
    return path


def check_not_input(path: str | Path, inputs: Iterable[str | Path | None], shown: str | Path | None = None) -> None:
    """Refuse an output that is an input, holds one, or lies inside one (with or without --overwrite:
    replacing a run's checkpoint or a map folder's index with an output destroys what it was made from).

    Paths are compared after resolving symlinks and ``..``. ``shown`` is the path named in the error
    (default ``path``).

    Raises:
        HandsegError: naming the output and the input it collides with.
    """
    target = Path(path).resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if source == target:
            what = "is"
        elif source in target.parents:
            what = "lies inside"
        elif target in source.parents:
            what = "holds"
        else:
            continue
        raise HandsegError(f"{what} an input of this command ({source}); write the output elsewhere",
                           shown if shown is not None else path)


def _check_writable(folder: Path, target: Path) -> None:
    probe = folder / f".handseg-probe-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
    except OSError as e:
        raise HandsegError(f"cannot write in {folder} ({e.strerror or e})", target) from None
    probe.unlink()


def safe_name(text: str, default: str, extra: str = "") -> str:
    """A file-name part made of letters, digits, ``.``, ``_``, ``-`` and the characters in ``extra``
    only (any other run becomes ``_``), never hidden or empty (``default`` then)."""
    return re.sub(rf"[^A-Za-z0-9._{re.escape(extra)}-]+", "_", text).strip("._") or default


def _run_token() -> str:
    """A name part shared by the processes of one torchrun launch (random for a single process), so
    every rank writes into the same partial folder."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or secrets.token_hex(4)


def partial_dir(dest: str | Path) -> Path:
    """Where a folder output is built before it is moved into place (a hidden sibling of ``dest``)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp-{_run_token()}")


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False, main: bool = True,
               inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Build a folder output beside ``dest`` and move it into place only when the block succeeds.

    A failed or interrupted command leaves neither a partial folder nor a half-replaced old one:
    ``dest`` is either what it was before or the complete new output. With ``overwrite`` an existing
    ``dest`` is replaced as a whole (nothing of the previous run survives in it).

    ``main=False`` (torchrun ranks other than 0) writes into the same partial folder but leaves the
    move, and the clean-up, to rank 0.

    Example:
        >>> with atomic_dir("pseudo", overwrite=True) as tmp:
        ...     (tmp / "a.txt").write_text("done")
    """
    dest = Path(dest)
    if main:
        check_output(dest, overwrite, "dir", inputs)
    tmp = partial_dir(dest)
    tmp.mkdir(parents=True, exist_ok=not main or "TORCHELASTIC_RUN_ID" in os.environ)
    try:
        yield tmp
        if main:
            replace_dir(tmp, dest)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder ``src`` onto ``dest``, replacing any folder there (near-atomically: the old one is
    renamed aside first, then removed)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def manifest(stage: str, options: dict[str, Any], inputs: dict[str, Any] | None = None, **extra: Any) -> dict:
    """Build the manifest of one stage: stage, resolved options, version, classes, inputs."""
    return {
        "stage": stage,
        "handseg_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "inputs": inputs or {},
        "classes": list(CLASSES),
        **({"threads": used} if (used := threads.recorded()) is not None else {}),
        **extra,
    }


def write_manifest(folder: str | Path, stage: str, options: dict[str, Any], inputs: dict[str, Any] | None = None,
                   name: str = MANIFEST_NAME, **extra: Any) -> Path:
    """Write ``folder/manifest.json`` (atomically, and last of a stage's outputs)."""
    path = Path(folder) / name
    atomic_write_json(path, manifest(stage, options, inputs, **extra))
    return path


def sidecar_manifest_path(output_file: str | Path) -> Path:
    """Where the manifest of a single-file output goes: ``pred.csv`` -> ``pred.manifest.json``."""
    output_file = Path(output_file)
    return output_file.with_name(f"{output_file.stem}.manifest.json")
