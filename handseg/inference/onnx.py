"""ONNX graphs of checkpoints (``handseg export --format onnx``) and an onnxruntime model behind the
same call as a torch model, so :class:`~handseg.inference.predictor.Predictor` runs them through the
same pre- and post-processing (resizes, sliding windows, TTA, fold means, thresholds).

A graph takes ``(batch, C, H, W)`` float32 inputs (normalised as the card says; a cascade's stage 2
with its 29 context channels) and gives ``(batch, 29, H, W)`` logits. Batch is dynamic; so are height
and width for encoders that take any multiple of their stride (TTA scales), and fixed at the model's
size for encoders built for one size. onnxruntime is an optional extra: ``pip install 'handseg[onnx]'``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from handseg.common.errors import HandsegError
from handseg.common.notices import notice
from handseg.models.checkpoint import ModelCard, load_checkpoint
from handseg.models.plan import PLAN_ATTR, ModelPlan, model_plan

OPSET = 17
ONNX_NAME = "best.onnx"
EXTRA = "onnxruntime is not installed; ONNX models need the optional extra: pip install 'handseg[onnx]'"


def export_onnx(checkpoint: Path) -> tuple[bytes, dict]:
    """The ONNX graph of a checkpoint and what the index says of it: ``{"opset", "input", "dynamic"}``.

    Raises:
        HandsegError: an operator the ONNX exporter cannot write (named), or the exporter missing.
    """
    import torch

    model, card = load_checkpoint(checkpoint, "cpu")
    plan = model_plan(model)
    side = card.crop or (plan.run_side(card.size) if plan is not None else card.size)
    fixed = bool(plan is not None and plan.fixed)
    axes = {0: "batch"} if fixed else {0: "batch", 2: "height", 3: "width"}
    x = torch.zeros(1, card.in_channels, side, side)
    buf = io.BytesIO()
    try:
        torch.onnx.export(model, (x,), buf, input_names=["image"], output_names=["logits"], opset_version=OPSET,
                          dynamic_axes={"image": axes, "logits": axes}, dynamo=False)
    except ImportError as e:
        raise HandsegError(f"cannot export ONNX here ({e}); pip install 'handseg[onnx]'", checkpoint) from None
    except Exception as e:  # the exporter names the operator it cannot write
        if type(e).__module__.startswith("torch.onnx") or "ONNX" in str(e) or "onnx" in str(e):
            raise HandsegError(f"cannot export to ONNX: {' '.join(str(e).split())[:300]}", checkpoint) from None
        raise
    return buf.getvalue(), {"opset": OPSET, "input": [None, card.in_channels, None if not fixed else side,
                                                      None if not fixed else side], "dynamic": not fixed}


def onnxruntime():
    """The onnxruntime module, or one line naming the extra that installs it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise HandsegError(EXTRA) from None
    return ort


class OnnxModel:
    """An onnxruntime session called like the torch model it was exported from: a ``(B, C, H, W)`` float
    tensor in, ``(B, K, H, W)`` float32 logits out on the input's device. Carries the model's plan, so
    :func:`~handseg.inference.predictor.run_side` picks the same input sizes."""

    def __init__(self, path: Path, card: ModelCard, device: str = "cpu", threads: int | None = None):
        ort = onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.split(":")[1]) if ":" in device
                                                           else 0}))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own types for a bad graph
            raise HandsegError(f"onnxruntime cannot load the graph ({' '.join(str(e).split())[:200]})", path) from None
        self.card = card
        if card.plan:
            setattr(self, PLAN_ATTR, ModelPlan.from_dict(card.plan))
        self.provider = self.session.get_providers()[0]

    def __call__(self, x):
        import torch

        array = x.detach().float().cpu().numpy()
        out = self.session.run(["logits"], {"image": np.ascontiguousarray(array)})[0]
        return torch.from_numpy(out).to(x.device)


def onnx_beside(checkpoint: Path) -> Path | None:
    """The ONNX graph unpacked beside a checkpoint from a model zip (``NAME/best.onnx``), or None."""
    path = Path(checkpoint).with_name(ONNX_NAME)
    return path if path.is_file() else None


def load_onnx(path: Path, card: ModelCard, device: str, threads: int | None = None) -> OnnxModel:
    model = OnnxModel(path, card, device, threads)
    notice(("onnx", model.provider), f"running the model zip's ONNX graphs with onnxruntime ({model.provider})")
    return model
