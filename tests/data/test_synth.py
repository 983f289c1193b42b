import hashlib

import numpy as np

from handseg.common.constants import CLASSES
from handseg.data.images import read_image
from handseg.data.labels import class_masks, read_polygons
from handseg.data.layout import discover
from handseg.data.meta import read_meta


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".png", ".json"):
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_labels_and_overlaps(synth_data):
    train = discover(synth_data / "train", labels="required")
    test = discover(synth_data / "test", labels="ignore")
    gt = discover(synth_data / "test_gt", labels="required")
    assert len(train) == 12 and len(test) == 4
    assert [s.rel for s in gt] == [s.rel for s in test]
    assert not (synth_data / "test" / "outputs_json").exists()
    # every ID holds a left and a right hand
    per_id = {}
    for s in train:
        per_id.setdefault(s.patient, []).append(s)
    assert all(len(v) == 2 for v in per_id.values())
    # test IDs are interleaved with train IDs
    ids = sorted({s.patient for s in train} | {s.patient for s in test})
    assert ids == [f"ID{i:03d}" for i in range(1, 9)]
    for s in train[:4]:
        polys = read_polygons(s.label_path)
        assert set(polys) == set(CLASSES)
        masks = class_masks(polys, read_image(s.image_path).shape)
        c = {n: i for i, n in enumerate(CLASSES)}
        assert (masks[c["Trapezium"]] & masks[c["Trapezoid"]]).any()
        assert (masks[c["Triquetrum"]] & masks[c["Pisiform"]]).any()
        assert all(masks[i].any() for i in range(29))
        # dense polygons: vertices about one pixel apart
        gaps = np.abs(np.diff(polys["Radius"], axis=0)).max(axis=1)
        assert gaps.max() <= 2


def test_bones_are_brighter_than_soft_tissue(synth_data):
    s = discover(synth_data / "train")[0]
    img = read_image(s.image_path).astype(float)
    masks = class_masks(read_polygons(s.label_path), img.shape)
    bone = masks.any(axis=0)
    assert img[bone].mean() > img[~bone].mean() + 30


def test_deterministic_by_seed(tmp_path):
    from handseg.data.synth import make_dataset

    make_dataset(tmp_path / "a", ids=2, test_ids=1, size=96, seed=3)
    make_dataset(tmp_path / "b", ids=2, test_ids=1, size=96, seed=3)
    make_dataset(tmp_path / "c", ids=2, test_ids=1, size=96, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_meta_data_is_cleaned(synth_data):
    meta = read_meta(synth_data / "meta_data.xlsx")
    assert {"ID001", "ID008"} <= set(meta.index)
    assert len(meta) > 8  # a few IDs have no images, as in the real file
    assert set(meta["sex"].dropna()) <= {"M", "F"} and meta["sex"].notna().all()
    assert meta["nail_art"].dtype == bool
    assert meta["age"].between(10, 90).all()
