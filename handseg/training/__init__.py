"""Training: configuration, samples, the loop, validation and run state, one module each.

- :mod:`~handseg.training.config`: :class:`TrainConfig` and the one place that checks it;
- :mod:`~handseg.training.dataset`: the fold's items, augmentation, samples from bone crops;
- :mod:`~handseg.training.loop`: :func:`train`;
- :mod:`~handseg.training.validation`: the fold's leaderboard Dice;
- :mod:`~handseg.training.state`: background checkpoints and pickle-free resume state.
"""

from handseg.training.config import AUGMENT_PRESETS, TrainConfig
from handseg.training.dataset import (
    Item,
    SegmentationDataset,
    augmenter,
    load_item,
    load_item_crops,
    render_masks,
    seed_worker,
    split_items,
    unpack_mask_bits,
)
from handseg.training.loop import train
from handseg.training.records import METRIC_FIELDS, append_metrics

__all__ = [
    "AUGMENT_PRESETS", "METRIC_FIELDS", "Item", "SegmentationDataset", "TrainConfig", "append_metrics", "augmenter",
    "load_item", "load_item_crops", "render_masks", "seed_worker", "split_items", "train", "unpack_mask_bits",
]
