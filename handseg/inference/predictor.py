"""Inference: from X-rays to per-class probabilities at each image's own size.

A model trained on resized images sees each image resized to its size by
:func:`~handseg.data.images.resize_image` (the resize training used), several images per forward
pass, and its logits are resized back bilinearly (the leaderboard's convention) before the sigmoid.
A model trained on crops runs as a sliding window over the full image with Gaussian blending.

Test-time transforms (ttach flips and input-size scales) are merged in place, one map at a time.
With ``unify_hands`` a model knows right hands only: the side is decided once, from the identity
pass on the unflipped image; a left hand is mirrored, every transform runs on the mirrored image,
and the result is mirrored back. A horizontal flip would show such a model a left hand, so hflip
passes run unflipped for it. Several checkpoints are averaged in probability space.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from handseg.common.constants import CLASS_INDEX, DEFAULT_THRESHOLD
from handseg.common.errors import HandsegError
from handseg.common.notices import notice
from handseg.common.threads import recorded as recorded_threads
from handseg.data.anatomy import side_of
from handseg.data.images import resize_image
from handseg.data.preprocess import preprocess_image
from handseg.data.roi import Bounds, Box, cut_box, mask_bounds, overlap, roi_box, roi_label
from handseg.ensemble.masks import largest_component, level_cuts
from handseg.formats.probs import quantise_probs
from handseg.formats.rle import mask_to_runs
from handseg.formats.tta import IDENTITY, MERGES, Transform, parse_transforms, tta_option
from handseg.inference.onnx import load_onnx, onnx_beside
from handseg.inference.runtime import apply_threads, pick_device, resolve_amp
from handseg.inference.tta import _ttach_flip
from handseg.inference.windows import sliding_window_logits
from handseg.models.checkpoint import ModelCard, load_checkpoint, read_card, resolve_checkpoint
from handseg.models.context import CONTEXT_CHANNELS, resolve_context
from handseg.models.plan import model_plan


def to_input(images, card: ModelCard, device: str):
    """``(H, W)`` or ``(B, H, W)`` uint8 (numpy or tensor) -> normalised ``(B, C, H, W)`` float on ``device``
    (``C``: the model's image channels; a cascade's context channels are added by the caller)."""
    import torch

    if not isinstance(images, torch.Tensor):
        array = np.asarray(images)
        images = torch.from_numpy(array if array.flags.writeable else array.copy())
    x = images
    x = x.to(device, non_blocking=True)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    x = x.float().div_(255.0).sub_(card.norm["mean"]).div_(card.norm["std"])

    channels = card.in_channels - (CONTEXT_CHANNELS if card.context else 0)
    return x.unsqueeze(1).expand(-1, channels, -1, -1)


def pad_values(card: ModelCard) -> list[float]:
    """What lies beyond an image's edge, per input channel, as training's crops had it: a black pixel
    (uint8 0, normalised) in the image channels and 0 in a cascade's context channels (see
    :class:`~handseg.training.dataset.SegmentationDataset` and :func:`~handseg.inference.cascade.render_context`)."""
    channels = card.in_channels - (CONTEXT_CHANNELS if card.context else 0)
    black = (0.0 - card.norm["mean"]) / card.norm["std"]
    return [black] * channels + [0.0] * (card.in_channels - channels)


def input_size(card: ModelCard, scale: float = 1.0) -> int:
    """The side a resize model is run at: its training size times ``scale``, on a multiple of 32."""
    return max(32, int(round(card.size * scale / 32.0)) * 32)


def run_side(model, card: ModelCard, scale: float = 1.0) -> int:
    """The side a resize model runs at for a TTA ``scale``: the nearest its encoder takes (a multiple
    of its stride, and only its own size for encoders built for one size; see
    :class:`~handseg.models.plan.ModelPlan`)."""

    plan = model_plan(model)
    return input_size(card, scale) if plan is None else plan.run_side(card.size * scale)


@dataclass
class Predictor:
    """One or more checkpoints ready to predict; probabilities are averaged over them.

    Example:
        >>> predictor = Predictor.load(["runs/fold0", "runs/fold1"], device="cuda")
        >>> merged = predictor.predict([image_a, image_b], [IDENTITY, Transform("hflip", flip="hflip")])
        >>> merged[0].shape          # (29, H_a, W_a) probabilities on the device
    """

    models: list
    cards: list[ModelCard]
    device: str
    dtype: object = None
    batch: int = 4
    """Network inputs per forward pass: whole resized images, or windows of crop-trained models."""
    stage1: dict = field(default_factory=dict)
    """A cascade's stage 1 (see :mod:`handseg.inference.cascade`): the stage-1 :class:`Predictor` of each
    model that takes context, by model index; models with the same stage 1 share one."""

    @classmethod
    def load(cls, paths, device: str = "auto", amp: bool = True, batch: int = 4) -> Predictor:
        import torch


        device = pick_device(device)
        if recorded_threads() is None:  # training decided them already (with its workers)
            apply_threads(device)
        models, cards, stage1, shared = [], [], {}, {}
        for p in paths:
            graph = onnx_beside(resolve_checkpoint(p))
            if graph is not None:  # a model zip exported with --format onnx: onnxruntime runs it
                card = read_card(resolve_checkpoint(p))
                model = load_onnx(graph, card, device, (recorded_threads() or {}).get("intra_op"))
            else:
                model, card = load_checkpoint(p, device)
            if device.startswith("cuda") and graph is None:
                model = model.to(memory_format=torch.channels_last)
            if card.context:

                refs = tuple(str(q.resolve()) for q in resolve_context(card.context, resolve_checkpoint(p),
                                                                       card.context_sha256))
                if refs not in shared:
                    shared[refs] = cls.load(list(refs), device, amp, batch)
                stage1[len(models)] = shared[refs]
            models.append(model)
            cards.append(card)
        classes = {tuple(c.classes) for c in cards}
        if len(classes) > 1:
            raise HandsegError("checkpoints predict different class lists; they cannot be averaged")
        return cls(models, cards, device, resolve_amp("auto" if amp else "off", device), batch, stage1)

    @property
    def thresholds(self) -> np.ndarray:
        """Per-class thresholds: the mean of the checkpoints' own (of each class's models, with ROI models)."""
        counted = self.class_models()
        if counted is None:
            return np.mean([c.thresholds for c in self.cards], axis=0)
        own = np.array([c.thresholds for c in self.cards], dtype=np.float64)
        made = counted.sum(axis=0)
        # a class no model makes is empty at any threshold: the plain mean keeps the value in range
        return np.where(made > 0, (own * counted).sum(axis=0) / made.clip(min=1), own.mean(axis=0))

    def class_models(self) -> np.ndarray | None:
        """Which models make each class: ``(models, classes)`` float 0/1, or None when every model makes every
        class (no ROI model). A ROI model (``train --roi``) replaces the other models in its classes: a class
        that ROI models predict comes from them alone (their mean), every other class from the whole-image
        models. A class no model makes stays empty (``predict`` says so: :func:`say_roi`)."""
        if not any(c.roi for c in self.cards):
            return None
        k = len(self.cards[0].classes)
        counted = np.zeros((len(self.cards), k), dtype=np.float32)
        by_roi = np.zeros(k, dtype=bool)
        for m, card in enumerate(self.cards):
            if card.roi:
                counted[m, card.predicted] = 1.0
                by_roi[card.predicted] = True
        for m, card in enumerate(self.cards):
            if not card.roi:
                counted[m, ~by_roi] = 1.0
        return counted

    def probs(self, image: np.ndarray, transform: Transform = IDENTITY):
        """One image, one transform: ``(K, H, W)`` probabilities on the device."""
        return self.predict([image], [transform])[0]

    def predict(self, images: list[np.ndarray], transforms: list[Transform] | None = None, merge: str = "mean",
                on_transform=None, contexts: list | None = None) -> list:
        """``(H, W)`` uint8 images -> ``(K, H, W)`` float probabilities per image (tensors on the
        device, each at its image's size), averaged over the checkpoints and merged over the transforms.

        Args:
            transforms: test-time transforms (default: the identity alone).
            merge: ``mean``, ``gmean`` (geometric mean) or ``max`` over the transforms.
            on_transform: called as ``on_transform(transform, probs)`` with each transform's maps
                (a list, one per image) before they are merged, e.g. to score each transform alone.
            contexts: for cascade models, each image's stage-1 maps as ``(29, H, W)`` uint8 (e.g. the
                out-of-fold maps during training); by default stage 1 runs here, once per image.
        """
        import torch

        if merge not in MERGES:
            raise HandsegError(f"unknown --merge {merge!r}; valid: {', '.join(MERGES)}")
        transforms = list(transforms or [IDENTITY])
        n, k = len(images), len(transforms)
        mirror: dict[int, list[bool]] = {}
        merged: list = [None] * n
        with torch.inference_mode():
            context = self._contexts(images, contexts)
            counted = self.class_models()
            for t in transforms:
                per_model = None
                for m in range(len(self.models)):
                    probs = self._model_probs(m, images, t, mirror, context.get(m))
                    if counted is not None:  # ROI models: each model adds the classes it counts for
                        mask = torch.as_tensor(counted[m], device=self.device).view(-1, 1, 1)
                        probs = [p.mul_(mask) for p in probs]
                    if per_model is None:
                        per_model = probs
                    else:
                        for i in range(n):
                            per_model[i].add_(probs[i])
                if counted is not None:
                    count = torch.as_tensor(counted.sum(axis=0).clip(min=1), device=self.device).view(-1, 1, 1)
                    for p in per_model:
                        p.div_(count)
                elif len(self.models) > 1:
                    for p in per_model:
                        p.div_(len(self.models))
                if on_transform is not None:
                    on_transform(t, per_model)
                for i, p in enumerate(per_model):
                    if merge == "gmean":
                        p = p.clamp_min_(1e-6).log_()
                    if merged[i] is None:
                        merged[i] = p
                    elif merge == "max":
                        torch.maximum(merged[i], p, out=merged[i])
                    else:
                        merged[i].add_(p)
            if merge != "max" and k > 1:
                for p in merged:
                    p.div_(k)
            if merge == "gmean":
                for p in merged:
                    p.exp_()
        return merged

    def _contexts(self, images: list[np.ndarray], given: list | None) -> dict[int, list]:
        """Each cascade model's context per image, as ``(29, H, W)`` float tensors on the device holding
        p after the uint8 quantisation (what stage 2 was trained on); stage 1 runs once per image and
        stage-1 set."""
        import torch


        out, done = {}, {}
        for m, card in enumerate(self.cards):
            if not card.context:
                continue
            if given is not None:
                out[m] = [torch.as_tensor(np.asarray(c), device=self.device).float().div_(255.0) for c in given]
                continue
            stage1 = self.stage1.get(m)
            if stage1 is None:
                raise HandsegError("a cascade model needs its stage-1 maps (load it with Predictor.load)")
            tta = tuple(card.context_tta or ["identity"])  # as the stage-1 maps of training were made
            if (id(stage1), tta) not in done:
                done[id(stage1), tta] = [quantise_probs(p).float().div_(255.0)
                                         for p in stage1.predict(images, parse_transforms(tta_option(tta)))]
            out[m] = done[id(stage1), tta]
        return out

    def _model_probs(self, m: int, images: list[np.ndarray], t: Transform, mirror: dict[int, list[bool]],
                     context: list | None = None) -> list:
        """One model's probabilities for one transform. With ``unify_hands`` the side of each image is
        decided once per model, from the identity pass on the unflipped image (kept in ``mirror``)."""
        import torch

        model, card = self.models[m], self.cards[m]
        if not card.unify_hands:
            return self._run(model, card, images, t, context)
        if t.flip == "hflip":
            # the model sees every hand mirrored to a right hand; a horizontal flip would show it a
            # left one, which it never learned: the pass runs unflipped (scales still apply)

            notice("unify-hflip", "hflip TTA is not applied to --unify-hands models: they see every hand as a "
                                  "right hand, and a flip would show them a left one")
            t = Transform(t.name, None, t.scale)
        out: list = [None] * len(images)
        if m not in mirror and card.roi:
            # a ROI model's own maps hold no fingers: the side comes from stage 1's maps of the whole hand
            mirror[m] = [_is_left_hand(c) for c in context]
        if m not in mirror:
            first = self._run(model, card, images, IDENTITY, context)
            mirror[m] = [_is_left_hand(p) for p in first]
            if t.is_identity:
                out = [None if left else p for p, left in zip(first, mirror[m])]
            del first
        todo = [i for i in range(len(images)) if out[i] is None]
        if todo:
            inputs = [np.ascontiguousarray(images[i][:, ::-1]) if mirror[m][i] else images[i] for i in todo]
            ctx = None if context is None else [torch.flip(context[i], dims=[-1]) if mirror[m][i] else context[i]
                                                for i in todo]
            for i, p in zip(todo, self._run(model, card, inputs, t, ctx)):
                out[i] = torch.flip(p, dims=[-1]) if mirror[m][i] else p
        return out

    def _run(self, model, card: ModelCard, images: list[np.ndarray], t: Transform, context: list | None = None
             ) -> list:
        """Probabilities of one model for one transform, per image: batched resizes, or sliding windows
        (a cascade's stage 2: over the image and its stage-1 ``context``, ``(29, H, W)`` tensors)."""
        import torch
        import torch.nn.functional as F


        flip = _ttach_flip(t.flip) if t.flip else None
        out = []
        # the card's fixed pre-processing (train --preprocess) on the full-resolution image, as in training
        images = [preprocess_image(image, card.preprocess) for image in images]
        if card.crop:
            for i, image in enumerate(images):
                h, w = image.shape
                scaled = image if t.scale == 1.0 else resize_image(image, (max(1, round(h * t.scale)),
                                                                            max(1, round(w * t.scale))))
                x = to_input(scaled, card, self.device)
                if card.context:
                    ctx = context[i].unsqueeze(0)
                    if ctx.shape[-2:] != x.shape[-2:]:
                        ctx = F.interpolate(ctx, size=x.shape[-2:], mode="bilinear", align_corners=False)
                    x = torch.cat([x, ctx], dim=1)
                if flip is not None:
                    x = flip.apply_aug_image(x, apply=True)
                logits = sliding_window_logits(model, x, card.crop, batch=self.batch, dtype=self.dtype,
                                               pad=pad_values(card))
                if flip is not None:
                    logits = flip.apply_deaug_mask(logits, apply=True)
                if logits.shape[-2:] != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                out.append(logits[0].sigmoid_())
            return out
        if card.roi:
            return self._run_roi(model, card, images, t, context)
        return self._run_resized(model, card, images, t, context)

    def _run_resized(self, model, card: ModelCard, images: list[np.ndarray], t: Transform, context: list | None = None
                     ) -> list:
        """A resize model's probabilities per image (batched), each at its image's size; a ROI model's
        ``context`` (``(29, h, w)`` tensors of each image) is resized with it."""
        import torch
        import torch.nn.functional as F

        flip = _ttach_flip(t.flip) if t.flip else None
        out = []
        side = run_side(model, card, t.scale)
        for start in range(0, len(images), self.batch):
            chunk = images[start : start + self.batch]
            batch = np.stack([resize_image(im, (side, side)) for im in chunk])
            x = to_input(batch, card, self.device)
            if context is not None:
                ctx = torch.stack([F.interpolate(c.unsqueeze(0), size=(side, side), mode="bilinear",
                                                 align_corners=False)[0] for c in context[start : start + self.batch]])
                x = torch.cat([x, ctx], dim=1)
            if self.device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            if flip is not None:
                x = flip.apply_aug_image(x, apply=True)
            with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = model(x)
            logits = logits.float()
            if flip is not None:
                logits = flip.apply_deaug_mask(logits, apply=True)
            for j, image in enumerate(chunk):
                one = logits[j : j + 1]
                if one.shape[-2:] != image.shape:
                    one = F.interpolate(one, size=image.shape, mode="bilinear", align_corners=False)
                out.append(one[0].sigmoid_())
        return out

    def _run_roi(self, model, card: ModelCard, images: list[np.ndarray], t: Transform, context: list) -> list:
        """A ROI model's probabilities per image at the image's size: the box around its classes in the
        stage-1 ``context`` masks (:func:`~handseg.data.roi.roi_box`, the rule training's label boxes follow),
        cut from the image and the context and run as a resize model; its classes inside the box, 0 elsewhere.
        An image whose stage-1 masks hold none of its classes keeps stage 1's probabilities of them (and
        that is said)."""
        import torch

        own = card.predicted
        cut = level_cuts(DEFAULT_THRESHOLD) / 255.0  # the one cut rule, on the stage-1 levels the context holds
        boxes, cuts, ctxs = [], [], []
        for image, ctx in zip(images, context):
            bounds = stage1_bounds(ctx[own] > cut)
            box = None if bounds is None else roi_box(bounds, card.roi_margin)
            boxes.append(box)
            if box is not None:
                cuts.append(cut_box(image, box))
                ctxs.append(_cut_tensor_box(ctx, box))
        found = iter(self._run_resized(model, card, cuts, t, ctxs) if cuts else [])
        out = []
        for image, ctx, box in zip(images, context, boxes):
            full = torch.zeros((len(card.classes), *image.shape), dtype=torch.float32, device=self.device)
            if box is None:
                notice(("roi-no-box", tuple(card.roi)), f"stage 1 found none of the ROI model's classes "
                       f"({', '.join(card.roi)}) in an image: there they are stage 1's own probabilities")
                full[own] = ctx[own].float()
            else:
                probs, where = next(found), overlap(box, image.shape)
                ir, ic, br, bc = where
                full[own, ir, ic] = probs[own][:, br, bc]
            out.append(full)
        return out


def stage1_bounds(masks) -> Bounds | None:
    """The extent a ROI box is drawn around at prediction: the union of each class's largest 8-connected
    component in stage 1's ``(k, H, W)`` bool masks (a tensor), so that a stray pixel far from the bones
    does not stretch the box beyond what training's label boxes look like; None when every mask is empty."""
    found = []
    for mask in masks:
        rows, cols = mask.any(dim=1).cpu().numpy(), mask.any(dim=0).cpu().numpy()
        extent = mask_bounds(rows, cols)
        if extent is None:
            continue
        r0, r1, c0, c1 = extent
        part = largest_component(mask[r0:r1, c0:c1].cpu().numpy())
        i0, i1, j0, j1 = mask_bounds(part.any(axis=1), part.any(axis=0))
        found.append((r0 + i0, r0 + i1, c0 + j0, c0 + j1))
    if not found:
        return None
    return (min(b[0] for b in found), max(b[1] for b in found), min(b[2] for b in found), max(b[3] for b in found))


def say_roi(cards: list[ModelCard], names: list[str]) -> str | None:
    """What ``predict`` says when ROI models are among its models: which classes they replace, or that only
    ROI models were given, so that the other classes stay empty. None without ROI models."""
    roi = [(name, card) for name, card in zip(names, cards) if card.roi]
    if not roi:
        return None
    if len(roi) == len(cards):
        made = sorted({c for _, card in roi for c in card.roi})
        return (f"only ROI models were given: they predict {len(made)} classes ({roi_label(made)}); the other "
                f"{len(cards[0].classes) - len(made)} classes stay empty (give a whole-hand model beside them)")
    return "; ".join(f"{name} predicts {roi_label(card.roi)} in place of the other models" for name, card in roi)


def _cut_tensor_box(tensor, box: Box):
    """The box of a ``(C, H, W)`` tensor, 0 beyond the image's edge (as :func:`~handseg.data.roi.cut_box`)."""
    import torch

    out = torch.zeros((tensor.shape[0], box[2], box[2]), dtype=tensor.dtype, device=tensor.device)
    where = overlap(box, tuple(tensor.shape[-2:]))
    if where is not None:
        ir, ic, br, bc = where
        out[:, br, bc] = tensor[:, ir, ic]
    return out


def _is_left_hand(probs) -> bool:
    """:func:`~handseg.data.anatomy.hand_side` of a prediction, on its device: the thumb tip (finger-1)
    right of the little-finger tip (finger-16). Only two numbers cross to the host."""
    import torch


    masks = probs[[CLASS_INDEX["finger-1"], CLASS_INDEX["finger-16"]]] > 0.5
    cols = masks.sum(dim=1, dtype=torch.float64)  # (2, W) pixels per column
    counts = cols.sum(dim=1)
    if bool((counts == 0).any()):
        return False
    xs = torch.arange(cols.shape[1], dtype=torch.float64, device=cols.device)
    thumb_x, little_x = ((cols @ xs) / counts).tolist()
    return side_of(thumb_x, little_x) == "left"


def masks_to_runs(masks) -> list:
    """Runs (see :mod:`handseg.formats.rle`) of each ``(K, H, W)`` bool mask of a tensor, computed where
    the tensor lives: on a GPU only the run boundaries are copied to the host. Equal to
    :func:`~handseg.formats.rle.mask_to_runs` of each mask."""

    if masks.device.type == "cpu":  # on the host, the bounding-box runs of each mask are ~20x faster at 2048 px
        return [mask_to_runs(m) for m in masks.numpy()]
    return tensor_runs(masks)


def tensor_runs(masks) -> list:
    """:func:`masks_to_runs` computed with torch where the tensor lives (what a GPU runs)."""
    import torch

    k = masks.shape[0]
    flat = masks.reshape(k, -1)
    edge = torch.zeros((k, 1), dtype=torch.bool, device=flat.device)
    padded = torch.cat([edge, flat, edge], dim=1)
    # a change between neighbours is a run's first pixel or one past its last; they alternate
    cls, pos = (padded[:, 1:] != padded[:, :-1]).nonzero(as_tuple=True)
    counts = torch.bincount(cls, minlength=k).cpu().numpy()
    pos = pos.cpu().numpy().astype(np.int64, copy=False)
    runs, offset = [], 0
    for n in counts:
        p = pos[offset : offset + n]
        offset += n
        runs.append((p[0::2], p[1::2] - p[0::2]))
    return runs
