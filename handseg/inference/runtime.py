"""Where inference and training run: the device, the AMP dtype, the CPU threads and the host memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import replace

from handseg.common import threads
from handseg.common.distributed import dist_env
from handseg.common.errors import HandsegError


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HandsegError(f"--device {device} asked for, but CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise HandsegError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    d = dist_env()
    if device == "cuda" and d.world > 1:
        device = f"cuda:{d.local_rank}"  # under torchrun: one GPU per process
    return device


def resolve_amp(amp: str, device: str):
    """The autocast dtype for ``--amp`` on ``device`` (``None``: fp32)."""
    import torch

    if amp == "off" or (amp == "auto" and not device.startswith("cuda")):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (device.startswith("cuda") and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def apply_threads(device: str = "cpu", workers: int | None = None, say=None, adapt_to_load: bool = True,
                  intra_op: int | None = None):
    """Decide this run's threads (:func:`~handseg.common.threads.plan_threads` over the usable CPUs or
    ``--threads``), set torch's and OpenCV's intra-op threads to it (OpenCV's to one where loader workers will
    be forked), and record it for the manifest.

    Args:
        adapt_to_load: give fewer intra-op threads while other work keeps the machine's CPUs busy
            (:func:`~handseg.common.threads.intra_op_cap`); ``False`` ignores the machine's load.
        intra_op: the intra-op threads to keep (a resumed run keeps its run's, so that it sums in the same
            order), at most what the budget allows; ``--threads`` overrides it.

    Returns:
        The :class:`~handseg.common.threads.ThreadPlan`; ``plan.workers`` is the DataLoader's count.
    """
    import torch

    n, source = threads.budget()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: the processes of one machine share it
    if local > 1:
        n, source = max(1, n // local), f"{source}, shared by {local} processes"
    # the machine's load is not read under torchrun (its other processes are this run's own work)
    cap = threads.intra_op_cap(n) if adapt_to_load and local == 1 and intra_op is None else (n, None)
    plan = threads.plan_threads(n, device, workers, source, cap)
    if intra_op is not None and not threads.overridden():
        plan = replace(plan, intra_op=max(1, min(intra_op, plan.intra_op)), busy=None)
    torch.set_num_threads(plan.intra_op)
    with contextlib.suppress(RuntimeError):  # settable once, before the first parallel work
        torch.set_num_interop_threads(1 if plan.intra_op <= 2 else 2)
    # a process that forks loader workers keeps OpenCV to one thread: the workers inherit that (one thread each,
    # as the plan counts them), and resizing OpenCV's pool inside a forked worker can deadlock
    _cv2_threads(1 if plan.workers > 0 else plan.intra_op)
    threads.record(plan)
    # a loaded machine gets fewer intra-op threads (plan.busy says why); the manifest records it rather
    # than a note on every command, which would also come before a command's one-line error
    if say is not None and workers is not None and plan.workers < workers:
        say(f"--workers {workers} with {plan.budget} thread{'s' if plan.budget != 1 else ''} ({source}): "
            f"using {plan.workers} worker{'s' if plan.workers != 1 else ''}, so that loaders and the model do "
            "not fight over the cores")
    return plan


def _cv2_threads(n: int) -> None:
    import cv2

    cv2.setNumThreads(n)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
"""glibc ``mallopt`` parameters (``malloc.h``)."""
_host_memory: list = []
"""The C library once :func:`reuse_host_memory` has set it (empty: not set, or not glibc)."""


def reuse_host_memory() -> bool:
    """Let the C library keep host memory that is freed, for the next allocation (glibc, once per process).

    Why: a full-resolution probability map of one image is 29 x 2048 x 2048 float32 (486 MB). glibc gives
    each allocation that large fresh pages from the kernel (``mmap``) and returns them when it is freed, so
    every map of every image and transform is faulted in page by page again: on the 2-core CI machine
    system time was half of the CPU time of ``tta`` (22 s of 40 s for 8 images), and ``tta`` ran 1.8x
    faster with the memory kept. Freed memory then stays in the heap (peak memory about a quarter higher)
    until :func:`release_host_memory`. ``HANDSEG_MALLOC=system`` leaves the C library as it is.

    Returns:
        Whether the setting is in effect.
    """
    if _host_memory:
        return True
    if os.environ.get("HANDSEG_MALLOC", "").lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
            return False
    except (OSError, AttributeError):
        return False
    _host_memory.append(libc)
    return True


def release_host_memory() -> None:
    """Hand the host memory that prediction freed back to the system (after a prediction run, so that a
    long-lived process, e.g. a notebook using the API, does not keep its peak)."""
    if _host_memory:
        _host_memory[0].malloc_trim(0)
