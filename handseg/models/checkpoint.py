"""Self-describing checkpoints: safetensors weights with everything ``predict`` needs in the header.

A run folder holds ``best.safetensors`` and ``last.safetensors`` (weights + metadata),
``resume-<epoch>.safetensors`` (optimizer, scheduler, scaler, counters, random states; see
:mod:`handseg.training.state`), ``metrics.csv`` and ``manifest.json``. Nothing here is pickled:
a checkpoint from someone else cannot run code when it is loaded.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from handseg import __version__
from handseg.common.constants import CLASSES, DEFAULT_THRESHOLD
from handseg.common.errors import JSON_TOO_DEEP, HandsegError
from handseg.data.preprocess import parse_preprocess
from handseg.formats.files import atomic_open
from handseg.models.build import build_model
from handseg.models.plan import ModelPlan, model_plan

META_KEY = "handseg"
BEST, LAST = "best.safetensors", "last.safetensors"


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
    context: list[str] | None = None
    """A cascade's stage 2: the stage-1 checkpoints whose maps are its extra input channels (paths
    relative to this checkpoint's folder, or absolute); see :mod:`handseg.inference.cascade`."""
    context_sha256: list[str] | None = None
    """The stage-1 checkpoints' SHA-256: another file at a stage-1 path is refused, not used."""
    context_tta: list[str] | None = None
    """The TTA (transform names, mean-merged) of the stage-1 maps stage 2 was trained on; predict runs
    stage 1 with it, so that test context is made as training context was. None: the identity."""
    plan: dict | None = None
    """How the model was built (:class:`handseg.models.plan.ModelPlan`: input size, encoder options);
    filled from the model when saved. Cards written before it existed rebuild from arch, encoder and size."""
    preprocess: str | None = None
    """``train --preprocess``: the fixed transform every input image gets before the network, in training and
    at prediction (see :mod:`handseg.data.preprocess`; e.g. ``clahe:2:8``); None: the image as read."""
    init: str | None = None
    """``train --init``: the checkpoint every layer started from (its path when training began)."""
    init_sha256: str | None = None
    """The SHA-256 of that parent checkpoint: which model this one was fine-tuned from."""
    ema: float | None = None
    """``train --ema``: the decay of the moving average these weights are (None: the weights as trained)."""
    roi: list[str] | None = None
    """``train --roi``: the classes this model predicts, from a box around them (see :mod:`handseg.data.roi`);
    the box comes from its stage-1 (``context``) masks at prediction, and predict takes only these classes from
    it (replacing the whole-hand models' ones). None: a whole-image model of every class."""
    roi_margin: float | None = None
    """The margin of the ROI box (share of the classes' extent on each side)."""

    @property
    def predicted(self) -> list[int]:
        """The indices (in ``classes``) of the classes this model predicts: all, or a ROI model's own."""
        if not self.roi:
            return list(range(len(self.classes)))
        return [i for i, c in enumerate(self.classes) if c in self.roi]

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        """A card from its JSON, every field checked (a malformed card raises ValueError)."""
        if not isinstance(d, dict):
            raise ValueError("the card is not an object")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("arch", "encoder", "size"):
            if key not in known:
                raise ValueError(f"the card has no {key!r}")
        card = cls(**known)
        _check_card(card)
        return card


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_card(card: ModelCard) -> None:
    import math

    if not (isinstance(card.arch, str) and isinstance(card.encoder, str)):
        raise ValueError("arch and encoder must be names")
    if not (_is_int(card.size) and card.size > 0) or not (card.crop is None or (_is_int(card.crop) and card.crop > 0)):
        raise ValueError("size and crop must be positive integers")
    if not (_is_int(card.in_channels) and card.in_channels > 0):
        raise ValueError("in_channels must be a positive integer")
    if not (isinstance(card.classes, list) and card.classes and all(isinstance(c, str) for c in card.classes)):
        raise ValueError("classes must be a list of names")
    t = card.thresholds
    if not (isinstance(t, list) and len(t) == len(card.classes)
            and all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1 for v in t)):
        raise ValueError(f"thresholds must be {len(card.classes)} numbers between 0 and 1")
    norm = card.norm
    if not (isinstance(norm, dict) and all(isinstance(norm.get(k), int | float) and math.isfinite(norm[k])
                                           for k in ("mean", "std")) and norm["std"] > 0):
        raise ValueError("norm must have a finite mean and a positive std")
    if not isinstance(card.unify_hands, bool):
        raise ValueError("unify_hands must be true or false")
    if card.context is not None and not (isinstance(card.context, list) and card.context
                                         and all(isinstance(c, str) for c in card.context)):
        raise ValueError("context must be a list of stage-1 checkpoint paths")
    if card.context_sha256 is not None and not (isinstance(card.context_sha256, list)
                                                and all(isinstance(c, str) for c in card.context_sha256)):
        raise ValueError("context_sha256 must be a list of SHA-256 strings")
    if card.context_tta is not None and not (isinstance(card.context_tta, list)
                                             and all(isinstance(c, str) for c in card.context_tta)):
        raise ValueError("context_tta must be a list of transform names")
    if not all(v is None or isinstance(v, str) for v in (card.init, card.init_sha256)):
        raise ValueError("init and init_sha256 must be a path and a SHA-256 string")
    if card.ema is not None and not (isinstance(card.ema, int | float) and not isinstance(card.ema, bool)
                                     and 0 < card.ema < 1):
        raise ValueError("ema must be a decay between 0 and 1")
    if card.roi is not None:
        if not (isinstance(card.roi, list) and card.roi and all(isinstance(c, str) and c in card.classes
                                                                 for c in card.roi)):
            raise ValueError("roi must be a list of the model's class names")
        if not card.context:
            raise ValueError("a ROI model needs its stage-1 runs (context) for its box")
        m = card.roi_margin
        if not (isinstance(m, int | float) and not isinstance(m, bool) and 0 <= m <= 2):
            raise ValueError("roi_margin must be a number between 0 and 2")
    if card.preprocess is not None:
        try:
            if not isinstance(card.preprocess, str) or parse_preprocess(card.preprocess) is None:
                raise HandsegError("expected a spec like clahe:2:8")
        except HandsegError as e:
            raise ValueError(f"preprocess: {e}") from None


def checkpoint_bytes(weights: dict, card: ModelCard) -> bytes:
    """A safetensors file's bytes: ``weights`` (name -> CPU tensor) with the card in its header."""
    from safetensors.torch import save

    return save(weights, metadata={META_KEY: json.dumps(asdict(card))})


def with_card(path: str | Path, card: ModelCard) -> bytes:
    """A checkpoint file's bytes with another model card in its header (the tensors are untouched:
    safetensors offsets count from the end of the header, which is padded to 8 bytes)."""
    import struct

    data = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header.setdefault("__metadata__", {})[META_KEY] = json.dumps(asdict(card))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def save_checkpoint(path: str | Path, model, card: ModelCard) -> None:
    """Write weights and card atomically as one safetensors file; the card records the model's build
    plan (see :func:`handseg.models.plan.model_plan`) so :func:`load_checkpoint` rebuilds the same model."""

    plan = model_plan(model)
    if plan is not None:
        card = replace(card, plan=plan.to_dict())
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    data = checkpoint_bytes(state, card)
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


def checkpoint_sha256(path: str | Path) -> str:
    """The SHA-256 of a checkpoint file: what a recipe or a cascade pins its models by. Computed once
    per file version in a process (a cascade's stage-1 checkpoints are pinned, keyed and checked by it)."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256_of(path, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@functools.lru_cache(maxsize=256)
def _sha256_of(path: Path, version: tuple) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


MAX_HEADER_BYTES = 100_000_000
"""A safetensors header larger than this is refused (a checkpoint's is a few hundred kB)."""


def read_card(path: str | Path) -> ModelCard:
    """The one reader of a checkpoint's model card, checked: the safetensors header (8-byte little-endian
    length, then JSON) is read without torch and without the weights.

    Raises:
        HandsegError: not a safetensors file, no handseg card, or a malformed card (naming the file).
    """
    path = resolve_checkpoint(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header of {size:,} bytes")
            meta = json.loads(f.read(size)).get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not an object")
    except (OSError, ValueError, struct.error, AttributeError, UnicodeDecodeError) as e:
        raise HandsegError(f"not a safetensors checkpoint ({str(e)[:120]})", path) from None
    except RecursionError:
        raise HandsegError(f"not a safetensors checkpoint (its header: {JSON_TOO_DEEP})", path) from None
    if META_KEY not in meta:
        raise HandsegError("checkpoint has no handseg model card (not written by handseg train?)", path)
    try:
        return ModelCard.from_dict(json.loads(meta[META_KEY]))
    except (ValueError, TypeError) as e:
        raise HandsegError(f"malformed model card ({e})", path) from None
    except RecursionError:
        raise HandsegError(f"malformed model card ({JSON_TOO_DEEP})", path) from None


def load_weights(model, path: str | Path) -> None:
    """Load a checkpoint's weights into ``model``; a corrupt file or other model is one line naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        model.load_state_dict(load_file(str(path), device="cpu"))
    except Exception as e:  # mismatched keys or shapes, or a truncated file
        raise HandsegError(f"weights do not match the card's model ({str(e).splitlines()[0][:160]})", path) from None


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """Rebuild the model from a checkpoint's card and load its weights: ``(model in eval mode, card)``."""

    path = resolve_checkpoint(path)
    card = read_card(path)
    try:
        plan = ModelPlan.from_dict(card.plan) if card.plan else None
        model = build_model(card.arch, card.encoder, "none", classes=len(card.classes), in_channels=card.in_channels,
                            size=card.crop or card.size, plan=plan)
    except HandsegError as e:
        raise HandsegError(f"cannot rebuild the checkpoint's model: {e}", path) from None
    load_weights(model, path)
    return model.to(device).eval(), card


def unwrap(model):
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
