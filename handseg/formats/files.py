"""Atomic writes and the manifest that every stage leaves beside its outputs.

A file is written as ``.name.tmp-<random>`` (hidden) in its own folder and moved into place with
``os.replace``, so a crash never leaves a file that looks finished. The manifest is written last.

One writer per output: :func:`check_output` takes ``.NAME.lock`` beside the output (``fcntl.flock``, held
until the command ends, released by the kernel if it is killed), so a second command writing the same
output is refused; holding it, it removes what a killed earlier writer of that output left (its
``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.unpacked-*``, ``.NAME.maps-*``).
"""

from __future__ import annotations

import atexit
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
from handseg.common.errors import JSON_TOO_DEEP, HandsegError

MANIFEST_NAME = "manifest.json"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", retire: Path | None = None, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; move it onto ``path`` only on success.

    ``retire``: a file that describes the old ``path`` (a CSV's sidecar manifest), removed just before the
    new file takes its place, so that a kill between the two writes leaves no manifest of another run.

    Example:
        >>> with atomic_open("out/pred.csv", "w", newline="") as f:
        ...     f.write("image_name,class,rle\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
        if retire is not None:
            Path(retire).unlink(missing_ok=True)
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
    except RecursionError:  # json recurses once per level: "[[[[...]]]]" would end in a traceback
        raise HandsegError(JSON_TOO_DEEP, path) from None


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
            hold_output(path)
            return path  # an empty folder holds nothing to lose
        raise HandsegError("already exists; pass --overwrite to replace it", path)
    if path.exists():
        _check_replaceable(path)
    hold_output(path)
    return path


def _check_replaceable(path: Path) -> None:
    """An existing output is replaced by a rename at the very end: refuse now what would refuse it then (a
    folder that cannot be renamed: not writable by us; a file in a sticky folder, owned by someone else)."""
    import stat

    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise HandsegError("cannot be replaced: the folder is not writable by this user (a folder output is "
                           "replaced by moving it aside)", path)
    parent = path.parent.stat()
    mine = os.geteuid() in (0, path.lstat().st_uid, parent.st_uid)
    if parent.st_mode & stat.S_ISVTX and not mine:
        raise HandsegError(f"cannot be replaced: it belongs to another user in {path.parent}, a sticky folder", path)


# ----------------------------------------------------------------------------------------------
# one writer per output, and no debris


_HELD: dict[Path, int] = {}
"""Outputs this process holds the lock of: path -> the lock file's descriptor."""
_DEBRIS = ("tmp", "old", "unpacked", "maps")
"""The temporaries a writer of an output leaves beside it when killed: ``.NAME.<kind>-<random>``."""


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def hold_output(path: str | Path, deep: bool = False) -> bool:
    """Take the output's lock (``.NAME.lock`` beside it) for the rest of the command, then remove the
    temporaries a killed earlier writer of it left. Taking it again in the same command is a no-op.

    Returns:
        True when taken now (False: this process already held it).

    Raises:
        HandsegError: another command holds it (it is writing the same output now).
    """
    import fcntl

    key = Path(os.path.abspath(path))
    if key in _HELD:
        return False
    lock = lock_path(key)
    key.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HandsegError(f"another handseg command is writing this output now (it holds {lock.name}); wait "
                               "for it to finish or choose another output", path) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its last holder removed the file between our open and lock: take the new one
    _HELD[key] = fd
    remove_debris(key, deep)
    return True


def remove_debris(path: Path, deep: bool = False) -> None:
    """Remove what killed writers of ``path`` left: its hidden temporaries beside it and, for a folder,
    the temporary files inside it (``deep``: at any depth, e.g. a cache's patient folders; call only while
    holding the output's lock). A torchrun launch's own partial folder (named by its run id) is kept."""

    token = os.environ.get("TORCHELASTIC_RUN_ID")
    pattern = re.compile(rf"^\.?{re.escape(path.name)}\.({'|'.join(_DEBRIS)})-[^/]+$")
    found = [p for p in path.parent.iterdir() if pattern.match(p.name)] if path.parent.is_dir() else []
    if path.is_dir():
        inside = path.rglob("*.tmp-*") if deep else path.iterdir()
        found += [p for p in inside if re.match(r"^.+\.tmp-[0-9a-f]{8}$", p.name) and p.is_file()]
    for p in found:
        if token and p.name.endswith(f"-{token}"):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def release_output(path: str | Path) -> None:
    """Give up one output's lock (and remove its lock file: a later writer opens a new one)."""
    key = Path(os.path.abspath(path))
    fd = _HELD.pop(key, None)
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(key))
        os.close(fd)


def release_outputs() -> None:
    """Give up every output lock this process holds (at the end of a command, and at exit)."""
    for key in list(_HELD):
        release_output(key)


atexit.register(release_outputs)


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
    held = Path(os.path.abspath(dest)) in _HELD
    if main:
        check_output(dest, overwrite, "dir", inputs)
    try:
        yield from _build_dir(dest, main)
    finally:
        if main and not held:  # a lock taken here is given up here (the command's own stay until it ends)
            release_output(dest)


def _build_dir(dest: Path, main: bool) -> Iterator[Path]:
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
