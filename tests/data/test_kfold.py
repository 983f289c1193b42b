import pytest

from handseg.common.errors import HandsegError
from handseg.data.kfold import assign_folds, make_splits


def test_grouped_balanced_deterministic(synth_data):
    a = make_splits(synth_data / "train", n_folds=3, seed=1)
    b = make_splits(synth_data / "train", n_folds=3, seed=1)
    assert a == b
    for im in a["images"]:
        assert im["fold"] == a["patients"][im["patient"]]
    counts = [sum(1 for p in a["patients"].values() if p == k) for k in range(3)]
    assert counts == [2, 2, 2]
    assert sorted(sum((f["val"] for f in a["folds"]), [])) == sorted(im["path"] for im in a["images"])


def test_stratification_spreads_values():
    patients = [f"ID{i:03d}" for i in range(40)]
    strata = {p: float(i) for i, p in enumerate(patients)}
    folds = assign_folds(patients, 4, seed=0, strata=strata)
    means = [sum(strata[p] for p in patients if folds[p] == k) / 10 for k in range(4)]
    assert max(means) - min(means) < 4  # unstratified random splits often differ by 8+
    assert sorted(folds.values()).count(0) == 10


def test_bend_stratification_runs_on_labels(synth_data):
    s = make_splits(synth_data / "train", n_folds=2, seed=0, stratify="bend")
    assert s["stratify"] == "bend" and len(s["patients"]) == 6


def test_too_few_patients():
    with pytest.raises(HandsegError, match="cannot fill"):
        assign_folds(["ID001"], 2, 0)
