"""handseg as a library, for notebooks (a Kaggle offline notebook, a radiology pipeline): load a model,
predict arrays or a folder. These names are the documented API; everything else in handseg may change.

Example (a Kaggle notebook with the zip from ``handseg export`` attached as a data set)::

    import handseg.api as hs

    model = hs.load_model("/kaggle/input/my-model/model.zip", device="cuda")
    image = hs.read_image("/kaggle/input/test/DCM/ID001/img.png")    # (H, W) uint8
    masks = model.predict(image)                                      # (29, H, W) bool, in hs.CLASSES order
    probs = model.predict_probs(image)                                # (29, H, W) float32 in [0, 1]
    hs.predict_folder("/kaggle/input/my-model/model.zip", "/kaggle/input/test", "submission.csv")

Like the commands, this module sits above the library in the layers (``pyproject.toml``) and imports
the heavy parts (torch) inside its functions, so ``import handseg.api`` is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from handseg.commands.predict import predict
from handseg.commands.predict import tta as run_tta
from handseg.common.constants import CLASSES
from handseg.common.errors import HandsegError
from handseg.common.notices import notice, reset
from handseg.data.images import read_image as read
from handseg.ensemble.masks import check_thresholds, level_cuts
from handseg.formats.probs import quantise_probs
from handseg.formats.rle import rle_decode as decode
from handseg.formats.rle import rle_encode as encode
from handseg.formats.tta import parse_transforms
from handseg.inference.predictor import Predictor, say_roi
from handseg.models.checkpoint import resolve_checkpoint
from handseg.selection.export import is_model_zip, open_model_zip

__all__ = ["CLASSES", "Model", "load_model", "predict_folder", "read_image", "rle_decode", "rle_encode"]

PathLike = str | Path


class Model:
    """Loaded checkpoints (one, or several folds averaged) ready to predict; made by :func:`load_model`.

    Attributes:
        classes: the 29 class names, in the order of the masks' first axis.
        thresholds: ``(29,)`` float64, the per-class thresholds :meth:`predict` cuts at (the checkpoints'
            own, averaged over them).
        device: where the models run (``cpu``, ``cuda``, ``cuda:N``).
    """

    def __init__(self, predictor, transforms: Sequence) -> None:
        self._predictor = predictor
        self._transforms = list(transforms)
        self.classes: list[str] = list(CLASSES)
        self.thresholds: np.ndarray = np.asarray(predictor.thresholds, dtype=np.float64)
        self.device: str = predictor.device

    def predict_probs(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities of one X-ray.

        Args:
            image: ``(H, W)`` uint8 grey image (as :func:`read_image` returns), any size.

        Returns:
            ``(29, H, W)`` float32 in [0, 1] at the image's own size, averaged over the checkpoints (and
            the test-time transforms given to :func:`load_model`).
        """
        return self._predictor.predict([_grey(image)], self._transforms)[0].float().cpu().numpy()

    def predict(self, image: np.ndarray, thresholds: Sequence[float] | None = None) -> np.ndarray:
        """Masks of one X-ray, as ``handseg predict`` writes them in its CSV: a pixel is in class k's mask
        when its stored level ``round(255 p)`` exceeds ``255 t_k`` (handseg's one cut rule).

        Args:
            image: ``(H, W)`` uint8 grey image, any size.
            thresholds: 29 per-class thresholds in (0, 1) (default: :attr:`thresholds`).

        Returns:
            ``(29, H, W)`` bool; ``masks[k]`` is class ``CLASSES[k]``. Masks may overlap (bones do).
        """
        cuts = level_cuts(check_thresholds(self.thresholds if thresholds is None else thresholds))
        import torch

        level = quantise_probs(self._predictor.predict([_grey(image)], self._transforms)[0])
        # the one cut rule (handseg.ensemble.masks): the stored uint8 level against 255 t, as predict's CSV
        return (level > torch.as_tensor(cuts, dtype=torch.float64, device=level.device).view(-1, 1, 1)).cpu().numpy()

    def predict_rles(self, image: np.ndarray) -> list[str]:
        """The 29 RLE strings of one X-ray's masks (the CSV's ``rle`` column, in :data:`CLASSES` order)."""
        return [rle_encode(m) for m in self.predict(image)]


def load_model(source: PathLike | Sequence[PathLike], device: str = "auto", tta: str = "", amp: bool = True,
               batch: int = 4) -> Model:
    """Load a model to predict arrays with.

    Args:
        source: a run folder (its best checkpoint), a ``.safetensors`` checkpoint, a list of them (averaged,
            e.g. five folds), or a model zip from ``handseg export`` holding checkpoints. A zip holding a
            recipe (``export --recipe``) is applied to folders by :func:`predict_folder`.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        tta: test-time transforms as ``handseg tta --transforms`` takes them (``hflip``, ``hflip,scale:0.8,1.2``);
            ``""`` for none.
        amp: mixed precision on a GPU.
        batch: network inputs per forward pass (windows of crop-trained models).

    Returns:
        A :class:`Model`.

    Raises:
        handseg.common.errors.HandsegError: a missing or malformed checkpoint or zip, a zip with a recipe.
    """
    import contextlib
    import tempfile


    sources = [Path(source)] if isinstance(source, str | Path) else [Path(s) for s in source]
    transforms = parse_transforms(tta)
    zips = [s for s in sources if is_model_zip(s)]
    with contextlib.ExitStack() as stack:
        if zips:
            if len(sources) != 1:
                raise HandsegError("give a model zip alone (it holds every model it needs)")
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="handseg-api-"))
            bundle = stack.enter_context(open_model_zip(zips[0], Path(work)))
            if bundle.recipe is not None:
                raise HandsegError("this model zip holds a recipe: use handseg.api.predict_folder", zips[0])
            sources = bundle.checkpoints
        # the weights are read into memory here, so the unpacked zip can go when the block ends
        predictor = Predictor.load([resolve_checkpoint(s) for s in sources], device=device, amp=amp, batch=batch)
        roi = say_roi(predictor.cards, [bundle.label(s) if zips else str(s) for s in sources])
        if roi:
            notice("roi-models", roi)
    return Model(predictor, transforms)


def predict_folder(model: PathLike | Sequence[PathLike], data: PathLike, out_csv: PathLike, device: str = "auto",
                   tta: str = "", thresholds: Sequence[float] | None = None, overwrite: bool = True) -> Path:
    """Predict every X-ray of a folder into a submission CSV, exactly as ``handseg predict`` does.

    Args:
        model: run folder(s), checkpoint(s), a model zip (checkpoints or a recipe), or a ``recipe.json``.
        data: a folder holding ``DCM/``, a data set's root (its ``test/``), or any folder of PNG/JPEG/DICOM.
        out_csv: the CSV to write (``image_name,class,rle``; 29 rows per image, submission order), with its
            ``.manifest.json`` beside it.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        tta: test-time transforms (``hflip`` ...), as ``handseg tta``; not with a recipe (it sets its own).
        thresholds: 29 per-class thresholds in (0, 1) (default: the checkpoints' own); not with a recipe.
        overwrite: replace an existing ``out_csv`` (a notebook runs its cells again).

    Returns:
        ``out_csv`` as a Path.

    Raises:
        handseg.common.errors.HandsegError: as the command would say it (a missing folder, a bad image ...).
    """
    import json
    import tempfile


    reset()
    models = [Path(model)] if isinstance(model, str | Path) else [Path(m) for m in model]
    out = Path(out_csv)
    with tempfile.TemporaryDirectory(prefix="handseg-api-") as work:
        cut = None
        if thresholds is not None:
            cut = Path(work) / "thresholds.json"  # the command's --thresholds file, checked as the command does
            cut.write_text(json.dumps([float(t) for t in thresholds]))
        if len(models) == 1 and models[0].suffix == ".json":
            predict(None, Path(data), out, recipe=models[0], thresholds=cut, device=device, overwrite=overwrite)
        elif tta:
            run_tta(models, Path(data), out, transforms=tta, thresholds=cut, device=device, overwrite=overwrite)
        else:
            predict(models, Path(data), out, thresholds=cut, device=device, overwrite=overwrite)
    return out


def read_image(path: PathLike) -> np.ndarray:
    """Read an X-ray as handseg does (PNG, JPEG, DICOM; 16-bit scaled to 8 bits): ``(H, W)`` uint8."""

    return read(path)


def rle_encode(mask: np.ndarray) -> str:
    """``(H, W)`` bool mask -> the competition's RLE string (row by row, ``start length`` pairs from 1)."""

    return encode(mask)


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The competition's RLE string -> ``(H, W)`` bool mask of ``shape`` (``""`` is an empty mask)."""

    return decode(rle, shape)


def _grey(image: np.ndarray) -> np.ndarray:
    """An ``(H, W)`` uint8 image, or an error that says what was given."""

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (3, 4):  # a colour array from another reader: its grey values
        import cv2

        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise HandsegError(f"expected an (H, W) uint8 image, got shape {image.shape} and dtype {image.dtype}")
    return image
