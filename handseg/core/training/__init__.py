"""Training: configuration, samples, the loop, validation and run state, one module each.

- :mod:`~handseg.core.training.config`: :class:`TrainConfig` and the one place that checks it;
- :mod:`~handseg.core.training.dataset`: the fold's items, augmentation, samples from bone crops;
- :mod:`~handseg.core.training.loop`: :func:`train`;
- :mod:`~handseg.core.training.validation`: the fold's leaderboard Dice;
- :mod:`~handseg.core.training.state`: background checkpoints and pickle-free resume state.
"""

from handseg.core.training.config import AUGMENT_PRESETS, TrainConfig
from handseg.core.training.dataset import (
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
from handseg.core.training.loop import METRIC_FIELDS, append_metrics, train

__all__ = [
    "AUGMENT_PRESETS", "METRIC_FIELDS", "Item", "SegmentationDataset", "TrainConfig", "append_metrics", "augmenter",
    "load_item", "load_item_crops", "render_masks", "seed_worker", "split_items", "train", "unpack_mask_bits",
]
