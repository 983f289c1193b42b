"""The model registry: every segmentation_models_pytorch architecture with any smp or timm encoder.

Encoders are given by smp's own name (``resnet34``, ``mit_b3``), by any timm name (``hrnet_w48``,
``convnext_small``), which resolves to smp's ``tu-`` form, or in the ``tu-`` form directly.
Images are single-channel; a pretrained first convolution is adapted by summing its RGB filters.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from handseg.core.constants import NUM_CLASSES
from handseg.core.errors import HandsegError

ARCH_ALIASES = {"unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus"}
# grayscale normalisation that matches ImageNet-pretrained encoders (the mean of the RGB statistics)
DEFAULT_NORM = {"mean": 0.449, "std": 0.226}


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
    close = difflib.get_close_matches(timm_name, smp_names + timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise HandsegError(f"unknown encoder {name!r}; valid: smp encoders ({', '.join(smp_names[:12])}, ... "
                       f"{len(smp_names)} in all) or any timm model name.{hint}")


def build_model(arch: str, encoder: str, encoder_weights: str | None = "none", classes: int = NUM_CLASSES,
                in_channels: int = 1):
    """Create an smp model.

    Args:
        arch: architecture name (see :func:`architectures`).
        encoder: smp or timm encoder name.
        encoder_weights: ``imagenet`` (downloads), ``none``, or a local ``.pth``/``.pt``/``.safetensors``
            file with the encoder's weights (timm or smp key names), for machines without network.

    Returns:
        ``torch.nn.Module`` mapping ``(N, in_channels, H, W)`` to logits ``(N, classes, H, W)``.
    """
    import segmentation_models_pytorch as smp

    arch_key, encoder_key = resolve_arch(arch), resolve_encoder(encoder)
    weights = (encoder_weights or "none").lower() if not _is_path(encoder_weights) else "path"
    try:
        model = smp.create_model(arch_key, encoder_name=encoder_key,
                                 encoder_weights="imagenet" if weights == "imagenet" else None,
                                 in_channels=in_channels, classes=classes)
    except HandsegError:
        raise
    except (OSError, ConnectionError, RuntimeError, ValueError, KeyError) as e:
        text = str(e)
        if weights == "imagenet" and any(w in text.lower() for w in ("connect", "resolve", "network", "offline",
                                                                       "download", "url", "http")):
            raise HandsegError(f"cannot download imagenet weights for {encoder} ({text.splitlines()[0][:120]}); "
                               "on a machine without network pass --encoder-weights PATH") from None
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise HandsegError(f"cannot build {arch_key} with encoder {encoder_key}: {first}") from None
    if weights == "path":
        load_encoder_weights(model, Path(str(encoder_weights)))
    _prior_bias(model)
    return model


def _prior_bias(model, prior: float = 0.01) -> None:
    """Start the head at p = 1% rather than 50%: each bone covers about 1% of an image, so training
    does not first have to unlearn "everything is bone" (the focal-loss prior initialisation)."""
    import math

    import torch

    head = getattr(model, "segmentation_head", None)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)] if head is not None else []
    if convs and convs[-1].bias is not None:
        with torch.no_grad():
            convs[-1].bias.fill_(math.log(prior / (1 - prior)))


def _is_path(value: str | None) -> bool:
    return value is not None and value.lower() not in ("imagenet", "none", "") and (
        "/" in value or "\\" in value or value.endswith((".pth", ".pt", ".bin", ".safetensors")))


def read_state_dict(path: Path) -> dict:
    """A state dict from ``.safetensors`` or a torch file (``{"state_dict": ...}`` wrappers unwrapped)."""
    import torch

    if not path.is_file():
        raise HandsegError("weights file not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HandsegError(f"cannot read weights ({type(e).__name__}: {str(e)[:160]})", path) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise HandsegError("weights file holds no state dict", path)
    return state


def load_encoder_weights(model, path: Path) -> None:
    """Load a local encoder checkpoint into ``model.encoder`` (timm or smp key names).

    Raises:
        HandsegError: fewer than half of the encoder's tensors find a match.
    """
    import torch

    state = read_state_dict(path)
    target = model.encoder.model if hasattr(model.encoder, "model") else model.encoder
    own = target.state_dict()
    matched = {}
    for key, value in state.items():
        for candidate in (key, key.removeprefix("encoder."), key.removeprefix("model."), key.removeprefix("module.")):
            if candidate in own:
                want = own[candidate]
                if value.shape != want.shape and value.ndim == 4 and want.shape[1] == 1 and value.shape[1] == 3:
                    value = value.sum(dim=1, keepdim=True)  # RGB filters -> one grayscale filter
                if value.shape == want.shape:
                    matched[candidate] = value.to(want.dtype)
                break
    if len(matched) < max(1, len(own) // 2):
        raise HandsegError(f"weights do not fit encoder: {len(matched)} of {len(own)} tensors matched", path)
    with torch.no_grad():
        target.load_state_dict(matched, strict=False)
