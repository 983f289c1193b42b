"""Peak memory of one stretch of a benchmark: GPU memory on CUDA, else the host's resident set.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (tensors of this process). On the host it
is the peak resident set size (``VmHWM``) of this process: Linux resets it when ``5`` is written to
``/proc/self/clear_refs``, so each stretch gets its own peak. Where that is not possible the peak
falls back to ``resource.getrusage`` (the process's peak so far, never reset); :func:`memory_kind`
says which. DataLoader worker processes are never included.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _can_reset_host_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return _host_peak_kib_proc() is not None
    except OSError:
        return False


def _host_peak_kib_proc() -> int | None:
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


_RESETTABLE: bool | None = None


def memory_kind(device: str) -> str:
    """What :func:`peak_gib` measures on ``device``, in words for a table's header."""
    if device.startswith("cuda"):
        return "peak GPU memory allocated by tensors (GiB)"
    global _RESETTABLE
    if _RESETTABLE is None:
        _RESETTABLE = _can_reset_host_peak()
    if _RESETTABLE:
        return "peak host RSS of the main process, DataLoader workers not included (GiB)"
    return "peak host RSS of the main process so far (getrusage; not reset between loops; GiB)"


def reset_peak(device: str) -> None:
    """Start a new stretch: forget the peak so far (where the platform allows)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    global _RESETTABLE
    if _RESETTABLE is None:
        _RESETTABLE = _can_reset_host_peak()
    elif _RESETTABLE:
        _CLEAR_REFS.write_text("5")


def peak_gib(device: str) -> float:
    """The peak since :func:`reset_peak`, in GiB."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    if _RESETTABLE:
        kib = _host_peak_kib_proc()
        if kib is not None:
            return kib / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30
