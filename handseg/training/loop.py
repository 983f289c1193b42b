"""The training loop: one loop for CPU, one GPU or many (torchrun / DDP), resumable, self-describing.

It reads like the recipe: check the options, split the fold, build the model, then per epoch train,
validate, and hand the state to the background checkpoint writer. Files are written by
:mod:`handseg.training.state`; samples come from :mod:`handseg.training.dataset`.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASSES
from handseg.common.distributed import all_reduce_sum, barrier, broadcast_buffers, dist_env, setup_distributed, shutdown
from handseg.common.errors import HandsegError
from handseg.data.cache import default_cache_dir, find_cache
from handseg.data.kfold import read_splits
from handseg.data.layout import resolve_data
from handseg.formats.files import (
    MANIFEST_NAME,
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    check_output,
    write_manifest,
)
from handseg.formats.oof import OOF_DIR, write_oof_manifest
from handseg.formats.tta import parse_transforms
from handseg.inference.cascade import build_context
from handseg.inference.run import run_predictions
from handseg.inference.runtime import pick_device, resolve_amp
from handseg.models.build import build_model
from handseg.models.checkpoint import BEST, LAST, ModelCard, checkpoint_sha256, load_weights, read_card, unwrap
from handseg.models.context import CONTEXT_CHANNELS, context_refs, stage1_checkpoints
from handseg.models.losses import build_loss
from handseg.models.plan import DEFAULT_NORM, plan_model, resolve_arch, resolve_encoder
from handseg.training.config import TrainConfig
from handseg.training.dataset import SegmentationDataset, seed_worker, split_items, unpack_mask_bits
from handseg.training.state import (
    RESUME_GLOB,
    CheckpointWriter,
    check_same_model,
    check_same_run,
    find_resume,
    read_resume,
    restore,
    resume_payload,
    run_identity,
)
from handseg.training.validation import validate

METRIC_FIELDS = ["epoch", "step", "train_loss", "lr", "images_per_s", "seconds", "data_wait", "val_seconds",
                 "save_seconds", "val_dice", *CLASSES]
"""``seconds``: the epoch's training loop; ``data_wait``: the share of it spent waiting for the
DataLoader; ``val_seconds`` and ``save_seconds``: validation, and the time the loop was held up by
checkpoints (host copy and waiting for the background writer)."""
SYNC_EVERY = 10
"""Steps between the host's waits for the device (loss check, progress)."""
DATA_WAIT_HINT = 0.2


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


def train(cfg: TrainConfig, log=print, progress_factory=None) -> dict:
    """Train a model as configured; returns ``{"best_dice", "last_dice", "epochs", "steps", "out"}``.

    Raises:
        HandsegError: bad options, unreadable or stale data, an inconsistent run folder, or a NaN loss.
    """
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler


    cfg = cfg.validated()
    device = pick_device(cfg.device)
    d = setup_distributed(device)  # pick_device already gave each torchrun process its own GPU
    arch, encoder = resolve_arch(cfg.arch), resolve_encoder(cfg.encoder)
    size_flag = "--crop" if cfg.crop else "--size"
    in_channels = 1
    if cfg.context:

        stage1 = stage1_checkpoints(cfg.context)  # stage 1 exists and sees whole images: checked now
        in_channels += CONTEXT_CHANNELS
    plan = plan_model(arch, encoder, cfg.crop or cfg.size, in_channels, size_flag)  # says why it cannot run, now
    loss_fn = build_loss(cfg.loss, torch.tensor(cfg.class_weights, dtype=torch.float32)
                         if cfg.class_weights else None)
    out = Path(cfg.out)
    if d.main:

        check_output(out, True, "dir", [cfg.data, cfg.splits, cfg.cache, *cfg.extra, *cfg.context])
        if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
            what = "already has a checkpoint" if (out / LAST).exists() else "exists and is not empty"
            raise HandsegError(f"run folder {what}; pass --resume to continue it, --overwrite to replace it, or "
                               "choose another --out", out)
        if cfg.resume and cfg.overwrite:
            raise HandsegError("--resume continues the run in --out and --overwrite replaces it: choose one")
    card = ModelCard(arch=arch, encoder=encoder, size=cfg.size, crop=cfg.crop, norm=dict(DEFAULT_NORM),
                     unify_hands=cfg.unify_hands, in_channels=in_channels)

    train_items, val_items = split_items(cfg)
    context = None
    if cfg.context:

        card.context = context_refs(stage1, out)
        card.context_sha256 = [checkpoint_sha256(p) for p in stage1]
        context = _cascade_context(cfg, train_items + val_items, device, d, log, {i.sample.name for i in val_items})
        card.context_tta = context.transforms  # predict runs stage 1 with the TTA of these maps
    start_epoch, step, best, resume_state = 0, 0, -1.0, None
    if cfg.resume:
        resume_path, last_card = find_resume(out)
        resume_state = read_resume(resume_path)
        tensors, header = resume_state
        check_same_model(header, card, resume_path)
        check_same_run(header, run_identity(cfg), resume_path)
        if header["epoch"] != last_card.epoch or header["step"] != last_card.step:
            raise HandsegError(f"resume state is at epoch {header['epoch']} (step {header['step']}) but {LAST} at "
                               f"epoch {last_card.epoch} (step {last_card.step})", resume_path)
        start_epoch, step = header["epoch"], header["step"]
        best = read_card(out / BEST).score if (out / BEST).is_file() else -1.0
        best = -1.0 if best is None else best
        if start_epoch >= cfg.epochs:
            if val_items and not (out / OOF_DIR / "manifest.json").is_file():
                write_oof(cfg, out, val_items, device, log, context)  # the run finished, its oof maps did not
            else:
                log(f"nothing to do: {out} has finished all {start_epoch} epoch{'s' if start_epoch != 1 else ''} (pass "
                    "a larger --epochs to train on)")
            shutdown(d)
            return {"best_dice": best if best >= 0 else None, "last_dice": last_card.score, "epochs": 0,
                    "steps": step, "out": str(out), "finished": True}

    seed = cfg.seed + d.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(cfg.seed)

    # each rank its own crops and augmentations (workers reseed from the generator)
    dataset = SegmentationDataset(train_items, cfg, train=True, in_channels=in_channels, seed=seed, context=context)
    sampler = DistributedSampler(dataset, d.world, d.rank, shuffle=True, seed=cfg.seed) if d.world > 1 else None
    generator = torch.Generator()

    def seed_epoch(epoch: int) -> None:
        """Each epoch's order, crops and augmentations come from (seed, rank, epoch) alone, so a resumed
        run draws exactly what the uninterrupted run would have (workers start afresh each epoch)."""
        epoch_seed = (seed * 1_000_003 + epoch) % 2**62
        generator.manual_seed(epoch_seed)
        dataset.reseed(epoch_seed)

    seed_epoch(start_epoch)
    cuda = device.startswith("cuda")
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.workers, pin_memory=cuda, drop_last=len(dataset) > cfg.batch_size,
                        persistent_workers=False, generator=generator,
                        worker_init_fn=seed_worker if cfg.workers > 0 else None)
    if sampler is not None:
        sampler.set_epoch(start_epoch)
    # the workers start now and prepare the first batches while the model is built
    pending_iter = iter(loader) if cfg.workers > 0 else None

    model = build_model(arch, encoder, cfg.encoder_weights, in_channels=in_channels, size=cfg.crop or cfg.size,
                        plan=plan, size_flag=size_flag).to(device)
    card.plan = plan.to_dict()
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = resolve_amp(cfg.amp, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / cfg.accum)
    schedule = planned_schedule(cfg.epochs, steps_per_epoch, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    if resume_state is not None:

        load_weights(model, out / LAST)
        restore(*resume_state, optimizer, scheduler, scaler, resume_path)
        log(f"resuming {out}: epoch {start_epoch + 1} of {cfg.epochs} next (step {step})")
        planned = resume_state[1]["run"]["epochs"]
        if planned != cfg.epochs:  # the cosine decay now ends at the new last step: say so, once restored
            log(f"--epochs {cfg.epochs}: the run planned {planned}; its learning-rate schedule is re-planned over "
                f"{cfg.epochs} epochs from step {step}")

    run_model = model
    if d.world > 1:
        run_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if cuda else None)
    if cfg.compile:
        run_model = torch.compile(run_model)

    # only now: a run that fails to start, or fails before its first checkpoint, leaves no folder
    writer = CheckpointWriter(out) if d.main else None
    identity = run_identity(cfg)
    with _run_folder(out, d.main, writer, replace=cfg.overwrite, resume=cfg.resume):
        logger = _make_logger(cfg, out) if d.main else None
        if d.main:
            write_manifest(out, "train", cfg.to_json(), inputs={"data": str(cfg.data), "splits": str(cfg.splits)},
                           train_images=len(train_items), val_images=len(val_items), world_size=d.world)
            # the resolved configuration, said once everything has been checked (a failed start says one line)
            log("handseg train " + " ".join(f"{k}={v}" for k, v in cfg.to_json().items()))
            log(f"{len(train_items)} training images, {len(val_items)} validation images -> {out}")
        metrics_path = out / "metrics.csv"
        if d.main and cfg.resume:
            truncate_metrics(metrics_path, start_epoch)  # rows of an epoch whose checkpoint never landed
        last_dice, epochs_run = None, 0
        group_sizes = accumulation_groups(len(loader), cfg.accum)
        run_model.train()
        for epoch in range(start_epoch, cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            if pending_iter is None:
                seed_epoch(epoch)
            batches_iter = pending_iter if pending_iter is not None else iter(loader)
            pending_iter = None
            t0, seen, batches, waited = time.perf_counter(), 0, 0, 0.0
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync a step
            progress = None
            if progress_factory and d.main:
                progress = progress_factory(f"epoch {epoch + 1}/{cfg.epochs}", len(loader))
            optimizer.zero_grad(set_to_none=True)
            for i in range(len(loader)):
                t_wait = time.perf_counter()
                x, y = next(batches_iter)
                waited += time.perf_counter() - t_wait
                x = x.to(device, non_blocking=True)
                y = unpack_mask_bits(y.to(device, non_blocking=True))
                if cuda and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                    logits = run_model(x)
                loss = loss_fn(logits.float(), y)
                scaler.scale(loss / group_sizes[i]).backward()
                if (i + 1) % cfg.accum == 0 or i + 1 == len(loader):
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                seen += x.shape[0]
                loss_sum += loss.detach()
                batches += 1
                stop = bool(cfg.max_steps and step >= cfg.max_steps)
                if batches % SYNC_EVERY == 0 or i + 1 == len(loader) or stop:
                    # the host waits for the device only here, so it can queue the next steps meanwhile
                    mean_loss = float(loss_sum) / batches
                    if not math.isfinite(mean_loss):
                        raise HandsegError(f"loss became {mean_loss} at epoch {epoch + 1}, by step {step}: lower --lr, "
                                           "try --amp off, or check the data")
                    if progress:
                        rate = seen * d.world / max(time.perf_counter() - t0, 1e-9)
                        progress(f"loss {mean_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} img/s")
                elif progress:
                    progress("")
                if stop:
                    break
            if progress:
                progress(None)
            seconds = time.perf_counter() - t0
            counts = torch.tensor([batches, seen, waited], dtype=torch.float64, device=device)
            stats = all_reduce_sum(torch.cat([loss_sum.view(1), counts]), d)
            train_loss = float(stats[0] / max(float(stats[1]), 1))
            images_per_s = float(stats[2]) / max(seconds, 1e-9)
            data_wait = float(stats[3]) / d.world / max(seconds, 1e-9)
            card.epoch, card.step = epoch + 1, step
            last_epoch = epoch + 1 == cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)
            per_class = None
            t_val = time.perf_counter()
            if val_items and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
                broadcast_buffers(model, d)
                per_class = validate(unwrap(run_model), card, val_items, device, dtype, d, cfg.batch_size, context)
                last_dice = float(per_class.mean())
            val_seconds = time.perf_counter() - t_val
            epochs_run += 1
            if d.main:
                card.score = last_dice
                improved = (per_class is not None and last_dice > best) or not val_items
                if per_class is not None and last_dice > best:
                    best = last_dice
                writer.wait_seconds = 0.0
                writer.save_epoch(model, card, improved,
                                  resume_payload(optimizer, scheduler, scaler, epoch + 1, step, best, card, identity))
                row = {"epoch": epoch + 1, "step": step, "train_loss": round(train_loss, 6),
                       "lr": scheduler.get_last_lr()[0], "images_per_s": round(images_per_s, 3),
                       "seconds": round(seconds, 2), "data_wait": round(data_wait, 4),
                       "val_seconds": round(val_seconds, 2), "save_seconds": round(writer.wait_seconds, 3),
                       "val_dice": "" if per_class is None else round(last_dice, 6)}
                if per_class is not None:
                    row.update({c: round(float(v), 6) for c, v in zip(CLASSES, per_class)})
                append_metrics(metrics_path, row)
                if logger:
                    logger(row, step)
                dice_text = f" val dice {last_dice:.4f}" if per_class is not None else ""
                log(f"epoch {epoch + 1}: loss {train_loss:.4f}{dice_text} ({images_per_s:.1f} img/s, {seconds:.1f}s)")
                if data_wait > DATA_WAIT_HINT and cfg.workers < (os.cpu_count() or 1):
                    log(f"  the loop waited for data {data_wait:.0%} of this epoch: more --workers (now {cfg.workers}) "
                        "or `handseg prep` caches would help")
            if cfg.max_steps and step >= cfg.max_steps:
                break
    if val_items:  # inside the process group: each rank predicts a shard, rank 0 gathers
        barrier(d)  # rank 0's writer has finished the last checkpoint before anyone reads it
        write_oof(cfg, out, val_items, device, log, context)
    shutdown(d)
    return {"best_dice": best if best >= 0 else None, "last_dice": last_dice, "epochs": epochs_run,
            "steps": step, "out": str(out)}



def _cascade_context(cfg: TrainConfig, items: list, device: str, d, log, held_out=()):
    """The stage-1 maps of every training and validation image (see :mod:`handseg.inference.cascade`); under
    torchrun rank 0 predicts what is missing while the others wait, then every rank reads the cache.
    ``held_out`` (the validation images) must have out-of-fold stage-1 maps."""

    data = resolve_data(cfg.data, "train").root
    cache_root = find_cache(data, cfg.cache) or Path(cfg.cache or default_cache_dir(data))
    samples = [i.sample for i in items]
    if d.world > 1 and not d.main:
        barrier(d)
        return build_context(cfg.context, samples, cache_root, device, cfg.batch_size, log=lambda *a: None,
                             held_out=held_out)
    source = build_context(cfg.context, samples, cache_root, device, cfg.batch_size, log, held_out=held_out)
    barrier(d)
    log(f"stage-1 context: {source.out_of_fold} images out-of-fold, {source.in_sample} from the mean of the "
        "stage-1 models")
    return source


def write_oof(cfg: TrainConfig, out: Path, val_items: list, device: str, log=print, context=None) -> None:
    """The fold's out-of-fold maps: its validation images predicted by the best checkpoint (with
    ``--oof-tta``) into ``RUN/oof/`` in the ``predict --probs`` format, with the manifest
    ``handseg select`` reads. Built beside its destination and moved into place when complete."""
    from dataclasses import asdict


    main = dist_env().main
    best = out / BEST if (out / BEST).is_file() else out / LAST
    transforms = parse_transforms(cfg.oof_tta)
    data = resolve_data(cfg.data, "train").root
    n_folds = None
    if cfg.splits is not None:

        n_folds = read_splits(cfg.splits)["n_folds"]
    with atomic_dir(out / OOF_DIR, overwrite=True, main=main) as tmp:
        result = run_predictions([best], data, tmp / "oof.csv", tmp, transforms, "mean", device=device,
                                 amp=cfg.amp != "off", batch=cfg.batch_size, samples=[i.sample for i in val_items],
                                 context_source=context)
        if main:
            write_oof_manifest(tmp, cfg.fold, asdict(read_card(best)), data, [t.name for t in transforms], "mean",
                               n_folds=n_folds or 5, splits=cfg.splits, checkpoint=best)
    if main:
        key = "merged" if "merged" in result.dice else transforms[0].name
        log(f"out-of-fold maps of fold {cfg.fold} ({result.images} images, Dice {result.dice[key]:.4f} with "
            f"{best.name}) -> {out / OOF_DIR}")


@contextlib.contextmanager
def _run_folder(out: Path, main: bool, writer: CheckpointWriter | None, replace: bool = False, resume: bool = False):
    """Create the run folder (rank 0) and finish the checkpoint writes whatever happens; if the run
    fails before its first checkpoint, remove the folder again. With ``replace`` (``--overwrite``) an
    existing folder is set aside, restored if the new run never reaches a checkpoint, and removed
    once it ends. With ``resume``, a resumed run that fails before its first checkpoint puts the run's
    manifest back as it was (it still describes the files in the folder)."""
    manifest = out / MANIFEST_NAME
    manifest_before = manifest.read_bytes() if main and resume and manifest.is_file() else None
    old = None
    if main and replace and out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
    created = main and not out.exists()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        yield
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            with contextlib.suppress(BaseException):
                writer.close()  # the epoch being saved is completed: last and its resume file stay a pair
        if created and not (out / LAST).exists():
            shutil.rmtree(out, ignore_errors=True)
            if old is not None:
                os.replace(old, out)
                old = None
        elif main:
            for tmp in out.glob("*.tmp-*"):
                tmp.unlink(missing_ok=True)
            if manifest_before is not None and (writer is None or writer.saved == 0):
                atomic_write_bytes(manifest, manifest_before)
        raise
    finally:
        if old is not None and old.exists() and (out / LAST).exists():
            shutil.rmtree(old, ignore_errors=True)


def append_metrics(path: Path, row: dict) -> None:
    """Append an epoch's row; a file from another handseg version (other columns) is rewritten with
    today's columns first, so a resumed run keeps one well-formed table."""
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != METRIC_FIELDS:
                old = list(reader)
                with atomic_open(path, "w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(old)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_metrics(path: Path, epochs: int) -> None:
    """Keep the rows of the first ``epochs`` epochs (a run resumed from epoch N forgets later rows)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fieldnames = reader.fieldnames or METRIC_FIELDS
    kept = [r for r in rows if r.get("epoch", "").isdigit() and int(r["epoch"]) <= epochs]
    if len(kept) != len(rows):
        with atomic_open(path, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=fieldnames, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)


def _make_logger(cfg: TrainConfig, out: Path):
    if cfg.logger == "none":
        return None
    if cfg.logger == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise HandsegError("--logger tensorboard needs the tensorboard package (pip install tensorboard)") from None
        tb = SummaryWriter(str(out / "tensorboard"))

        def write(row, step):
            for k, v in row.items():
                if isinstance(v, float | int) and k not in ("epoch", "step"):
                    tb.add_scalar(k, v, step)
            tb.flush()

        return write
    try:
        import wandb
    except ImportError:
        raise HandsegError("--logger wandb needs the wandb package (pip install wandb)") from None
    wandb.init(project="handseg", config=cfg.to_json(), dir=str(out))
    return lambda row, step: wandb.log({k: v for k, v in row.items() if v != ""}, step=step)


__all__ = ["METRIC_FIELDS", "RESUME_GLOB", "append_metrics", "train"]
