"""Every option of ``handseg train`` and the one place that checks them.

Flags, a ``--config`` YAML and a run's own ``manifest.json`` all end up in a :class:`TrainConfig`;
:meth:`TrainConfig.validated` checks and coerces the resolved values, so a YAML file cannot bypass
what the command line refuses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.common.limits import max_pixels
from handseg.data.preprocess import parse_preprocess
from handseg.data.roi import ROI_MARGIN, parse_roi
from handseg.formats.tta import parse_transforms
from handseg.models.losses import parse_loss_spec

AUGMENT_PRESETS = ("none", "light", "default", "strong")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
LOGGERS = ("none", "tensorboard", "wandb")
RUN_FOLDER_OPTIONS = ("out", "overwrite", "resume")
"""What only the command line decides: where the run goes and whether an existing folder there is
replaced or continued. A config file (YAML or a replayed manifest) sets training options only, so a
file from someone else cannot point ``--overwrite`` at a folder of yours."""


@dataclass
class TrainConfig:
    """Every option of ``handseg train``; saved with the run (``manifest.json`` ``options``)."""

    data: Path = Path("data/train")
    splits: Path | None = None
    fold: int = 0
    arch: str = "unetplusplus"
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"
    size: int = 1024
    crop: int | None = None
    epochs: int = 30
    batch_size: int | str = 4
    """Inputs per step, or ``"auto"``: the largest that fits (:mod:`handseg.training.batchsize`)."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "bce:0.5,dice:0.5"
    class_weights: list[float] | None = None
    augment: str = "default"
    unify_hands: bool = False
    val_every: int = 1
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    accum: int = 1
    workers: int | None = None
    """DataLoader workers; ``None``: fitted to the usable CPUs (:mod:`handseg.common.threads`)."""
    device: str = "auto"
    out: Path = Path("runs/run")
    resume: bool = False
    overwrite: bool = False
    extra: list[Path] = field(default_factory=list)
    cache: Path | None = None
    seed: int = 0
    max_steps: int | None = None
    logger: str = "none"
    oof_tta: str = ""
    """Test-time transforms of the out-of-fold maps written at the end (``""``: none; e.g. ``hflip``)."""
    context: list[Path] = field(default_factory=list)
    """A cascade's stage 1: run folders of whole-image models whose maps become extra input channels."""
    keep_resume: bool = True
    """Keep ``resume-<epoch>.safetensors`` when the run finishes (``False``: delete it then; best and last stay)."""

    preprocess: str | None = None
    """Fixed pre-processing of every input image (``clahe[:CLIP[:TILE]]``), recorded in the model card."""
    init: Path | None = None
    """A run folder or checkpoint whose every layer this run starts from (a fresh optimizer and schedule)."""
    patience: int | None = None
    """Stop when the validation Dice has not improved for this many validations (None: never)."""
    ema: float | None = None
    """Decay of an exponential moving average of the weights, which validation, best, last and OOF use."""
    roi: list[str] | None = None
    """The classes of a ROI model (``--roi carpals``), trained on a box around them (:mod:`handseg.data.roi`)."""
    roi_margin: float = ROI_MARGIN
    """The ROI box's margin on each side, as a share of the classes' extent."""

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k in ("extra", "context") else v)
                for k, v in d.items()}

    def validated(self) -> TrainConfig:
        """A copy with every value checked and coerced (YAML strings to numbers, paths to Path).

        Raises:
            HandsegError: one line naming the option and what is wrong with its value.
        """
        values = {}
        for f in fields(self):
            rule = _RULES[f.name]
            values[f.name] = rule(f.name, getattr(self, f.name))

        parse_loss_spec(values["loss"])

        for flag, side in (("--size", values["size"]), ("--crop", values["crop"])):
            if side is not None and side * side > max_pixels():
                raise HandsegError(f"{flag} {side}: larger than the largest image handseg reads ({max_pixels():,} "
                                   "pixels; HANDSEG_MAX_PIXELS)")
        if values["roi"] is not None:
            if values["crop"] is not None:
                raise HandsegError("--roi trains on a box around its classes, resized to --size; --crop (sliding "
                                   "windows) does not go with it")
            if not values["context"]:
                raise HandsegError("--roi needs --context STAGE1_RUN...: at prediction the box around its classes "
                                   "comes from a whole-image model's masks (e.g. the folds of a --size 512 run)")
        elif values["roi_margin"] != ROI_MARGIN:
            raise HandsegError("--roi-margin sets the box of a --roi model; give --roi CLASSES too")
        elif values["context"] and values["crop"] is None:
            raise HandsegError("--context needs --crop (a cascade's stage 2 trains on full-resolution crops, with "
                               "stage 1's maps of the whole image as context) or --roi")
        if values["patience"] is not None and values["fold"] < 0:
            raise HandsegError("--patience stops on the validation Dice, and --fold -1 has no validation images")
        if values["init"] is not None and values["resume"]:
            raise HandsegError("--init starts a new run from a model's weights and --resume continues the run in "
                               "--out: choose one")
        return replace(self, **values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int(minimum: int | None = None, optional: bool = False):
    def check(name: str, value: Any):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str | float):
            raise HandsegError(f"{_flag(name)}: expected an integer, got {value!r}")
        try:
            number = int(value) if not isinstance(value, float) else value
        except ValueError:
            raise HandsegError(f"{_flag(name)}: expected an integer, got {value!r}") from None
        if isinstance(number, float):
            if not number.is_integer():
                raise HandsegError(f"{_flag(name)}: expected an integer, got {value!r}")
            number = int(number)
        if minimum is not None and number < minimum:
            raise HandsegError(f"{_flag(name)}: must be at least {minimum}, got {number}")
        return number

    return check


def _int_or_auto(minimum: int):
    number = _int(minimum)

    def check(name: str, value: Any):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return number(name, value)

    return check


def _float(minimum: float, exclusive: bool):
    def check(name: str, value: Any):
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        ok = math.isfinite(number) and (number > minimum if exclusive else number >= minimum)
        if not ok:
            what = "a positive number" if exclusive else f"a number >= {minimum:g}"
            raise HandsegError(f"{_flag(name)}: must be {what}, got {value!r}")
        return number

    return check


def _choice(choices: tuple[str, ...]):
    def check(name: str, value: Any):
        if value not in choices:
            raise HandsegError(f"{_flag(name)}: unknown value {value!r}; valid: {', '.join(choices)}")
        return value

    return check


def _bool(name: str, value: Any):
    if not isinstance(value, bool):
        raise HandsegError(f"{_flag(name)}: expected true or false, got {value!r}")
    return value


def _text(name: str, value: Any):
    if not isinstance(value, str) or not value.strip():
        raise HandsegError(f"{_flag(name)}: expected a name, got {value!r}")
    return value


def _path(optional: bool = False):
    def check(name: str, value: Any):
        if value is None and optional:
            return None
        if not isinstance(value, str | Path) or str(value) == "":
            raise HandsegError(f"{_flag(name)}: expected a path, got {value!r}")
        return Path(value)

    return check


def _paths(name: str, value: Any):
    if value is None:
        return []
    if isinstance(value, str | Path):
        value = [value]
    if not isinstance(value, list | tuple):
        raise HandsegError(f"{_flag(name)}: expected a list of paths, got {value!r}")
    return [_path()(name, v) for v in value]


def _tta_spec(name: str, value: Any):
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise HandsegError(f"{_flag(name)}: expected transforms like hflip,scale:0.8,1.2, got {value!r}")

    parse_transforms(value)
    return value


def parse_class_weights(name: str, value: Any) -> list[float] | None:
    """29 finite, non-negative weights (a list, or text like ``"1,1,2,..."``), not all zero."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise HandsegError(f"{_flag(name)}: expected {NUM_CLASSES} comma-separated numbers, got {value!r}")
    weights = [_float(0.0, exclusive=False)(name, v) for v in items if not (isinstance(v, str) and not v.strip())]
    if len(weights) != NUM_CLASSES:
        raise HandsegError(f"{_flag(name)}: needs {NUM_CLASSES} numbers, got {len(weights)}")
    if sum(weights) <= 0:
        raise HandsegError(f"{_flag(name)}: the weights are all zero")
    return weights


def _decay(name: str, value: Any) -> float | None:
    if value is None:
        return None
    number = _float(0.0, exclusive=True)(name, value)
    if number >= 1.0:
        raise HandsegError(f"{_flag(name)}: must be a decay between 0 and 1 (e.g. 0.999), got {value!r}")
    return number


def _margin(name: str, value: Any) -> float:
    number = _float(0.0, exclusive=False)(name, value)
    if number > 2.0:
        raise HandsegError(f"{_flag(name)}: a margin is a share of the box's extent between 0 and 2, got {value!r}")
    return number


_RULES = {
    "data": _path(), "splits": _path(optional=True), "fold": _int(-1), "arch": _text, "encoder": _text,
    "encoder_weights": _text, "size": _int(1), "crop": _int(1, optional=True), "epochs": _int(1),
    "batch_size": _int_or_auto(1), "lr": _float(0.0, exclusive=True), "weight_decay": _float(0.0, exclusive=False),
    "loss": _text, "class_weights": parse_class_weights, "augment": _choice(AUGMENT_PRESETS),
    "unify_hands": _bool, "val_every": _int(1), "amp": _choice(AMP_CHOICES), "channels_last": _bool,
    "compile": _bool, "accum": _int(1), "workers": _int(0, optional=True), "device": _text, "out": _path(),
    "resume": _bool,
    "overwrite": _bool,
    "extra": _paths, "cache": _path(optional=True), "seed": _int(0), "max_steps": _int(1, optional=True),
    "logger": _choice(LOGGERS), "oof_tta": _tta_spec, "context": _paths, "keep_resume": _bool,
    "preprocess": lambda name, value: parse_preprocess(value, _flag(name)), "init": _path(optional=True),
    "patience": _int(1, optional=True), "ema": lambda name, value: _decay(name, value),
    "roi": lambda name, value: parse_roi(value, _flag(name)), "roi_margin": _margin,
}
