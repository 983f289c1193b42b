import numpy as np
import pytest

from handseg.common.constants import CLASSES
from handseg.common.errors import HandsegError
from handseg.formats.rle import rle_decode, rle_encode
from handseg.formats.submission import read_predictions, write_predictions


def _rows(images, rle="1 3"):
    return [(im, [rle if c % 2 == 0 else "" for c in range(29)]) for im in images]


def test_round_trip_and_exact_row_order(tmp_path):
    path = tmp_path / "p.csv"
    write_predictions(path, _rows(["image2.png", "image1.png"]))
    lines = path.read_text().splitlines()
    assert lines[0] == "image_name,class,rle"
    assert len(lines) == 1 + 2 * 29
    assert lines[1] == "image2.png,finger-1,1 3" and lines[2] == "image2.png,finger-2,"
    assert [ln.split(",")[1] for ln in lines[1:30]] == list(CLASSES)
    preds = read_predictions(path)
    assert preds.images == ["image2.png", "image1.png"]
    assert preds.rle("image1.png", 0) == "1 3" and preds.rle("image1.png", 1) == ""


def test_pandas_nan_empty_cells_are_empty_masks(tmp_path):
    import pandas as pd

    path = tmp_path / "p.csv"
    write_predictions(path, _rows(["a.png"]))
    frame = pd.read_csv(path)  # reads "" as NaN
    assert frame["rle"].isna().sum() == 14
    frame.to_csv(tmp_path / "q.csv", index=False)  # and writes NaN back as ""
    preds = read_predictions(tmp_path / "q.csv")
    assert preds.runs["a.png"][1][0].size == 0


@pytest.mark.parametrize("mutate,message", [
    (lambda L: L[:-1], r"a\.png is missing 1 class row\(s\): Ulna"),
    (lambda L: L[:5] + [L[5][: L[5].rfind(",") + 3] + "x"] + L[6:], r"line 6 .*malformed RLE"),
    (lambda L: L[:3] + ["a.png,finger-99,1 2"] + L[4:], r"line 4: unknown class 'finger-99'"),
    (lambda L: L + [L[1]], r"line 31: duplicate row for a.png / finger-1"),
    (lambda L: ["image,class,rle"] + L[1:], r"header"),
    (lambda L: L[:2] + ["a.png,finger-2"] + L[3:], r"line 3: expected 3 fields"),
    (lambda L: L[:1], r"no prediction rows"),
])
def test_bad_csv_is_an_error_naming_the_row(tmp_path, mutate, message):
    good = tmp_path / "good.csv"
    write_predictions(good, _rows(["a.png"], rle="1 3 10 2"))
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(mutate(good.read_text().splitlines())) + "\n")
    with pytest.raises(HandsegError, match=message) as err:
        read_predictions(bad)
    assert "bad.csv" in str(err.value)


def test_truncated_file_mid_row(tmp_path):
    good = tmp_path / "t.csv"
    write_predictions(good, _rows(["a.png", "b.png"], rle="1 3 10 2"))
    text = good.read_text()
    (tmp_path / "cut.csv").write_text(text[: len(text) * 3 // 4])
    with pytest.raises(HandsegError, match="cut.csv"):
        read_predictions(tmp_path / "cut.csv")


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "p.csv"
    with pytest.raises(ValueError):
        write_predictions(path, [("a.png", ["" for _ in range(28)])])
    assert list(tmp_path.iterdir()) == []


def test_meta_x0008_artefact_is_stripped(tmp_path):
    import pandas as pd

    from handseg.data.meta import read_meta

    frame = pd.DataFrame({"ID": [1, 2, 3], "나이": [30, 40, 50], "성별": ["여_x0008_", "남", "여"],
                          "체중(몸무게)": [50, 70, 60], "키(신장)": [160, 175, 165], "x": [None, "네일있음", None]})
    frame.columns = ["ID", "나이", "성별", "체중(몸무게)", "키(신장)", ""]
    frame.to_excel(tmp_path / "m.xlsx", index=False)
    meta = read_meta(tmp_path / "m.xlsx")
    assert meta["sex"].tolist() == ["F", "M", "F"]
    assert meta["nail_art"].tolist() == [False, True, False]
    assert list(meta.index) == ["ID001", "ID002", "ID003"]
    assert np.allclose(meta["height_cm"], [160, 175, 165])


def test_a_noisy_mask_with_a_megabyte_rle_reads_back(tmp_path):
    """A checkerboard-like 2048 px mask: about 2 million runs, an RLE far past csv's 128 KiB default."""
    mask = np.zeros((2048, 2048), dtype=bool)
    mask[::2, ::2] = True
    rles = [""] * 29
    rles[3] = rle_encode(mask)
    assert len(rles[3]) > 1_000_000
    write_predictions(tmp_path / "big.csv", [("a.png", rles)])
    got = read_predictions(tmp_path / "big.csv")
    assert np.array_equal(rle_decode(got.rle("a.png", 3), mask.shape), mask)
