"""Where inference and training run: the device, the AMP dtype and the CPU threads."""

from __future__ import annotations

import contextlib
import os
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


def apply_threads(device: str = "cpu", workers: int | None = None, say=None, intra_op: int | None = None):
    """Decide this run's threads (:func:`~handseg.common.threads.plan_threads` over the usable CPUs or
    ``--threads``), set torch's and OpenCV's intra-op threads to it (OpenCV's to one where loader workers will
    be forked), and record it for the manifest. Fewer intra-op threads while other work keeps the machine's
    CPUs busy (:func:`~handseg.common.threads.intra_op_cap`).

    Args:
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
    cap = threads.intra_op_cap(n) if local == 1 and intra_op is None else (n, None)
    plan = threads.plan_threads(n, device, workers, source, cap)
    if intra_op is not None and not threads.overridden():
        kept = max(1, min(intra_op, plan.intra_op))
        plan = replace(plan, intra_op=kept, busy=None if kept >= plan.intra_op else
                       f"kept from the run being resumed ({kept} intra-op thread{'s' if kept != 1 else ''})")
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
