"""Training levers the top teams measured (issue 20): fine-tuning from a trained model (``--init``),
early stopping (``--patience``) and an exponential moving average of the weights (``--ema``).

Each is recorded where prediction and ``--resume`` see it: the model card names the parent of
``--init`` by SHA-256 and the EMA decay; the resume state carries the EMA and the patience count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from handseg.common.errors import HandsegError
from handseg.models.checkpoint import ModelCard, checkpoint_sha256, load_weights, read_card, resolve_checkpoint

INIT_KEYS = (("arch", "--arch"), ("encoder", "--encoder"), ("classes", "classes"),
             ("in_channels", "input channels (--context)"))
"""What a model started with ``--init`` must share with its parent (its size and crop may differ)."""


def init_parent(path: str | Path, card: ModelCard) -> tuple[Path, str]:
    """The checkpoint ``--init`` names (a run folder means its best) and its SHA-256, checked against
    this run's card before anything is trained.

    Raises:
        HandsegError: no such checkpoint, or one of another architecture, encoder, classes or channels.
    """
    parent = resolve_checkpoint(path)
    theirs = read_card(parent)
    for key, flag in INIT_KEYS:
        if getattr(theirs, key) != getattr(card, key):
            raise HandsegError(f"--init: the checkpoint's {flag} is {getattr(theirs, key)!r}, this run's "
                               f"{getattr(card, key)!r}; --init loads every layer, so the models must match "
                               "(--encoder-weights PATH takes an encoder alone)", parent)
    return parent, checkpoint_sha256(parent)


def load_init(model, parent: Path) -> None:
    """Every layer of ``model`` from ``parent``; the first layer (in the model's order) that the parent
    lacks, has in another shape, or has beyond the model's is named.

    Raises:
        HandsegError: a layer differs (naming it and the checkpoint).
    """
    from safetensors.torch import load_file

    try:
        weights = load_file(str(parent), device="cpu")
    except Exception as e:
        raise HandsegError(f"--init: not a readable checkpoint ({str(e).splitlines()[0][:120]})", parent) from None
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in weights:
            raise HandsegError(f"--init: layer {name} differs: the checkpoint has no such layer", parent)
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise HandsegError(f"--init: layer {name} differs: shape {list(weights[name].shape)} in the checkpoint, "
                               f"{list(tensor.shape)} in this model", parent)
    extra = [name for name in weights if name not in own]
    if extra:
        raise HandsegError(f"--init: layer {extra[0]} differs: this model has no such layer", parent)
    model.load_state_dict(weights)


# ---------------------------------------------------------------------------------------------- patience


@dataclass
class Patience:
    """Early stopping: :meth:`update` with each validation Dice says whether to stop (``limit``
    validations in a row without a new best; ``limit`` None never stops)."""

    limit: int | None
    best: float = -1.0
    since_best: int = 0
    best_epoch: int = 0

    def update(self, dice: float, epoch: int) -> bool:
        if dice > self.best:
            self.best, self.since_best, self.best_epoch = dice, 0, epoch
        else:
            self.since_best += 1
        return self.exhausted

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.since_best >= self.limit

    def state(self) -> dict:
        return {"best": self.best, "since_best": self.since_best, "best_epoch": self.best_epoch}

    def restored(self, saved: dict | None) -> Patience:
        """Itself, counting on from a resume header's ``levers.patience`` (absent in runs written before it:
        counting starts afresh)."""
        if isinstance(saved, dict):
            values = (saved.get("best", -1.0), saved.get("since_best", 0), saved.get("best_epoch", 0))
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                raise HandsegError(f"resume state is malformed: its patience count {saved!r} is not numbers")
            self.best, self.since_best, self.best_epoch = float(values[0]), int(values[1]), int(values[2])
        return self

    def message(self, epoch: int, epochs: int) -> str:
        return (f"early stop: validation Dice has not improved for {self.since_best} validations (--patience "
                f"{self.limit}; best {self.best:.4f} at epoch {self.best_epoch}); stopping after epoch {epoch} of "
                f"{epochs} (the learning-rate schedule stays planned over {epochs} epochs)")


def stopped_early(limit: int | None, levers: dict) -> bool:
    """Whether a resumed run had already stopped early under ``--patience limit``."""
    return Patience(limit).restored(levers.get("patience")).exhausted


# ---------------------------------------------------------------------------------------------- EMA


class Ema:
    """An exponential moving average of a model's weights: after each optimizer step every floating
    tensor of the state (parameters and BatchNorm statistics) becomes ``decay * ema + (1 - decay) * w``;
    integer tensors (batch counters) are copied. ``module`` is a copy of the model holding the average:
    what validation scores, ``best``/``last`` hold and the out-of-fold maps come from."""

    def __init__(self, model, decay: float):
        import copy

        import torch

        if not 0.0 < decay < 1.0:
            raise HandsegError(f"--ema: the decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._torch = torch

    @staticmethod
    def _tensors(model) -> list:
        return list(model.state_dict().values())

    def update(self, model) -> None:
        with self._torch.no_grad():
            for mine, theirs in zip(self._tensors(self.module), self._tensors(model)):
                if mine.is_floating_point():
                    mine.mul_(self.decay).add_(theirs.detach().to(mine.dtype), alpha=1.0 - self.decay)
                else:
                    mine.copy_(theirs)


def make_ema(decay: float | None, model, last: Path | None) -> Ema | None:
    """--ema: the average starts at the model's weights, or continues from a resumed run's ``last`` (which
    holds it); None without --ema."""
    if decay is None:
        return None
    ema = Ema(model, decay)
    if last is not None:
        load_weights(ema.module, last)
    return ema
