"""Run state on disk: checkpoints written in the background, and resume state that loads without pickle.

A run folder holds ``last.safetensors`` and ``best.safetensors`` (weights and model card, see
:mod:`handseg.models.checkpoint`) and ``resume-<epoch>.safetensors``: the optimizer's tensors, with
the scheduler, the gradient scaler, the counters and the random states as JSON in the file's
header. Nothing in it is pickled, so a resume file from someone else cannot run code.

Each epoch's files are written in this order by one background thread: ``resume-<N>``, then
``best`` (if it improved), then ``last`` (epoch N), then older resume files are removed. Whenever a
write is interrupted, ``last``'s epoch therefore has its resume file: resuming loses at most the
epoch that was being saved, and the two always describe the same step.
"""

from __future__ import annotations

import json
import math
import queue
import random
import re
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from handseg.common.errors import JSON_TOO_DEEP, HandsegError
from handseg.data.layout import resolve_data
from handseg.data.roi import roi_label
from handseg.formats.files import MANIFEST_NAME, atomic_write_bytes, read_json
from handseg.formats.oof import OOF_DIR
from handseg.models.checkpoint import BEST, LAST, ModelCard, checkpoint_bytes, read_card, unwrap

RESUME_META = "handseg_resume"
RESUME_GLOB = "resume-*.safetensors"
_RESUME_RE = re.compile(r"resume-(\d+)\.safetensors$")
MODEL_KEYS = ("arch", "encoder", "size", "crop", "in_channels", "unify_hands", "classes")
"""What a resumed run must share with the run it continues."""


WEIGHTS_PREFIX = "weights."
"""Resume-file tensors of the weights being trained, where ``last`` holds their moving average (``--ema``)."""


def trained_weights(tensors: dict, path: Path) -> dict:
    """The weights being trained from a resume file of an ``--ema`` run (``{name: tensor}``).

    Raises:
        HandsegError: the file holds none (written by a run without --ema, or edited).
    """
    found = {k[len(WEIGHTS_PREFIX):]: v for k, v in tensors.items() if k.startswith(WEIGHTS_PREFIX)}
    if not found:
        raise HandsegError("resume state holds no training weights (the run was not trained with --ema?)", path)
    return found


def resume_name(epoch: int) -> str:
    return f"resume-{epoch:04d}.safetensors"


# ----------------------------------------------------------------------------------------------
# resume state <-> tensors + JSON


def _host(t):
    return t.detach().to("cpu", copy=True).contiguous()


def _json_safe(value: Any, where: str) -> Any:
    """Scheduler/scaler state as JSON: numbers, strings, lists, dicts (tensors become numbers)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_safe(v, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, where) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where}: cannot store {type(value).__name__} in resume state")


def resume_payload(optimizer, scheduler, scaler, epoch: int, step: int, best: float, card: ModelCard,
                   run: dict | None = None, weights=None, levers: dict | None = None,
                   threads: int | None = None) -> tuple[dict, dict]:
    """The resume state as ``(tensors, header)``, copied to the host now (training goes on meanwhile).

    ``weights``: the model being trained, when ``last`` holds other weights (``--ema``: last holds the
    average, the resume file the weights it averages, as ``weights.<name>``). ``levers``: JSON state of
    the training levers (the ``--patience`` count), under ``levers`` in the header. ``threads``: the
    intra-op threads the run trains with, which its resume keeps (another count sums in another order).
    """
    import torch

    tensors, scalars = {}, {}
    if weights is not None:
        tensors.update({f"{WEIGHTS_PREFIX}{k}": _host(v) for k, v in unwrap(weights).state_dict().items()})
    opt = optimizer.state_dict()
    for pid, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = _host(value)
            else:
                scalars.setdefault(str(pid), {})[name] = _json_safe(value, "optimizer")
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    header = {
        "epoch": epoch, "step": step, "best": best,
        "model": {k: asdict(card)[k] for k in MODEL_KEYS},
        "run": run or {},
        "optimizer": {"param_groups": _json_safe(opt["param_groups"], "optimizer"), "scalars": scalars},
        "scheduler": _json_safe(scheduler.state_dict(), "scheduler"),
        "scaler": _json_safe(scaler.state_dict(), "scaler"),
        "numpy_rng": [int(pos), int(has_gauss), float(cached)],
        "python_rng": _json_safe(random.getstate(), "random"),
        "levers": _json_safe(levers or {}, "levers"),
    }
    if threads is not None:
        header["threads"] = int(threads)
    return tensors, header


def resume_bytes(tensors: dict, header: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={RESUME_META: json.dumps(header)})


def read_resume(path: Path) -> tuple[dict, dict]:
    """``(tensors, header)`` of a resume file, read without pickle.

    Raises:
        HandsegError: the file is missing, not a safetensors file, not handseg resume state, or its model
            card or run identity is missing or incomplete.
    """
    return _read(path, tensors=True)


def read_resume_header(path: Path) -> dict:
    """The JSON header of a resume file, checked like :func:`read_resume` (its tensors are not read)."""
    return _read(path, tensors=False)[1]


def _read(path: Path, tensors: bool) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise HandsegError("resume state not found", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:
        raise HandsegError(f"not a handseg resume file ({str(e).splitlines()[0][:120]})", path) from None
    try:
        header = json.loads(meta[RESUME_META])
        for key in ("epoch", "step", "best", "model", "run", "optimizer", "scheduler", "scaler"):
            header[key]  # noqa: B018 (presence check)
        if not (isinstance(header["epoch"], int) and isinstance(header["step"], int)):
            raise TypeError("epoch and step must be integers")
    except (KeyError, TypeError, ValueError) as e:
        raise HandsegError(f"not a handseg resume file (bad header: {e})", path) from None
    except RecursionError:
        raise HandsegError(f"not a handseg resume file (bad header: {JSON_TOO_DEEP})", path) from None
    # a resumed run is checked against these: a key left out would let any value through
    for part, keys in (("model", MODEL_KEYS), ("run", RUN_KEYS)):
        saved = header[part]
        missing = [k for k in keys if not isinstance(saved, dict) or k not in saved]
        if missing:
            raise HandsegError(f"resume state is incomplete: its {part} lacks {', '.join(missing)} (written by "
                               "another handseg version, or edited); it cannot be checked against this run", path)
    for part in ("optimizer", "scheduler", "scaler", "best", "run"):
        _check_finite(header[part], part, path)
    run = header["run"]
    if not (all(isinstance(run[k], int) and not isinstance(run[k], bool) and run[k] > 0
                for k in ("batch_size", "accum", "epochs"))
            and isinstance(run["lr"], int | float) and not isinstance(run["lr"], bool) and run["lr"] > 0):
        raise HandsegError("resume state is malformed: its run's lr, batch_size, accum or epochs is not a positive "
                           "number", path)
    saved = header.get("threads")  # absent in resume files of older versions
    if saved is not None and not (isinstance(saved, int) and not isinstance(saved, bool) and 0 < saved <= 4096):
        raise HandsegError(f"resume state is malformed: its threads is {saved!r}, not a positive integer", path)
    return found, header


def _check_finite(value: Any, where: str, path: Path) -> None:
    """NaN or infinity in saved state would surface later as a diverged loss blamed on ``--lr``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise HandsegError(f"resume state holds {value} ({where})", path)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}", path)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}.{i}", path)


def restore(tensors: dict, header: dict, optimizer, scheduler, scaler, path: Path) -> None:
    """Load a resume file's state into a freshly built optimizer, scheduler and scaler."""
    import torch

    try:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, entries in header["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(entries)
        _check_state(state, [p for g in optimizer.param_groups for p in g["params"]], path)
        groups = header["optimizer"]["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scheduler.load_state_dict(header["scheduler"])
        scaler.load_state_dict(header["scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        pos, has_gauss, cached = header["numpy_rng"]
        np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        py = header["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    except HandsegError:
        raise
    except Exception as e:  # a state from another model or a tampered file: say so in one line
        raise HandsegError(f"resume state does not fit this run ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:140]})", path) from None


def _check_state(state: dict[int, dict], params: list, path: Path) -> None:
    """Refuse, before the first step, optimizer state that does not fit the model (AdamW loads it
    without looking, and fails at its first step) and NaN or infinity in its tensors (see
    :func:`_check_finite`)."""
    import torch

    for pid, entries in sorted(state.items()):
        if not 0 <= pid < len(params):
            raise HandsegError(f"resume state has optimizer state for parameter {pid}, but the model has "
                               f"{len(params)}", path)
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and name != "step" and value.shape != params[pid].shape:
                raise HandsegError(f"resume state does not fit this run: optimizer.{pid}.{name} has shape "
                                   f"{list(value.shape)}, its parameter {list(params[pid].shape)}", path)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
                raise HandsegError(f"resume state holds NaN or infinity (optimizer.{pid}.{name})", path)


def find_resume(out: Path) -> tuple[Path, ModelCard]:
    """The resume file that belongs to ``last.safetensors`` (the same epoch), and last's card.

    Raises:
        HandsegError: either file is missing or corrupt, or they describe different epochs.
    """
    last = out / LAST
    if not last.is_file():
        raise HandsegError(f"nothing to resume: no {LAST}", out)
    card = read_card(last)
    path = out / resume_name(card.epoch)
    if not path.is_file():
        found = sorted(p.name for p in out.glob(RESUME_GLOB))
        raise HandsegError(f"no resume state for epoch {card.epoch} of {LAST} (found: "
                           f"{', '.join(found) or 'none'}); the run cannot be continued exactly", out)
    return path, card


def check_same_model(header: dict, card: ModelCard, path: Path) -> None:
    """A resumed run continues the same model: refuse another --arch, --encoder, --size ..."""
    saved = header["model"]
    now = asdict(card)
    for key in MODEL_KEYS:
        if saved[key] != now[key]:
            flag = "--" + key.replace("_", "-")
            raise HandsegError(f"the run was trained with {flag} {saved[key]}, not {now[key]}; --resume continues "
                               "the same model (drop the flag, or start a new run with another --out)", path)


LEVER_KEYS = ("preprocess", "ema", "roi", "roi_margin")
"""Card fields a resumed run must share with ``last.safetensors`` (newer than resume files' model keys)."""


def check_same_levers(last: ModelCard, card: ModelCard, path: Path) -> None:
    """A resumed run keeps the levers that change what the model sees or is: refuse another --preprocess,
    --ema, --roi or --roi-margin."""
    for key in LEVER_KEYS:
        saved, now = getattr(last, key), getattr(card, key)
        if saved != now:
            saved, now = (roi_label(v) if isinstance(v, list) else v for v in (saved, now))
            flag = "--" + key.replace("_", "-")
            raise HandsegError(f"the run was trained with {flag} {saved or 'none'}, not {now or 'none'}; --resume "
                               "continues the same model (give the run's value, or start a new run with another "
                               "--out)", path)


def run_identity(cfg) -> dict:
    """What a resumed run must share with the run it continues besides the model: the data, the
    splits (by content), the fold, the extra data and the stage-1 context. Training on with another
    fold would show the model its former validation images and make its out-of-fold maps in-sample."""
    import hashlib


    def real(p) -> str:
        return str(Path(p).resolve())

    splits = None
    if cfg.splits is not None and Path(cfg.splits).is_file():
        splits = hashlib.sha256(Path(cfg.splits).read_bytes()).hexdigest()
    return {"data": real(resolve_data(cfg.data, "train").root), "splits": splits, "fold": cfg.fold,
            "extra": sorted(real(p) for p in cfg.extra), "context": sorted(real(p) for p in cfg.context),
            "seed": cfg.seed, "lr": cfg.lr, "batch_size": cfg.batch_size, "accum": cfg.accum, "epochs": cfg.epochs,
            "max_steps": cfg.max_steps}


_RUN_FLAGS = {"data": "--data", "splits": "--splits (its content)", "fold": "--fold", "extra": "--extra",
              "context": "--context", "seed": "--seed"}
SCHEDULE_OPTIONS = ("lr", "batch_size", "accum")
"""Options a resumed run takes from the run when not given: the saved optimizer and scheduler state
were made with them (another value would be silently overridden, or change the steps an epoch)."""
RUN_KEYS = (*_RUN_FLAGS, *SCHEDULE_OPTIONS, "epochs")
"""A resume file's run identity; ``epochs`` is the plan it was made with (a resumed run may change it)."""


def check_same_run(header: dict, identity: dict, path: Path) -> None:
    """Refuse to resume with other data, splits, fold, extra data, context, seed, --lr, --batch-size or
    --accum."""
    saved = header["run"]
    for key, flag in _RUN_FLAGS.items():
        if saved[key] != identity.get(key):
            raise HandsegError(f"the run was trained with another {flag} ({saved[key]!r}, now {identity.get(key)!r}); "
                               "--resume continues the same run (start a new one with another --out)", path)
    for key in SCHEDULE_OPTIONS:
        if saved[key] != identity.get(key):
            flag = "--" + key.replace("_", "-")
            raise HandsegError(f"the run was trained with {flag} {saved[key]}, not {identity.get(key)}; --resume "
                               "continues its schedule (drop the flag, or start a new run with another --out)", path)


def saved_schedule(out: Path) -> dict:
    """The run in ``out``'s ``--lr``, ``--batch-size``, ``--accum`` and ``--epochs``, for the options a
    ``--resume`` does not give; ``{}`` where there is no readable resume state (train then says why)."""
    try:
        header = read_resume_header(find_resume(out)[0])
    except HandsegError:
        return {}
    return {k: header["run"][k] for k in (*SCHEDULE_OPTIONS, "epochs")}


def prune_resume(out: Path) -> list[tuple[Path, int]]:
    """Delete the resume state of a finished run (``train --no-keep-resume``, ``handseg prune RUN``):
    ``best`` and ``last`` stay, so the run still predicts, exports and is selected; it can no longer be
    continued with ``--resume`` (a new run can start from its weights).

    Returns:
        The files removed, each with its size in bytes.

    Raises:
        HandsegError: ``out`` is not a run folder, or the run has not finished its epochs (its resume
            state is what ``--resume`` needs) or its out-of-fold maps.
    """
    check_finished(out)
    removed = []
    for path in sorted(out.glob(RESUME_GLOB)):
        size = path.stat().st_size
        path.unlink()
        removed.append((path, size))
    return removed


def check_finished(out: Path) -> None:
    """Refuse a folder that is not a finished run (see :func:`prune_resume`).

    Raises:
        HandsegError: not a run folder, or the run has not finished its epochs or its out-of-fold maps.
    """
    manifest = out / MANIFEST_NAME
    if not (out / LAST).is_file() or not manifest.is_file():
        raise HandsegError(f"not a run folder (no {LAST} and {MANIFEST_NAME})", out)
    doc = read_json(manifest, "run manifest") or {}
    options = doc.get("options") or {}
    card = read_card(out / LAST)
    epochs, max_steps = options.get("epochs"), options.get("max_steps")
    finished = isinstance(epochs, int) and card.epoch >= epochs or isinstance(max_steps, int) and card.step >= max_steps
    if not finished:
        raise HandsegError(f"the run has not finished (epoch {card.epoch} of {epochs}): its resume state is what "
                           "`train --resume` continues it from; finish it first", out)
    if doc.get("val_images") and not (out / OOF_DIR / MANIFEST_NAME).is_file():
        raise HandsegError("the run has not written its out-of-fold maps: `train --resume` writes them; run "
                           "that first", out)


def stale_resume_files(out: Path, keep: int) -> list[Path]:
    return [p for p in out.glob(RESUME_GLOB) if (m := _RESUME_RE.search(p.name)) and int(m.group(1)) != keep]


# ----------------------------------------------------------------------------------------------
# background writes


class CheckpointWriter:
    """Writes an epoch's files in a background thread from a host copy, one job at a time, in order.

    ``save_epoch`` copies the state to the host (training may go on), then queues the writes; it
    blocks only while an earlier epoch's files are still being written and another job is already
    queued. ``close`` waits for the last write (also when training fails or is interrupted), so a run
    never ends with a file half written; writes themselves are atomic.
    """

    def __init__(self, out: Path):
        self.out = out
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="handseg-checkpoints", daemon=True)
        self.thread.start()
        self.wait_seconds = 0.0
        """Time the training thread spent copying state and waiting for the writer (this epoch)."""
        self.saved = 0
        """Epochs whose files are all on disk."""

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job()
            except BaseException as e:  # reported to the training thread at its next call
                self.error = e
            finally:
                self.queue.task_done()

    def _check(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def save_epoch(self, model, card: ModelCard, improved: bool, resume: tuple[dict, dict]) -> None:
        """Queue ``resume-<epoch>``, ``best`` (if ``improved``) and ``last`` for ``card.epoch``."""

        t0 = time.perf_counter()
        self._check()
        weights = {k: _host(v) for k, v in unwrap(model).state_dict().items()}
        card = replace(card)
        epoch, out = card.epoch, self.out

        def job() -> None:
            atomic_write_bytes(out / resume_name(epoch), resume_bytes(*resume))
            data = checkpoint_bytes(weights, card)
            if improved:
                atomic_write_bytes(out / BEST, data)
            atomic_write_bytes(out / LAST, data)
            for old in stale_resume_files(out, epoch):
                old.unlink(missing_ok=True)
            self.saved += 1

        self.queue.put(job)
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Wait until every queued write is on disk; raise the writer's error, if any."""
        if self.thread.is_alive():
            self.queue.join()
            self.queue.put(None)
            self.thread.join()
        self._check()
