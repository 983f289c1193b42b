"""The loss registry against values worked out by hand."""

import math

import pytest
import torch

from handseg.common.errors import HandsegError
from handseg.models.losses import LOSSES, build_loss, parse_loss_spec


def _pair():
    """Two classes on a 1 x 4 image: class 0 has two bone pixels, class 1 one."""
    target = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 1.0]]]])
    return target


def test_a_confident_correct_prediction_costs_nothing_for_the_overlap_losses():
    target = _pair()
    logits = (target * 2 - 1) * 30.0
    for name in ("dice", "jaccard", "tversky", "lovasz", "focal"):
        assert float(LOSSES[name](logits, target)) == pytest.approx(0.0, abs=1e-4), name


def test_dice_at_p_one_half_is_the_smoothed_formula():
    target = _pair()
    logits = torch.zeros_like(target)  # p = 0.5 everywhere
    # smp's soft Dice: (I + s) / (I + FP/2 + FN/2 + s), smooth s = 1
    # class 0: I = 1, FP = 1, FN = 1 -> 1 - 2 / 3;  class 1: I = 0.5, FP = 1.5, FN = 0.5 -> 1 - 1.5 / 2.5
    assert float(LOSSES["dice"](logits, target)) == pytest.approx((1 / 3 + 0.4) / 2, abs=1e-6)
    # jaccard: class 0: inter 1, union 4 - 1 = 3 -> 1 - 2/4 = 0.5; class 1: inter .5, union 2.5 -> 1 - 1.5/3.5
    assert float(LOSSES["jaccard"](logits, target)) == pytest.approx((0.5 + (1 - 1.5 / 3.5)) / 2, abs=1e-6)


def test_class_weights_weight_the_per_class_losses():
    target = _pair()
    logits = torch.zeros_like(target)
    only_0 = torch.tensor([1.0, 0.0])
    assert float(LOSSES["dice"](logits, target, only_0)) == pytest.approx(1 / 3, abs=1e-6)
    assert float(LOSSES["dice"](logits, target, torch.tensor([1.0, 3.0]))) == pytest.approx((1 / 3 + 1.2) / 4,
                                                                                            abs=1e-6)
    bce0 = -math.log(0.5)
    assert float(LOSSES["bce"](logits, target, only_0)) == pytest.approx(bce0, abs=1e-6)


def test_tversky_costs_a_missed_pixel_more_than_an_extra_one():
    target = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    missed = torch.tensor([[[[30.0, -30.0, -30.0, -30.0]]]])
    extra = torch.tensor([[[[30.0, 30.0, 30.0, -30.0]]]])
    assert float(LOSSES["tversky"](missed, target)) > float(LOSSES["tversky"](extra, target)) + 0.05
    assert float(LOSSES["dice"](missed, target)) == pytest.approx(float(LOSSES["dice"](extra, target)), abs=0.06)


def test_specs_combine_and_unknown_names_list_the_valid_ones():
    target = _pair()
    logits = torch.zeros_like(target)
    combined = build_loss("bce:0.5,dice:0.5")(logits, target)
    assert float(combined) == pytest.approx(0.5 * -math.log(0.5) + 0.5 * (1 / 3 + 0.4) / 2, abs=1e-6)
    assert parse_loss_spec("lovasz,tversky:2") == [("lovasz", 1.0), ("tversky", 2.0)]
    with pytest.raises(HandsegError, match="valid: bce, dice, focal, jaccard, iou, tversky, lovasz, boundary"):
        parse_loss_spec("hausdorff")
