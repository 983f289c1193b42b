"""Building a segmentation_models_pytorch model from an architecture, an encoder and a plan."""

from __future__ import annotations

import math
from pathlib import Path

from handseg.common.constants import NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.models.plan import PLAN_ATTR, ModelPlan, _create, _first_line, plan_model, resolve_arch, resolve_encoder
from handseg.models.weights import _is_path, load_encoder_state, load_encoder_weights

# ----------------------------------------------------------------------------------------------
# building


def build_model(arch: str, encoder: str, encoder_weights: str | None = "none", classes: int = NUM_CLASSES,
                in_channels: int = 1, size: int | None = None, plan: ModelPlan | None = None,
                size_flag: str = "--size"):
    """Create an smp model for ``size`` x ``size`` inputs.

    Args:
        arch: architecture name (see :func:`architectures`).
        encoder: smp or timm encoder name.
        encoder_weights: ``imagenet`` (downloads; smp's own encoders also take their other names,
            e.g. ``ssl``), ``none``, or a local ``.pth``/``.pt``/``.safetensors`` file with the encoder's
            weights (timm or smp key names, made at any input size), for machines without network.
        size: input side the model is built for (the training size or the crop); ``None``: the
            encoder's default. Ignored when ``plan`` is given.
        plan: a :class:`ModelPlan` from a checkpoint card, to rebuild exactly that model.
        size_flag: the option the size came from, for error messages.

    Returns:
        ``torch.nn.Module`` mapping ``(N, in_channels, H, W)`` to logits ``(N, classes, H, W)``, with its
        plan (see :func:`model_plan`).

    Raises:
        HandsegError: the combination cannot run at ``size`` (see :func:`plan_model`), the weights
            cannot be downloaded or do not fit.
    """
    arch_key, encoder_key = resolve_arch(arch), resolve_encoder(encoder)
    plan = plan or plan_model(arch_key, encoder_key, size, in_channels, size_flag)
    weights = (encoder_weights or "none").lower() if not _is_path(encoder_weights) else "path"
    if encoder_key.startswith("tu-") and weights not in ("none", "imagenet", "path"):
        raise HandsegError(f"--encoder-weights {encoder_weights!r}: timm encoders take imagenet, none or a file "
                           f"(a tag in the name picks timm's weights, e.g. {encoder_key[3:]}.<tag>)")
    # timm loads its weights only at the size they were made for when it cannot resize them itself
    # (Hiera's position table); handseg resizes them, as for a local file
    resize_pretrained = (weights == "imagenet" and encoder_key.startswith("tu-")
                         and "img_size" in plan.encoder_kwargs)
    smp_weights = None if weights in ("none", "path") or resize_pretrained else weights  # smp's own: ssl, swsl...
    try:
        model = _create(arch_key, encoder_key, smp_weights, in_channels, classes, plan.encoder_kwargs,
                        plan.arch_kwargs)
        state = _timm_pretrained_state(encoder_key[3:]) if resize_pretrained else None
    except HandsegError:
        raise
    except Exception as e:  # noqa: BLE001 - smp and timm raise anything; the user gets one line
        text = str(e)
        if (smp_weights or resize_pretrained) and any(w in text.lower() for w in (
                "connect", "resolve", "network", "offline", "download", "url", "http")):
            raise HandsegError(f"cannot download {weights} weights for {encoder} ({text.splitlines()[0][:120]}); "
                               "on a machine without network pass --encoder-weights PATH") from None
        raise HandsegError(f"cannot build {arch_key} with encoder {encoder_key}: {_first_line(e)}") from None
    setattr(model, PLAN_ATTR, plan)
    if state is not None:
        load_encoder_state(model, state, f"imagenet weights of {encoder_key}")
    if weights == "path":
        load_encoder_weights(model, Path(str(encoder_weights)))
    _prior_bias(model)
    return model


def _timm_pretrained_state(timm_name: str) -> dict:
    """timm's pretrained weights of a model at the size they were made for (downloads)."""
    import timm

    return timm.create_model(timm_name, pretrained=True, num_classes=0).state_dict()


def _prior_bias(model, prior: float = 0.01) -> None:
    """Start the head at p = 1% rather than 50%: each bone covers about 1% of an image, so training
    does not first have to unlearn "everything is bone" (the focal-loss prior initialisation)."""
    import torch

    head = getattr(model, "segmentation_head", None)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)] if head is not None else []
    if convs and convs[-1].bias is not None:
        with torch.no_grad():
            convs[-1].bias.fill_(math.log(prior / (1 - prior)))
