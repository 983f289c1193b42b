"""torchrun: which process this is, the process group, and the collective operations handseg uses.

Everything reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) through
:func:`dist_env`; importing this module imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> Dist:
    """This process's place under torchrun (one process, rank 0, without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup_distributed(device: str) -> Dist:
    """Join the process group under torchrun (NCCL on CUDA, else gloo); a no-op for one process."""
    d = dist_env()
    if d.world == 1:
        return d
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return d


def join_group(device: str) -> bool:
    """Join the process group if this process is not in it yet; True if this call created it (and
    its caller should leave it with :func:`shutdown`), False if it was already joined (e.g. ``train``
    writing its out-of-fold maps inside its own group)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    setup_distributed(device)
    return created


def shutdown(d: Dist) -> None:
    """Wait for every rank, then leave the process group."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait until every rank gets here (a no-op for one process)."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_buffers(model, d: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP copies them from rank 0
    at the start of each forward, so after the last step every other rank holds its own update:
    without this, rank 1 would validate a model that differs from the checkpoint rank 0 saves."""
    if d.world > 1:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def all_reduce_sum(tensor, d: Dist):
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(obj, d: Dist) -> list:
    """Every rank's ``obj`` (any picklable object), in rank order."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * d.world
    dist.all_gather_object(gathered, obj)
    return gathered
