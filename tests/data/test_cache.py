import numpy as np

from handseg.data.cache import build_cache, load_sample, pack_masks, unpack_masks
from handseg.data.labels import load_labels
from handseg.data.layout import discover


def test_pack_round_trip_random_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((29, 37, 45)) < 0.05
    masks[3] = False
    assert np.array_equal(unpack_masks(pack_masks(masks)), masks)


def test_cache_equals_png_plus_json_and_is_idempotent(tmp_path, synth_data):
    cache = tmp_path / "cache"
    r1 = build_cache("masks", synth_data / "train", cache, workers=2)
    r2 = build_cache("images", synth_data / "train", cache, workers=1)
    assert r1.written == r2.written == 12
    again = build_cache("masks", synth_data / "train", cache, workers=1)
    assert again.written == 0 and again.skipped == 12
    for s in discover(synth_data / "train"):
        img, masks = load_sample(cache, s)
        ref_img, ref_masks = load_labels(s)
        assert np.array_equal(img, ref_img)
        assert np.array_equal(masks, ref_masks)
    # no temporary files left behind
    assert not list(cache.rglob("*.tmp-*"))
