"""Atomic writes and the manifest that every stage leaves beside its outputs.

A file is written as ``name.tmp-<random>`` in its own folder and moved into place with
``os.replace``, so a crash never leaves a file that looks finished. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from handseg import __version__
from handseg.core.constants import CLASSES
from handseg.core.errors import HandsegError

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


def check_can_write(path: str | Path, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless the user said ``--overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise HandsegError("already exists; pass --overwrite to replace it", path)
    return path


def check_can_write_dir(folder: str | Path, overwrite: bool) -> Path:
    """Refuse to write into a non-empty folder unless the user said ``--overwrite``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise HandsegError("folder exists and is not empty; pass --overwrite to write into it", folder)
    return folder


def manifest(stage: str, options: dict[str, Any], inputs: dict[str, Any] | None = None, **extra: Any) -> dict:
    """Build the manifest of one stage: stage, resolved options, version, classes, inputs."""
    return {
        "stage": stage,
        "handseg_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "inputs": inputs or {},
        "classes": list(CLASSES),
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
