"""The learning-rate schedule (linear warm-up, then cosine) and gradient-accumulation groups."""

from __future__ import annotations

import math


def lr_lambda(total_steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 2% of the learning rate at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def planned_schedule(epochs: int, steps_per_epoch: int, max_steps: int | None = None):
    """The learning-rate factor per optimizer step (:func:`lr_lambda`) over the steps the run will take:
    ``epochs * steps_per_epoch``, or ``max_steps`` where that stops it first (its warm-up and cosine end
    there, not at steps the run never reaches)."""

    total = epochs * steps_per_epoch
    if max_steps:
        total = min(total, max_steps)
    return lr_lambda(total, min(100, total // 20 + 1))


def accumulation_groups(batches: int, accum: int) -> list[int]:
    """The size of the accumulation group each batch belongs to: ``accum`` except for a shorter last
    group, so every optimizer step averages the gradients of the batches it actually took."""
    sizes = []
    for start in range(0, batches, accum):
        n = min(accum, batches - start)
        sizes += [n] * n
    return sizes
