"""Training samples are built from the bones' crops and travel bit-packed: checked against the
direct computation on full-size masks."""

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from handseg.data.anatomy import hand_side
from handseg.data.cache import build_cache, find_cache
from handseg.data.labels import load_labels, read_polygons
from handseg.data.layout import discover
from handseg.training.config import TrainConfig
from handseg.training.dataset import (
    Item,
    SegmentationDataset,
    augmenter,
    load_item_crops,
    render_masks,
    unpack_mask_bits,
)


def _unpack(packed: np.ndarray) -> np.ndarray:
    """(S, S, 4) packed -> (29, S, S) bool, with numpy."""
    return np.unpackbits(packed, axis=-1)[..., :29].transpose(2, 0, 1).astype(bool)


def _resized(masks: np.ndarray, size: int) -> np.ndarray:
    return np.stack([cv2.resize(m.view(np.uint8) * np.uint8(255), (size, size), interpolation=cv2.INTER_AREA) > 127
                     for m in masks])


@pytest.fixture(scope="module")
def cached(synth_data, tmp_path_factory):
    import shutil

    train = tmp_path_factory.mktemp("cached") / "train"
    shutil.copytree(synth_data / "train", train)
    build_cache("masks", train, train / "cache")
    build_cache("images", train, train / "cache")
    return train


@pytest.mark.parametrize("size", [64, 96, 128, 160])
def test_render_resized_equals_resizing_full_masks(cached, size):
    """Integer (2x), fractional (4/3) and no resize, and upsampling: every pixel equal."""
    for sample in discover(cached)[:3]:
        image, masks = load_labels(sample)
        for item in (Item(sample, find_cache(cached)), Item(sample, None)):  # from the cache and from JSON
            img, crops = load_item_crops(item)
            assert np.array_equal(img, image)
            got = _unpack(render_masks(crops, image.shape, size=size))
            assert np.array_equal(got, _resized(masks, size))


def test_render_window_equals_slicing_full_masks(cached):
    sample = discover(cached)[0]
    image, masks = load_labels(sample)
    _, crops = load_item_crops(Item(sample, find_cache(cached)))
    for r, c, side in ((0, 0, 64), (37, 51, 64), (100, 90, 64), (0, 0, 160)):  # the last pads past the image
        want = np.zeros((29, side, side), dtype=bool)
        part = masks[:, r : r + side, c : c + side]
        want[:, : part.shape[1], : part.shape[2]] = part
        assert np.array_equal(_unpack(render_masks(crops, image.shape, window=(r, c, side))), want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_unpack_mask_bits_on_tensors(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = np.random.default_rng(0)
    masks = rng.random((3, 29, 8, 8)) < 0.4
    packed = np.packbits(masks.transpose(0, 2, 3, 1), axis=-1)
    got = unpack_mask_bits(torch.from_numpy(packed).to(device))
    assert got.shape == (3, 29, 8, 8) and got.dtype == torch.float32
    assert torch.equal(got.cpu(), torch.from_numpy(masks).float())


@pytest.mark.parametrize("preset", ["light", "default", "strong"])
def test_packed_augmentation_equals_augmenting_29_masks(cached, preset):
    """The same random draws on the packed masks and on the 29 masks give the same result."""
    sample = discover(cached)[1]
    image, masks = load_labels(sample)
    _, crops = load_item_crops(Item(sample, find_cache(cached)))
    packed = render_masks(crops, image.shape, size=128)
    full = np.ascontiguousarray(masks.transpose(1, 2, 0)).view(np.uint8)
    for seed in range(6):
        aug: A.Compose = augmenter(preset, unify_hands=False)
        aug.set_random_seed(seed)
        a = aug(image=image, mask=packed)
        aug.set_random_seed(seed)
        b = aug(image=image, mask=full)
        assert np.array_equal(a["image"], b["image"])
        assert np.array_equal(_unpack(a["mask"]), b["mask"].transpose(2, 0, 1).astype(bool)), (preset, seed)


def test_dataset_unify_hands_mirrors_left_hands(cached):
    cfg = TrainConfig(size=128, augment="none", unify_hands=True)
    samples = discover(cached)
    ds = SegmentationDataset([Item(s, find_cache(cached)) for s in samples], cfg)
    sides = []
    for i, s in enumerate(samples):
        image, masks = load_labels(s)
        side = hand_side(polygons=read_polygons(s.label_path))
        assert hand_side(crops=load_item_crops(ds.items[i])[1]) == side
        sides.append(side)
        x, y = ds[i]
        want = masks[:, :, ::-1] if side == "left" else masks
        assert np.array_equal(_unpack(y.numpy()), want)
        assert hand_side(masks=_unpack(y.numpy())) == "right"
    assert "left" in sides and "right" in sides


@pytest.mark.parametrize("crop", [None, 64])
def test_dataset_input_is_predicts_input_of_the_preprocessed_image(cached, crop):
    """--preprocess: a training sample's image channel is what predict feeds the network (CLAHE on the full
    image, then the resize or the window), by an independent computation with OpenCV."""
    from handseg.data.images import read_image, resize_image
    from handseg.models.plan import DEFAULT_NORM

    cfg = TrainConfig(size=128, crop=crop, augment="none", preprocess="clahe:3:4")
    samples = discover(cached)
    ds = SegmentationDataset([Item(s, find_cache(cached)) for s in samples[:1]], cfg)
    x, _ = ds[0]
    image = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(read_image(samples[0].image_path))
    if crop is None:
        want = resize_image(image, (128, 128))
    else:  # the sample's window: find it by matching the CLAHE image (the plain image would not match)
        side = crop
        windows = {(r, c): image[r : r + side, c : c + side] for r in range(image.shape[0] - side + 1)
                   for c in range(image.shape[1] - side + 1)}
        got = np.round(x[0].numpy() * DEFAULT_NORM["std"] * 255 + DEFAULT_NORM["mean"] * 255).astype(np.uint8)
        assert any(np.array_equal(got, w) for w in windows.values())
        return
    expected = (torch.from_numpy(want).float() / 255 - DEFAULT_NORM["mean"]) / DEFAULT_NORM["std"]
    assert torch.allclose(x[0], expected, atol=1e-6)
