"""Self-describing checkpoints: safetensors weights with everything ``predict`` needs in the header.

A run folder holds ``best.safetensors`` and ``last.safetensors`` (weights + metadata), ``resume.pt``
(optimizer, scheduler, scaler, step counters, RNG states), ``metrics.csv`` and ``manifest.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from handseg import __version__
from handseg.core.constants import CLASSES, DEFAULT_THRESHOLD
from handseg.core.errors import HandsegError
from handseg.core.files import atomic_open

META_KEY = "handseg"
BEST, LAST, RESUME = "best.safetensors", "last.safetensors", "resume.pt"


@dataclass
class ModelCard:
    """What a checkpoint says about its model: enough to rebuild it and run it correctly."""

    arch: str
    encoder: str
    size: int
    crop: int | None = None
    in_channels: int = 1
    norm: dict = field(default_factory=lambda: {"mean": 0.449, "std": 0.226})
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    unify_hands: bool = False
    thresholds: list[float] = field(default_factory=lambda: [DEFAULT_THRESHOLD] * len(CLASSES))
    epoch: int = 0
    step: int = 0
    score: float | None = None
    handseg_version: str = __version__
    plan: dict | None = None
    """How the model was built (:class:`handseg.core.models.ModelPlan`: input size, encoder options);
    filled from the model when saved. Cards written before it existed rebuild from arch, encoder and size."""

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def save_checkpoint(path: str | Path, model, card: ModelCard) -> None:
    """Write weights and card atomically as one safetensors file; the card records the model's build
    plan (see :func:`handseg.core.models.model_plan`) so :func:`load_checkpoint` rebuilds the same model."""
    from safetensors.torch import save

    from handseg.core.models import model_plan

    plan = model_plan(model)
    if plan is not None:
        card = replace(card, plan=plan.to_dict())
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    data = save(state, metadata={META_KEY: json.dumps(asdict(card))})
    with atomic_open(path, "wb") as f:
        f.write(data)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means its ``best.safetensors`` (or ``last`` if no best yet); a file is itself."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise HandsegError(f"run folder has no {BEST} or {LAST}", path)
    if not path.is_file():
        raise HandsegError("checkpoint not found", path)
    return path


def read_card(path: str | Path) -> ModelCard:
    from safetensors import safe_open

    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise HandsegError(f"not a safetensors checkpoint ({str(e)[:120]})", path) from None
    if META_KEY not in meta:
        raise HandsegError("checkpoint has no handseg model card (not written by handseg train?)", path)
    return ModelCard.from_dict(json.loads(meta[META_KEY]))


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """Rebuild the model from a checkpoint's card and load its weights: ``(model in eval mode, card)``."""
    from safetensors.torch import load_file

    from handseg.core.models import ModelPlan, build_model

    path = resolve_checkpoint(path)
    card = read_card(path)
    try:
        plan = ModelPlan.from_dict(card.plan) if card.plan else None
        model = build_model(card.arch, card.encoder, "none", classes=len(card.classes), in_channels=card.in_channels,
                            size=card.crop or card.size, plan=plan)
    except HandsegError as e:
        raise HandsegError(f"cannot rebuild the checkpoint's model: {e}", path) from None
    try:
        model.load_state_dict(load_file(str(path), device="cpu"))
    except RuntimeError as e:
        raise HandsegError(f"weights do not match the card's model ({str(e).splitlines()[0][:160]})", path) from None
    return model.to(device).eval(), card


def unwrap(model):
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
