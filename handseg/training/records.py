"""What a run folder records besides checkpoints: the folder's life cycle, ``metrics.csv`` and loggers."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
from pathlib import Path

from handseg.common.constants import CLASSES
from handseg.common.errors import HandsegError
from handseg.formats.files import (
    MANIFEST_NAME,
    atomic_open,
    atomic_write_bytes,
)
from handseg.models.checkpoint import LAST
from handseg.training.config import TrainConfig
from handseg.training.state import (
    CheckpointWriter,
)

METRIC_FIELDS = ["epoch", "step", "train_loss", "lr", "images_per_s", "seconds", "data_wait", "val_seconds",
                 "save_seconds", "val_dice", *CLASSES]
"""``seconds``: the epoch's training loop; ``data_wait``: the share of it spent waiting for the
DataLoader; ``val_seconds`` and ``save_seconds``: validation, and the time the loop was held up by
checkpoints (host copy and waiting for the background writer)."""


@contextlib.contextmanager
def run_folder(out: Path, main: bool, writer: CheckpointWriter | None, replace: bool = False, resume: bool = False):
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


def make_logger(cfg: TrainConfig, out: Path):
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
