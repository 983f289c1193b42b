"""``train --batch-size auto``: the largest batch that fits the device, found by trial steps.

Each trial is a real training step (forward with the run's AMP, loss, backward, AdamW step) of a fresh
model of the run's architecture, size and channels on random inputs, so activations, gradients and
optimizer state are all counted. Batches double until one runs out of memory, then the gap is
bisected; the run takes :data:`MARGIN` of the largest that fitted (memory fragments over a long run,
and validation and checkpoint copies need room too). On CPU memory is rarely the limit and time is: a
small batch (:data:`CPU_BATCH`) is taken without trials, and said.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from handseg.inference.runtime import resolve_amp
from handseg.models.build import build_model
from handseg.models.checkpoint import ModelCard
from handseg.training.config import TrainConfig

MARGIN = 0.85
CPU_BATCH = 4
MAX_BATCH = 256
TRIAL_STEPS = 2
"""Steps per trial: the first allocates the optimizer's state, the second runs with it in memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """A device out-of-memory error (torch's own type, or the RuntimeError older builds and some
    backends raise)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def search_batch_size(fits: Callable[[int], bool], limit: int = MAX_BATCH, margin: float = MARGIN
                      ) -> tuple[int, int]:
    """``(chosen, largest that fitted)``: doubling from 1 until ``fits(batch)`` is False (or ``limit``),
    then bisecting between the last fit and the first failure; chosen = ``margin`` of the largest.

    Raises:
        MemoryError: not even a batch of 1 fits.
    """
    good, bad, batch = 0, None, 1
    while batch <= limit:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    if good == 0:
        raise MemoryError("not even a batch of 1 fits the device")
    bad = bad if bad is not None else limit + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return max(1, int(good * margin)), good


def trial_fits(make_model: Callable[[], object], loss_fn, side: int, in_channels: int, device: str, dtype=None
               ) -> Callable[[int], bool]:
    """``fits(batch)``: :data:`TRIAL_STEPS` training steps of a fresh model on random ``(batch, in_channels,
    side, side)`` inputs and 29-class targets; False when the device runs out of memory."""
    import torch

    def fits(batch: int) -> bool:
        model = optimizer = x = y = None
        try:
            model = make_model().to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            x = torch.randn(batch, in_channels, side, side, device=device)
            y = (torch.rand(batch, 29, side, side, device=device) > 0.5).float()
            for _ in range(TRIAL_STEPS):
                with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                    loss = loss_fn(model(x).float(), y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            return True
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            return False
        finally:
            del model, optimizer, x, y
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    return fits


def auto_batch_size(fits: Callable[[int], bool], device: str, n_images: int, log=print) -> dict:
    """The batch ``--batch-size auto`` trains with, said in one line, as the manifest records it:
    ``{"batch_size", "largest_fit", "margin", "device"}`` (``largest_fit`` None on CPU)."""
    limit = max(1, min(MAX_BATCH, n_images))
    if not device.startswith("cuda"):
        chosen = min(CPU_BATCH, limit)
        log(f"--batch-size auto on CPU: {chosen} (memory is rarely the limit on CPU, time is; a larger batch only "
            "makes each step slower)")
        return {"batch_size": chosen, "largest_fit": None, "margin": None, "device": device}
    chosen, largest = search_batch_size(fits, limit)
    log(f"--batch-size auto: {chosen} ({MARGIN:.0%} of {largest}, the largest batch that fitted {device} in trial "
        "steps)")
    return {"batch_size": chosen, "largest_fit": largest, "margin": MARGIN, "device": device}


def resolve_batch_size(cfg: TrainConfig, plan, card: ModelCard, loss_fn, device: str, n_train: int, log):
    """``(cfg with a number for --batch-size, how auto chose it or None)``: trial steps of the run's model,
    size and AMP on the device."""
    if cfg.batch_size != "auto":
        return cfg, None

    def make_model():
        return build_model(card.arch, card.encoder, "none", in_channels=card.in_channels, size=cfg.crop or cfg.size,
                           plan=plan, size_flag="--crop" if cfg.crop else "--size")

    fits = trial_fits(make_model, loss_fn, cfg.crop or cfg.size, card.in_channels, device,
                      resolve_amp(cfg.amp, device))
    chosen = auto_batch_size(fits, device, n_train, log)
    return replace(cfg, batch_size=chosen["batch_size"]), chosen
