"""The one output rule (check_output) and folder outputs built beside their destination (atomic_dir)."""

import pytest

from handseg.common.errors import HandsegError, one_line
from handseg.formats.files import atomic_dir, check_output


def test_existing_output_needs_overwrite(tmp_path):
    f = tmp_path / "pred.csv"
    f.write_text("x")
    with pytest.raises(HandsegError, match="already exists; pass --overwrite"):
        check_output(f)
    assert check_output(f, overwrite=True) == f


def test_file_output_that_is_a_folder_or_under_a_file(tmp_path):
    with pytest.raises(HandsegError, match="is a folder"):
        check_output(tmp_path, overwrite=True)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(HandsegError, match="is a file, not a folder"):
        check_output(blocker / "sub" / "pred.csv")
    with pytest.raises(HandsegError, match="is a file; give a folder"):
        check_output(blocker, overwrite=True, kind="dir")


def test_unwritable_location_is_refused_before_work():
    # /proc refuses new files even for root, where chmod would not
    with pytest.raises(HandsegError, match="cannot write in /proc"):
        check_output("/proc/handseg-test/pred.csv")


def test_atomic_dir_moves_complete_output_and_replaces_old_one_whole(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.txt").write_text("old run")
    with pytest.raises(HandsegError, match="already exists"):
        with atomic_dir(dest):
            pass
    with atomic_dir(dest, overwrite=True) as tmp:
        assert tmp != dest and tmp.parent == dest.parent
        (tmp / "new.txt").write_text("new run")
        assert (dest / "stale.txt").exists()  # the old output stays until the new one is complete
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_worker_error_is_shown_as_its_own_line():
    wrapped = ("Caught HandsegError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nhandseg.common.errors.HandsegError: a.npy: corrupt cache file')
    assert one_line(wrapped) == "a.npy: corrupt cache file"
    assert one_line("plain message") == "plain message"
