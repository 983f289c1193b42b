"""The training loop: one loop for CPU, one GPU or many (torchrun / DDP), resumable, self-describing.

It reads like the recipe: check the options, split the fold, build the model, then per epoch train,
validate, and hand the state to the background checkpoint writer. Files are written by
:mod:`handseg.training.state`; samples come from :mod:`handseg.training.dataset`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASSES
from handseg.common.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    setup_distributed,
    shutdown,
)
from handseg.common.errors import HandsegError
from handseg.common.threads import budget as thread_budget
from handseg.common.threads import recorded as recorded_threads
from handseg.formats.files import check_output, write_manifest
from handseg.formats.oof import OOF_DIR
from handseg.inference.runtime import apply_threads, pick_device, resolve_amp
from handseg.models.build import build_model
from handseg.models.checkpoint import BEST, LAST, ModelCard, checkpoint_sha256, load_weights, read_card, unwrap
from handseg.models.context import CONTEXT_CHANNELS, context_refs, stage1_checkpoints
from handseg.models.losses import build_loss
from handseg.models.plan import DEFAULT_NORM, plan_model, resolve_arch, resolve_encoder
from handseg.training.batchsize import resolve_batch_size
from handseg.training.config import TrainConfig
from handseg.training.dataset import SegmentationDataset, seed_worker, split_items, unpack_mask_bits
from handseg.training.levers import Ema, Patience, init_parent, load_init, make_ema, stopped_early
from handseg.training.oof import cascade_context, write_oof
from handseg.training.records import append_metrics, make_logger, run_folder, truncate_metrics
from handseg.training.schedule import accumulation_groups, planned_schedule
from handseg.training.state import (
    CheckpointWriter,
    check_same_levers,
    check_same_model,
    check_same_run,
    find_resume,
    read_resume,
    restore,
    resume_payload,
    run_identity,
    trained_weights,
)
from handseg.training.validation import validate

SYNC_EVERY = 10
"""Steps between the host's waits for the device (loss check, progress)."""
DATA_WAIT_HINT = 0.2


@dataclass
class _Start:
    """Where a run starts: epoch 0, or the point a resume file records."""

    epoch: int = 0
    step: int = 0
    best: float = -1.0
    state: tuple | None = None
    path: Path | None = None
    planned_epochs: int | None = None
    last_score: float | None = None
    levers: dict = field(default_factory=dict)
    threads: int | None = None
    """The intra-op threads the resumed run trained with (``None``: a fresh run, or an older resume file)."""


@dataclass
class _Run:
    """Everything the epochs share: the model and its optimizer, the data, the counters."""

    cfg: TrainConfig
    d: Dist
    device: str
    card: ModelCard
    model: object
    run_model: object
    optimizer: object
    scheduler: object
    scaler: object
    loss_fn: object
    dtype: object
    loader: object
    sampler: object
    seed_epoch: Callable[[int], None]
    pending_iter: object
    step: int
    best: float
    log: Callable
    writer: CheckpointWriter | None = None
    identity: dict = field(default_factory=dict)
    last_dice: float | None = None
    epochs_run: int = 0
    batch_auto: dict | None = None
    """How ``--batch-size auto`` chose (for the manifest), or None."""
    patience: Patience = field(default_factory=lambda: Patience(None))
    ema: Ema | None = None
    """--ema: the weights' moving average, which validation scores and best/last hold."""

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def stopped(self) -> bool:
        return bool(self.cfg.max_steps and self.step >= self.cfg.max_steps) or self.patience.exhausted

    @property
    def scored(self):
        """The weights validation scores and the checkpoints hold: the moving average with --ema."""
        return self.ema.module if self.ema is not None else unwrap(self.run_model)


def train(cfg: TrainConfig, log=print, progress_factory=None) -> dict:
    """Train a model as configured; returns ``{"best_dice", "last_dice", "epochs", "steps", "out"}``.

    The recipe: check the options and the run folder, split the fold, (resume,) build the model, then
    per epoch train, validate and checkpoint; at the end predict the fold's out-of-fold maps.

    Raises:
        HandsegError: bad options, unreadable or stale data, an inconsistent run folder, or a NaN loss.
    """
    cfg = cfg.validated()
    device = pick_device(cfg.device)
    cfg = _fit_threads(cfg, device, log)
    d = setup_distributed(device)  # pick_device already gave each torchrun process its own GPU
    out = Path(cfg.out)
    plan, card, stage1 = _plan_run(cfg)  # says why a model cannot run, before any data is read
    loss_fn = _loss(cfg)
    if d.main:
        _check_run_folder(cfg, out)
    train_items, val_items = split_items(cfg)
    cfg, batch_auto = resolve_batch_size(cfg, plan, card, loss_fn, device, len(train_items), log)
    context = _stage1_context(cfg, card, stage1, out, train_items + val_items, device, d, log,
                              {i.sample.name for i in val_items})
    start = _resume_point(cfg, out, card)
    if start.threads is not None:  # the resumed run sums in the order its run did
        cfg = _fit_threads(cfg, device, None, start.threads)
    if start.epoch >= cfg.epochs or stopped_early(cfg.patience, start.levers):
        return _finished(cfg, out, start, val_items, device, log, context, d)
    run = _build_run(cfg, card, plan, loss_fn, train_items, context, device, d, start, log)
    run.batch_auto = batch_auto
    with run_folder(out, d.main, run.writer, replace=cfg.overwrite, resume=cfg.resume):
        logger = _start_run(run, out, len(train_items), len(val_items), start)
        run.run_model.train()
        for epoch in range(start.epoch, cfg.epochs):
            stats = _train_epoch(run, epoch, progress_factory)
            per_class, val_seconds = _validate_epoch(run, epoch, val_items, context)
            if d.main:
                _checkpoint_epoch(run, epoch, stats, per_class, val_seconds, bool(val_items), logger, out)
            if run.stopped:
                break
    if val_items:  # inside the process group: each rank predicts a shard, rank 0 gathers
        barrier(d)  # rank 0's writer has finished the last checkpoint before anyone reads it
        write_oof(cfg, out, val_items, device, log, context)
    shutdown(d)
    return {"best_dice": run.best if run.best >= 0 else None, "last_dice": run.last_dice, "epochs": run.epochs_run,
            "steps": run.step, "out": str(out)}


def _fit_threads(cfg: TrainConfig, device: str, log, intra_op: int | None = None) -> TrainConfig:
    """The run's threads (:func:`~handseg.inference.runtime.apply_threads`; ``intra_op``: a resumed run's),
    with ``--workers`` fitted to them, so the manifest's options say what ran."""
    return replace(cfg, workers=apply_threads(device, cfg.workers, log, intra_op=intra_op).workers)


def _plan_run(cfg: TrainConfig) -> tuple:
    """The model's plan and card, and the stage-1 checkpoints of a cascade (checked to exist now)."""
    arch, encoder = resolve_arch(cfg.arch), resolve_encoder(cfg.encoder)
    in_channels, stage1 = 1, []
    if cfg.context:
        stage1 = stage1_checkpoints(cfg.context)  # stage 1 exists and sees whole images: checked now
        in_channels += CONTEXT_CHANNELS
    plan = plan_model(arch, encoder, cfg.crop or cfg.size, in_channels, "--crop" if cfg.crop else "--size")
    card = ModelCard(arch=arch, encoder=encoder, size=cfg.size, crop=cfg.crop, norm=dict(DEFAULT_NORM),
                     unify_hands=cfg.unify_hands, in_channels=in_channels, preprocess=cfg.preprocess, ema=cfg.ema,
                     roi=cfg.roi, roi_margin=cfg.roi_margin if cfg.roi else None)
    if cfg.init is not None:  # the parent fits this model: checked before any data is read
        parent, card.init_sha256 = init_parent(cfg.init, card)
        card.init = str(parent.resolve())
    return plan, card, stage1


def _loss(cfg: TrainConfig):
    import torch

    return build_loss(cfg.loss, torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights else None)


def _check_run_folder(cfg: TrainConfig, out: Path) -> None:
    """The run folder is new, empty, resumed (--resume) or replaced (--overwrite), and holds no input."""
    check_output(out, True, "dir", [cfg.data, cfg.splits, cfg.cache, cfg.init, *cfg.extra, *cfg.context])
    if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        what = "already has a checkpoint" if (out / LAST).exists() else "exists and is not empty"
        raise HandsegError(f"run folder {what}; pass --resume to continue it, --overwrite to replace it, or "
                           "choose another --out", out)
    if cfg.resume and cfg.overwrite:
        raise HandsegError("--resume continues the run in --out and --overwrite replaces it: choose one")


def _stage1_context(cfg: TrainConfig, card: ModelCard, stage1: list[Path], out: Path, items: list, device: str,
                    d: Dist, log, held_out: set[str]):
    """A cascade's stage-1 maps of every image (named and pinned in the card); None for other models.
    ``held_out`` (the validation images) must have out-of-fold stage-1 maps."""
    if not cfg.context:
        return None
    card.context = context_refs(stage1, out)
    card.context_sha256 = [checkpoint_sha256(p) for p in stage1]
    source = cascade_context(cfg, items, device, d, log, held_out)
    card.context_tta = source.transforms  # predict runs stage 1 with the TTA of these maps
    return source


def _resume_point(cfg: TrainConfig, out: Path, card: ModelCard) -> _Start:
    """Epoch 0, or the point the run's resume file records (checked against this run's model and options)."""
    if not cfg.resume:
        return _Start()
    resume_path, last_card = find_resume(out)
    state = read_resume(resume_path)
    header = state[1]
    check_same_model(header, card, resume_path)
    check_same_levers(last_card, card, resume_path)
    card.init, card.init_sha256 = last_card.init, last_card.init_sha256  # the parent a resumed run began from
    check_same_run(header, run_identity(cfg), resume_path)
    if header["epoch"] != last_card.epoch or header["step"] != last_card.step:
        raise HandsegError(f"resume state is at epoch {header['epoch']} (step {header['step']}) but {LAST} at "
                           f"epoch {last_card.epoch} (step {last_card.step})", resume_path)
    best = read_card(out / BEST).score if (out / BEST).is_file() else -1.0
    return _Start(header["epoch"], header["step"], -1.0 if best is None else best, state, resume_path,
                  header["run"]["epochs"], last_card.score, header.get("levers") or {}, header.get("threads"))


def _finished(cfg: TrainConfig, out: Path, start: _Start, val_items: list, device: str, log, context, d) -> dict:
    """A resumed run that has no epoch left: its out-of-fold maps if they are missing, else nothing."""
    if val_items and not (out / OOF_DIR / "manifest.json").is_file():
        write_oof(cfg, out, val_items, device, log, context)  # the run finished, its oof maps did not
    elif start.epoch < cfg.epochs:
        log(f"nothing to do: {out} stopped early at epoch {start.epoch} (--patience {cfg.patience}); pass a larger "
            "--patience to train on")
    else:
        log(f"nothing to do: {out} has finished all {start.epoch} epoch{'s' if start.epoch != 1 else ''} (pass "
            "a larger --epochs to train on)")
    shutdown(d)
    return {"best_dice": start.best if start.best >= 0 else None, "last_dice": start.last_score, "epochs": 0,
            "steps": start.step, "out": str(out), "finished": True}


def _build_run(cfg: TrainConfig, card: ModelCard, plan, loss_fn, train_items: list, context, device: str, d: Dist,
               start: _Start, log) -> _Run:
    """Seeds, the data loader (its workers start first, preparing batches while the model is built), the
    model, optimizer, schedule and scaler, restored from the resume state when resuming."""
    import torch

    seed = cfg.seed + d.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(cfg.seed)
    loader, sampler, seed_epoch = _data(cfg, train_items, card.in_channels, seed, context, d, device)
    seed_epoch(start.epoch)
    if sampler is not None:
        sampler.set_epoch(start.epoch)
    pending_iter = iter(loader) if cfg.workers > 0 else None
    model = build_model(card.arch, card.encoder, "none" if card.init else cfg.encoder_weights,
                        in_channels=card.in_channels, size=cfg.crop or cfg.size, plan=plan,
                        size_flag="--crop" if cfg.crop else "--size")
    if card.init and start.state is None:
        load_init(model, Path(card.init))
        log(f"--init: every layer from {card.init} (sha256 {card.init_sha256[:12]}); a fresh optimizer and "
            "learning-rate schedule")
    model = model.to(device)
    card.plan = plan.to_dict()
    if device.startswith("cuda") and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = resolve_amp(cfg.amp, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = planned_schedule(cfg.epochs, math.ceil(len(loader) / cfg.accum), cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    if start.state is not None:
        _restore(cfg, model, optimizer, scheduler, scaler, start, log)
    ema = make_ema(cfg.ema, model, Path(cfg.out) / LAST if start.state is not None else None)
    run_model = model
    if d.world > 1:
        run_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank]
                                                              if device.startswith("cuda") else None)
    if cfg.compile:
        run_model = torch.compile(run_model)
    return _Run(cfg, d, device, card, model, run_model, optimizer, scheduler, scaler, loss_fn, dtype, loader, sampler,
                seed_epoch, pending_iter, start.step, start.best, log,
                writer=CheckpointWriter(Path(cfg.out)) if d.main else None, identity=run_identity(cfg),
                patience=Patience(cfg.patience).restored(start.levers.get("patience")), ema=ema)


def _data(cfg: TrainConfig, train_items: list, in_channels: int, seed: int, context, d: Dist, device: str):
    """The training loader, its distributed sampler (or None) and ``seed_epoch(epoch)``: each epoch's
    order, crops and augmentations come from (seed, rank, epoch) alone, so a resumed run draws exactly
    what the uninterrupted run would have (workers start afresh each epoch)."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    # each rank its own crops and augmentations (workers reseed from the generator)
    dataset = SegmentationDataset(train_items, cfg, train=True, in_channels=in_channels, seed=seed, context=context)
    sampler = DistributedSampler(dataset, d.world, d.rank, shuffle=True, seed=cfg.seed) if d.world > 1 else None
    generator = torch.Generator()

    def seed_epoch(epoch: int) -> None:
        epoch_seed = (seed * 1_000_003 + epoch) % 2**62
        generator.manual_seed(epoch_seed)
        dataset.reseed(epoch_seed)

    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.workers, pin_memory=device.startswith("cuda"),
                        drop_last=len(dataset) > cfg.batch_size, persistent_workers=False, generator=generator,
                        worker_init_fn=seed_worker if cfg.workers > 0 else None)
    return loader, sampler, seed_epoch


def _restore(cfg: TrainConfig, model, optimizer, scheduler, scaler, start: _Start, log) -> None:
    """Weights from ``last``, and the optimizer, schedule and scaler from the resume file."""
    out = Path(cfg.out)
    load_weights(model, out / LAST)
    if cfg.ema is not None:  # last holds the average; the resume file the weights being trained
        model.load_state_dict(trained_weights(start.state[0], start.path))
    restore(*start.state, optimizer, scheduler, scaler, start.path)
    log(f"resuming {out}: epoch {start.epoch + 1} of {cfg.epochs} next (step {start.step})")
    if start.planned_epochs != cfg.epochs:  # the cosine decay now ends at the new last step: say so, once restored
        log(f"--epochs {cfg.epochs}: the run planned {start.planned_epochs}; its learning-rate schedule is re-planned "
            f"over {cfg.epochs} epochs from step {start.step}")
    saved_max = (start.state[1]["run"].get("max_steps") if start.state else None)
    if saved_max != cfg.max_steps and "max_steps" in (start.state[1]["run"] if start.state else {}):
        def plan(m):
            return f"--max-steps {m}" if m else "no --max-steps"

        log(f"{plan(cfg.max_steps)}: the run planned its warm-up and cosine with {plan(saved_max)}; its learning-rate "
            f"schedule is re-planned with {plan(cfg.max_steps)} over {cfg.epochs} epochs from step {start.step}")


def _start_run(run: _Run, out: Path, n_train: int, n_val: int, start: _Start):
    """The manifest and the resolved configuration, said once everything has been checked; returns the
    metrics logger (rank 0) or None."""
    cfg = run.cfg
    if not run.d.main:
        return None
    logger = make_logger(cfg, out)
    write_manifest(out, "train", cfg.to_json(), inputs={"data": str(cfg.data), "splits": str(cfg.splits)},
                   train_images=n_train, val_images=n_val, world_size=run.d.world,
                   **({"batch_size_auto": run.batch_auto} if run.batch_auto else {}))
    # the resolved configuration, said once everything has been checked (a failed start says one line)
    run.log("handseg train " + " ".join(f"{k}={v}" for k, v in cfg.to_json().items()))
    run.log(f"{n_train} training images, {n_val} validation images -> {out}")
    if cfg.resume:
        truncate_metrics(out / "metrics.csv", start.epoch)  # rows of an epoch whose checkpoint never landed
    return logger


def _train_epoch(run: _Run, epoch: int, progress_factory) -> dict:
    """One pass over the loader (or up to --max-steps); returns the epoch's loss and speed, reduced
    over ranks."""
    import torch

    cfg, d, device = run.cfg, run.d, run.device
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    if run.pending_iter is None:
        run.seed_epoch(epoch)
    batches_iter = run.pending_iter if run.pending_iter is not None else iter(run.loader)
    run.pending_iter = None
    t0, seen, batches, waited = time.perf_counter(), 0, 0, 0.0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync a step
    progress = None
    if progress_factory and d.main:
        progress = progress_factory(f"epoch {epoch + 1}/{cfg.epochs}", len(run.loader))
    group_sizes = accumulation_groups(len(run.loader), cfg.accum)
    run.optimizer.zero_grad(set_to_none=True)
    for i in range(len(run.loader)):
        t_wait = time.perf_counter()
        x, y = next(batches_iter)
        waited += time.perf_counter() - t_wait
        loss = _step(run, x, y, group_sizes[i], (i + 1) % cfg.accum == 0 or i + 1 == len(run.loader))
        seen += x.shape[0]
        loss_sum += loss.detach()
        batches += 1
        if batches % SYNC_EVERY == 0 or i + 1 == len(run.loader) or run.stopped:
            _check_loss(run, loss_sum, batches, epoch, progress, seen, t0)
        elif progress:
            progress("")
        if run.stopped:
            break
    if progress:
        progress(None)
    seconds = time.perf_counter() - t0
    counts = torch.tensor([batches, seen, waited], dtype=torch.float64, device=device)
    stats = all_reduce_sum(torch.cat([loss_sum.view(1), counts]), d)
    return {"train_loss": float(stats[0] / max(float(stats[1]), 1)), "seconds": seconds,
            "images_per_s": float(stats[2]) / max(seconds, 1e-9),
            "data_wait": float(stats[3]) / d.world / max(seconds, 1e-9)}


def _step(run: _Run, x, y, group_size: int, update: bool):
    """Forward and backward of one batch; the optimizer steps when its accumulation group is complete."""
    import torch

    x = x.to(run.device, non_blocking=True)
    y = unpack_mask_bits(y.to(run.device, non_blocking=True))
    if run.cuda and run.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.split(":")[0], dtype=run.dtype, enabled=run.dtype is not None):
        logits = run.run_model(x)
    loss = run.loss_fn(logits.float(), y)
    run.scaler.scale(loss / group_size).backward()
    if update:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.step += 1
        if run.ema is not None:
            run.ema.update(run.model)
    return loss


def _check_loss(run: _Run, loss_sum, batches: int, epoch: int, progress, seen: int, t0: float) -> None:
    """The host waits for the device only here, so it can queue the next steps meanwhile."""
    mean_loss = float(loss_sum) / batches
    if not math.isfinite(mean_loss):
        raise HandsegError(f"loss became {mean_loss} at epoch {epoch + 1}, by step {run.step}: lower --lr, "
                           "try --amp off, or check the data")
    if progress:
        rate = seen * run.d.world / max(time.perf_counter() - t0, 1e-9)
        progress(f"loss {mean_loss:.4f} lr {run.scheduler.get_last_lr()[0]:.2e} {rate:.1f} img/s")


def _validate_epoch(run: _Run, epoch: int, val_items: list, context):
    """The fold's per-class Dice after this epoch (every --val-every epochs, and after the last), or None."""
    cfg = run.cfg
    run.card.epoch, run.card.step = epoch + 1, run.step
    last_epoch = epoch + 1 == cfg.epochs or run.stopped
    per_class = None
    t_val = time.perf_counter()
    if val_items and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
        broadcast_buffers(run.model, run.d)
        if run.ema is not None:
            broadcast_buffers(run.ema.module, run.d)
        per_class = validate(run.scored, run.card, val_items, run.device, run.dtype, run.d, cfg.batch_size, context)
        run.last_dice = float(per_class[run.card.predicted].mean())  # a ROI model: its own classes
        run.patience.update(run.last_dice, epoch + 1)  # every rank: all stop together
    run.epochs_run += 1
    return per_class, time.perf_counter() - t_val


def _checkpoint_epoch(run: _Run, epoch: int, stats: dict, per_class, val_seconds: float, has_val: bool, logger,
                      out: Path) -> None:
    """Rank 0: hand the checkpoint and resume state to the background writer, append the metrics row, log."""
    cfg, card = run.cfg, run.card
    card.score = run.last_dice
    improved = (per_class is not None and run.last_dice > run.best) or not has_val
    if per_class is not None and run.last_dice > run.best:
        run.best = run.last_dice
    run.writer.wait_seconds = 0.0
    run.writer.save_epoch(run.scored, card, improved, resume_payload(
        run.optimizer, run.scheduler, run.scaler, epoch + 1, run.step, run.best, card, run.identity,
        weights=run.model if run.ema is not None else None, levers={"patience": run.patience.state()},
        threads=recorded_threads()["intra_op"]))
    row = {"epoch": epoch + 1, "step": run.step, "train_loss": round(stats["train_loss"], 6),
           "lr": run.scheduler.get_last_lr()[0], "images_per_s": round(stats["images_per_s"], 3),
           "seconds": round(stats["seconds"], 2), "data_wait": round(stats["data_wait"], 4),
           "val_seconds": round(val_seconds, 2), "save_seconds": round(run.writer.wait_seconds, 3),
           "val_dice": "" if per_class is None else round(run.last_dice, 6)}
    if per_class is not None:
        own = set(card.predicted)  # a ROI model's other classes are not its to score: left blank
        row.update({c: round(float(v), 6) if i in own else "" for i, (c, v) in enumerate(zip(CLASSES, per_class))})
    append_metrics(out / "metrics.csv", row)
    if logger:
        logger(row, run.step)
    over = f" ({len(card.roi)} ROI classes)" if card.roi else ""
    dice_text = f" val dice{over} {run.last_dice:.4f}" if per_class is not None else ""
    run.log(f"epoch {epoch + 1}: loss {stats['train_loss']:.4f}{dice_text} ({stats['images_per_s']:.1f} img/s, "
            f"{stats['seconds']:.1f}s)")
    if run.patience.exhausted:
        run.log(run.patience.message(epoch + 1, cfg.epochs))
    if stats["data_wait"] > DATA_WAIT_HINT and cfg.workers + 1 < thread_budget()[0]:
        run.log(f"  the loop waited for data {stats['data_wait']:.0%} of this epoch: more --workers (now "
                f"{cfg.workers}) or `handseg prep` caches would help")


__all__ = ["train"]
