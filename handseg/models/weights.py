"""Foreign encoder weights: local timm/smp state dicts matched, resampled and loaded into an encoder."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from handseg.common.errors import HandsegError
from handseg.models.plan import _is_timm_model, model_plan


def _is_path(value: str | None) -> bool:
    return value is not None and value.lower() not in ("imagenet", "none", "") and (
        "/" in value or "\\" in value or value.endswith((".pth", ".pt", ".bin", ".safetensors")))


# ----------------------------------------------------------------------------------------------
# local weights


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
    """Load a local encoder checkpoint into ``model.encoder`` (timm or smp key names, any input size).

    Raises:
        HandsegError: the file cannot be read, fewer than half of the encoder's tensors find a
            match, or a matching tensor cannot be resized to the encoder's shape.
    """
    state = read_state_dict(path)
    try:
        load_encoder_state(model, state, "weights")
    except HandsegError as e:
        raise HandsegError(str(e), path) from None


def load_encoder_state(model, state: dict, what: str = "weights") -> tuple[int, int]:
    """Copy a state dict into ``model.encoder``, resizing what was made for another input size.

    Keys may be timm's (a whole timm model, as timm publishes them, or the original repository's
    layout), smp's (``encoder.`` / ``model.`` prefixes, feature-extractor names like ``layers_0``) or
    the encoder's own. For timm encoders the model family's own checkpoint filter runs first when it
    matches more (it converts original layouts and resamples what it knows); then RGB first
    convolutions are summed to one channel,
    absolute position tables are resampled to the new token grid and relative position bias tables
    to the new window.

    Returns:
        ``(matched, total)`` tensors of the encoder.

    Raises:
        HandsegError: fewer than half of the encoder's tensors match, or one cannot be resized.
    """
    import torch

    target = model.encoder.model if hasattr(model.encoder, "model") else model.encoder
    own = target.state_dict()
    index = {}
    for k in own:
        index.setdefault(k, k)
        index.setdefault(k.removeprefix("model."), k)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    matched = _match(state, index)
    name = getattr(model.encoder, "name", None) if hasattr(model.encoder, "model") else None
    if name and _is_timm_model(name):
        # the family's filter knows original-repository layouts (Swin's shifted downsample layers, ...);
        # an smp-layout state makes it fail or match less, and is then taken as it is
        filtered = _timm_filter(model, name, state)
        if filtered is not None:
            again = _match(filtered, index)
            matched = again if len(again) >= len(matched) else matched
    if len(matched) < max(1, len(own) // 2):
        raise HandsegError(f"{what} do not fit encoder: {len(matched)} of {len(own)} tensors matched")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's table interpolation warns about torch indexing style
        fitted = {k: _fit(k, v, own[k], what) for k, v in matched.items()}
    with torch.no_grad():
        target.load_state_dict(fitted, strict=False)
    return len(fitted), len(own)


def _match(state: dict, index: dict) -> dict:
    """``{encoder key: tensor}`` for the state's keys that name an encoder tensor."""
    out = {}
    for key, value in state.items():
        for candidate in _key_forms(key):
            if candidate in index:
                out.setdefault(index[candidate], value)
                break
    return out


def _key_forms(key: str):
    """A key as the encoder may spell it: wrapper prefixes dropped, and with timm's feature-extractor
    flattening (``layers.0.blocks`` -> ``layers_0.blocks``)."""
    bases = [key]
    for prefix in ("module.", "encoder.", "model."):
        bases += [b.removeprefix(prefix) for b in bases if b.startswith(prefix)]
    for b in bases:
        yield b
        if b.count(".") >= 2:
            yield b.replace(".", "_", 1)


def _timm_filter(model, timm_name: str, state: dict) -> dict | None:
    """The state through its timm family's ``checkpoint_filter_fn`` (against a meta-device copy of the
    full timm model with this encoder's options), or ``None`` when the family has none or it fails."""
    import inspect

    import timm
    import torch

    module = inspect.getmodule(timm.models.model_entrypoint(timm_name.split(".")[0]))
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    plan = model_plan(model)
    if filter_fn is None:
        return None
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            # RGB like the checkpoint, the input size like the encoder: the filter sizes tables to it
            full = timm.create_model(timm_name, num_classes=0, **(plan.encoder_kwargs if plan else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's table interpolation warns about torch indexing style
            return filter_fn(dict(state), full)
    except Exception:  # noqa: BLE001 - a foreign layout: matched by name only
        return None


def _fit(key: str, value, want, what: str):
    """``value`` shaped like ``want``: an RGB first convolution summed to grayscale, position tables
    resampled; anything else must already fit.

    Raises:
        HandsegError: the shapes differ in a way none of these explain.
    """
    import torch.nn.functional as F

    if value.shape == want.shape:
        return value.to(want.dtype)
    out = None
    leaf = key.rsplit(".", 1)[-1]
    if value.ndim == 4 and want.ndim == 4 and want.shape[1] == 1 and value.shape[1] == 3 and \
            value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
        out = value.sum(dim=1, keepdim=True)  # RGB filters -> one grayscale filter
    elif value.ndim == 4 and want.ndim == 4 and value.shape[1] in (1, 3) and want.shape[1] > 3 and \
            value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
        # a cascade's stage 2 (one X-ray channel, then stage 1's maps) from weights made for the X-ray
        # alone (e.g. its stage-1 checkpoint): the X-ray filters as they are, the context's start at zero
        import torch

        image = _fit(key, value, want[:, :1], what)
        out = torch.cat([image, image.new_zeros((want.shape[0], want.shape[1] - 1, *want.shape[2:]))], dim=1)
    elif "pos_embed" in leaf and value.ndim == 3 and want.ndim == 3 and value.shape[2] == want.shape[2]:
        out = _resample_tokens(value, want.shape[1])  # (1, prefix + H*W, C)
    elif "pos_embed" in leaf and value.ndim == 4 and want.ndim == 4 and value.shape[:2] == want.shape[:2]:
        out = F.interpolate(value.float(), size=tuple(want.shape[2:]), mode="bicubic", align_corners=False)
    elif leaf == "relative_position_bias_table" and value.ndim == 2 and want.ndim == 2 and \
            value.shape[1] == want.shape[1]:
        from timm.layers import resize_rel_pos_bias_table

        side = math.isqrt(want.shape[0])
        if side * side == want.shape[0] and side % 2:
            window = (side + 1) // 2
            out = resize_rel_pos_bias_table(value.float(), new_window_size=(window, window),
                                            new_bias_shape=tuple(want.shape))
    if out is None or out.shape != want.shape:
        raise HandsegError(f"{what}: {key} has shape {tuple(value.shape)} but this encoder needs "
                           f"{tuple(want.shape)}, and handseg cannot resize it")
    return out.to(want.dtype)


def _resample_tokens(value, tokens: int):
    """A ``(1, prefix + h*w, C)`` position table resampled to ``tokens`` entries of a square grid."""
    from timm.layers import resample_abs_pos_embed

    for prefix in range(0, 9):  # class / register tokens come first
        old, new = value.shape[1] - prefix, tokens - prefix
        if old > 0 and new > 0 and math.isqrt(old) ** 2 == old and math.isqrt(new) ** 2 == new:
            side = math.isqrt(new)
            return resample_abs_pos_embed(value.float(), new_size=[side, side], num_prefix_tokens=prefix)
    return None
