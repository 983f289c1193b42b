"""Notes said once per run (e.g. how 16-bit images were scaled), on stderr, above any progress bar."""

from __future__ import annotations

import sys
from collections.abc import Hashable

_said: set[Hashable] = set()
_pending: list[tuple[Hashable, str]] = []
_quiet = False


def collect_only() -> None:
    """In a worker process: keep notes for :func:`drain` instead of printing them."""
    global _quiet
    _quiet = True


def notice(key: Hashable, text: str) -> None:
    """Print ``handseg: note: text`` the first time ``key`` is seen in this process."""
    if key in _said:
        return
    _said.add(key)
    _pending.append((key, text))
    if not _quiet:
        print(f"handseg: note: {text}", file=sys.stderr)


def drain() -> list[tuple[Hashable, str]]:
    """The notes said in this process since the last call: a worker process returns them with its
    results and the main process says each once (:func:`notice` skips the ones it has said)."""
    out = _pending[:]
    _pending.clear()
    return out


def reset() -> None:
    """Forget what was said: each command run in one process (the CLI's ``main``, a test) says its
    notes afresh."""
    _said.clear()
    _pending.clear()
