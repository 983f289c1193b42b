"""The model registry: every segmentation_models_pytorch architecture with any smp or timm encoder, at any size.

Encoders are given by smp's own name (``resnet34``, ``mit_b3``), by any timm name (``hrnet_w48``,
``convnext_small``), which resolves to smp's ``tu-`` form, or in the ``tu-`` form directly.
Images are single-channel; a pretrained first convolution is adapted by summing its RGB filters.

A model is built for one input size (the training size, or the crop). :func:`plan_model` is the one
place that works out what an architecture + encoder needs at that size and says in one line why a
combination cannot run; the :class:`ModelPlan` it returns travels with the model and its checkpoint,
so ``predict`` rebuilds the identical model. The rules, as smp 0.6 and timm 1.0 make them:

- CNNs (ResNet/ResNeXt, RegNet, EfficientNet, ConvNeXt): every architecture; dpt only in the timm
  form (``tu-resnet18``, not smp's ``resnet18``). Any multiple of 32; pan needs 128 or more.
- HRNet (``hrnet_w18_small``): every architecture but deeplabv3/deeplabv3plus (it cannot be
  dilated); pan runs undilated (output stride 32) and needs 256 or more.
- MiT (smp's ``mit_b0``): every architecture but unetplusplus, linknet and dpt. Multiples of 32.
- Swin (``swin_tiny_patch4_window7_224``), SAM2 Hiera (``sam2_hiera_tiny``): every architecture
  but deeplabv3/deeplabv3plus; pan undilated from 256. Multiples of 32 (timm pads the windows), and
  the model takes other sizes at run time.
- Hiera (``hiera_tiny_224``): as Swin, but timm's Hiera runs only at the size it was built for: no
  test-time scales (sliding windows are fine: they are the crop size).
- ViT (``vit_small_patch16_224``): dpt only (its features have one scale). Multiples of lcm(32, patch).

Transformers whose timm class takes ``img_size`` are built for the input size; where timm can also
take other sizes at run time (``dynamic_img_size`` / ``strict_img_size=False``) that is switched on,
so test-time scales and sliding windows work. Weights made at another size (timm's 224 checkpoints)
are resized on load: absolute position tables resampled, relative position tables re-interpolated.
"""

from __future__ import annotations

import difflib
import functools
import math
import warnings
from dataclasses import asdict, dataclass, field

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError

ARCH_ALIASES = {"unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus"}
# grayscale normalisation that matches ImageNet-pretrained encoders (the mean of the RGB statistics)
DEFAULT_NORM = {"mean": 0.449, "std": 0.226}
BASE_MULTIPLE = 32
"""Every input side is a multiple of this (smp's encoders downsample five times)."""
DILATING_ARCHS = ("deeplabv3", "deeplabv3plus")
"""Architectures that dilate their encoder to output stride 8 or 16; ``pan`` falls back to 32."""
PLAN_ATTR = "handseg_plan"
"""The attribute of a model built by :func:`build_model` that holds its :class:`ModelPlan`."""
_SIZE_SEARCH = 16
"""How many larger sizes an impossible size probes to suggest the smallest that runs."""


@dataclass(frozen=True)
class ModelPlan:
    """How a model is built for an input size and which input sizes it then takes.

    Attributes:
        size: input side the model is built for (the training size or the crop).
        multiple: every input side must be a multiple of this.
        fixed: the model runs only at ``size`` (timm builds its position table for it and cannot
            resize at run time), so no test-time scales.
        encoder_kwargs: keyword arguments for ``timm.create_model`` (``img_size``, ``dynamic_img_size``).
        arch_kwargs: keyword arguments for the smp architecture (``encoder_output_stride``).
    """

    size: int
    multiple: int = BASE_MULTIPLE
    fixed: bool = False
    encoder_kwargs: dict = field(default_factory=dict)
    arch_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelPlan:
        try:
            return cls(size=int(d["size"]), multiple=int(d["multiple"]), fixed=bool(d["fixed"]),
                       encoder_kwargs=dict(d["encoder_kwargs"]), arch_kwargs=dict(d["arch_kwargs"]))
        except (KeyError, TypeError, ValueError) as e:
            raise HandsegError(f"malformed model plan in checkpoint card ({type(e).__name__}: {e})") from None

    def run_side(self, side: float) -> int:
        """The input side the model takes nearest to ``side`` (e.g. a test-time scale of its size).

        Raises:
            HandsegError: the model runs only at its own size and ``side`` asks for another.
        """
        run = max(self.multiple, int(round(side / self.multiple)) * self.multiple)
        if self.fixed and run != self.size:
            raise HandsegError(f"this model's encoder runs only at {self.size} px (it was built for that size); "
                               f"{run} px (a test-time scale) needs an encoder that takes other sizes")
        return run


def architectures() -> list[str]:
    """The architecture names smp knows, e.g. ``unet``, ``unetplusplus``, ``segformer``."""
    import segmentation_models_pytorch as smp

    return list(smp.MODEL_ARCHITECTURES_MAPPING)


def resolve_arch(name: str) -> str:
    key = ARCH_ALIASES.get(name.lower(), name.lower())
    valid = architectures()
    if key not in valid:
        raise HandsegError(f"unknown architecture {name!r}; valid: {', '.join(valid)}")
    return key


def resolve_encoder(name: str) -> str:
    """smp's name for an encoder: smp's own names as they are, timm names as ``tu-<name>``."""
    import segmentation_models_pytorch as smp
    import timm

    smp_names = list(smp.encoders.encoders)
    if name in smp_names:
        return name
    timm_name = name[3:] if name.startswith("tu-") else name
    if timm.is_model(timm_name):
        return f"tu-{timm_name}"
    close = difflib.get_close_matches(timm_name, list(dict.fromkeys(smp_names + timm.list_models())), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise HandsegError(f"unknown encoder {name!r}; valid: smp encoders ({', '.join(smp_names[:12])}, ... "
                       f"{len(smp_names)} in all) or any timm model name.{hint}")


# ----------------------------------------------------------------------------------------------
# what an encoder needs at an input size


def plan_model(arch: str, encoder: str, size: int | None = None, in_channels: int = 1,
               size_flag: str = "--size") -> ModelPlan:
    """Work out how to build ``arch`` + ``encoder`` for ``size`` x ``size`` inputs, or say why it cannot run.

    The plan comes from the encoder's timm class (does it take ``img_size``, can it take other sizes
    at run time) and from building the model on the meta device and running it once at ``size``
    (no memory, no arithmetic), so every failure smp or timm would raise in the first training step
    is raised here, before training, as one sentence.

    Args:
        arch: architecture name (see :func:`architectures`).
        encoder: smp or timm encoder name.
        size: input side; ``None`` means the encoder's own default (224 for most transformers).
        size_flag: the option the size came from, for the message (``--size`` or ``--crop``).

    Raises:
        HandsegError: one line naming the architecture, the encoder and the reason, e.g.
            ``--size 250: upernet + tu-swin_tiny_patch4_window7_224 needs a multiple of 32; use 224 or 256``.
    """
    import torch

    # the trial builds draw random numbers; a run's initial weights must not depend on them
    with torch.random.fork_rng(devices=[]):
        return _plan(arch, encoder, size, in_channels, size_flag)


def _plan(arch: str, encoder: str, size: int | None, in_channels: int, size_flag: str) -> ModelPlan:
    arch_key, encoder_key = resolve_arch(arch), resolve_encoder(encoder)
    label = f"{arch_key} + {encoder_key}"
    timm_name = encoder_key[3:] if encoder_key.startswith("tu-") else None
    if arch_key == "dpt" and timm_name is None:
        alt = (f"; use tu-{encoder_key}" if _is_timm_model(encoder_key)
               else "; choose a timm encoder (vit_small_patch16_224, ...)")
        raise HandsegError(f"{label}: dpt takes timm encoders only (it reads their forward_intermediates) and "
                           f"{encoder_key} is smp's own{alt}")
    encoder_kwargs, fixed, default_size = {}, False, 256
    if timm_name is not None:
        model_cls, reductions, default_size = _timm_facts(timm_name)
        if arch_key != "dpt" and not _is_pyramid(reductions):
            what = (f"features at one scale (stride {reductions[0]})" if len(set(reductions)) == 1
                    else f"features at strides {', '.join(map(str, reductions))}")
            raise HandsegError(f"{label}: the encoder gives {what} where {arch_key} needs a pyramid (strides 2 or 4 "
                               "to 32); only --arch dpt can use it")
        params = _init_params(model_cls)
        if "img_size" in params:  # a transformer with a position table or windows made for its input size
            encoder_kwargs["img_size"] = size or default_size
            if "dynamic_img_size" in params:
                encoder_kwargs["dynamic_img_size"] = True
            elif "strict_img_size" in params:
                encoder_kwargs["strict_img_size"] = False
            else:
                fixed = True
    size = size or default_size
    if size < BASE_MULTIPLE:
        raise HandsegError(f"{size_flag} {size}: too small; models take at least {BASE_MULTIPLE} px")
    if size % BASE_MULTIPLE:
        raise HandsegError(f"{size_flag} {size}: {label} needs a multiple of {BASE_MULTIPLE}; "
                           f"use {_neighbours(size, BASE_MULTIPLE)}")

    arch_kwargs: dict = {}
    try:
        model = _meta_model(arch_key, encoder_key, in_channels, encoder_kwargs, arch_kwargs)
    except Exception as e:  # noqa: BLE001 - any build failure becomes the sentence below
        if arch_key not in (*DILATING_ARCHS, "pan") or _can_dilate(encoder_key, in_channels, encoder_kwargs):
            raise HandsegError(f"{label} cannot be built: {_first_line(e)}") from None
        if arch_key != "pan":
            others = [a for a in architectures() if a not in DILATING_ARCHS and (a != "dpt" or timm_name)]
            raise HandsegError(f"{label}: {arch_key} dilates its encoder (output stride 8 or 16) and "
                               f"{encoder_key} cannot be dilated; use {', '.join(others)}") from None
        arch_kwargs = {"encoder_output_stride": 32}  # pan also works undilated
        try:
            model = _meta_model(arch_key, encoder_key, in_channels, encoder_kwargs, arch_kwargs)
        except Exception as e:  # noqa: BLE001
            raise HandsegError(f"{label} cannot be built: {_first_line(e)}") from None
    stride = int(getattr(model.encoder, "output_stride", BASE_MULTIPLE))
    multiple = math.lcm(BASE_MULTIPLE, stride)
    if size % multiple:
        raise HandsegError(f"{size_flag} {size}: {label} needs a multiple of {multiple} (32 and its output "
                           f"stride {stride}); use {_neighbours(size, multiple)}")
    problem = _probe(model, in_channels, size)
    if problem:
        raise HandsegError(f"{size_flag} {size}: {label} cannot run at {size} px ({problem})"
                           + _smallest_hint(arch_key, encoder_key, in_channels, encoder_kwargs, arch_kwargs,
                                            size, multiple))
    return ModelPlan(size=size, multiple=multiple, fixed=fixed, encoder_kwargs=encoder_kwargs,
                     arch_kwargs=arch_kwargs)


def model_plan(model) -> ModelPlan | None:
    """The plan a model was built with (through DDP / ``torch.compile`` wrappers), or ``None``."""
    for _ in range(3):
        plan = getattr(model, PLAN_ATTR, None)
        if plan is not None:
            return plan
        inner = getattr(model, "module", None)
        model = inner if inner is not None else getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


@functools.lru_cache(maxsize=64)
def _timm_facts(timm_name: str):
    """``(model class, feature reductions, default input side)`` of a timm model, from a meta-device build."""
    import timm
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = timm.create_model(timm_name)
    info = getattr(model, "feature_info", None) or []
    reductions = [int(i["reduction"]) for i in info] if isinstance(info, list) else list(info.reduction())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default_size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    return type(model), reductions, default_size


def _init_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def _is_pyramid(reductions: list[int]) -> bool:
    """smp's TimmUniversalEncoder takes feature scales 2, 4, ..., 32 / 4, ..., 32 / 1, 2, ..., 32."""
    n = len(reductions)
    return reductions in ([2 ** (i + 1) for i in range(n)], [2 ** (i + 2) for i in range(n)], [2**i for i in range(n)])


def _neighbours(size: int, multiple: int) -> str:
    lo = size // multiple * multiple
    return f"{lo} or {lo + multiple}" if lo >= multiple else f"{multiple}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0][:200] if text else ""
    return f"{type(e).__name__}: {line}" if line else f"{type(e).__name__} in smp/timm"


def _create(arch: str, encoder: str, weights: str | None, in_channels: int, classes: int, encoder_kwargs: dict,
            arch_kwargs: dict):
    import segmentation_models_pytorch as smp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*readout.*")  # smp's DPT advice for prefix-less encoders
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, in_channels=in_channels,
                                classes=classes, **arch_kwargs, **encoder_kwargs)


def _meta_model(arch: str, encoder: str, in_channels: int, encoder_kwargs: dict, arch_kwargs: dict):
    """The model on the meta device: shapes without memory. A few encoders (smp's MiT) compute Python
    numbers from tensors while being built, which meta tensors cannot give; those are built on the
    CPU and moved."""
    import torch

    try:
        with torch.device("meta"):
            model = _create(arch, encoder, None, in_channels, NUM_CLASSES, encoder_kwargs, arch_kwargs)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
        model = _create(arch, encoder, None, in_channels, NUM_CLASSES, encoder_kwargs, arch_kwargs).to("meta")
    return model.eval()


def _can_dilate(encoder: str, in_channels: int, encoder_kwargs: dict) -> bool:
    import segmentation_models_pytorch as smp
    import torch

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            smp.encoders.get_encoder(encoder, in_channels=in_channels, output_stride=16, **encoder_kwargs)
    except Exception:  # noqa: BLE001 - timm says "unexpected keyword output_stride" or asserts
        return False
    return True


def _probe(model, in_channels: int, size: int) -> str | None:
    """Why ``model`` cannot map a ``(2, C, size, size)`` batch to logits of the same size; ``None`` if it can."""
    import torch

    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, size, size, device="meta"))
    except Exception as e:  # noqa: BLE001 - the reason is reported
        return _first_line(e)
    if tuple(out.shape[-2:]) != (size, size):
        return f"its output is {out.shape[-2]} x {out.shape[-1]}"
    return None


def _smallest_hint(arch: str, encoder: str, in_channels: int, encoder_kwargs: dict, arch_kwargs: dict,
                   size: int, multiple: int) -> str:
    for k in range(1, _SIZE_SEARCH + 1):
        side = size + k * multiple
        kwargs = dict(encoder_kwargs, img_size=side) if "img_size" in encoder_kwargs else encoder_kwargs
        try:
            model = _meta_model(arch, encoder, in_channels, kwargs, arch_kwargs)
        except Exception:  # noqa: BLE001 - no hint then
            return ""
        if _probe(model, in_channels, side) is None:
            return f"; the smallest size it runs at is {side}"
    return ""
