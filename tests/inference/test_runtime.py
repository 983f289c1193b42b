"""Threads applied to a run: OpenCV keeps to one thread in a process that forks DataLoader workers."""

from __future__ import annotations

import cv2
import pytest

from handseg.common import threads
from handseg.inference.runtime import apply_threads


class _OpenCvThreads:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return cv2.getNumThreads()


@pytest.fixture
def _restore_cv2():
    import torch

    before = cv2.getNumThreads(), torch.get_num_threads()
    yield
    cv2.setNumThreads(before[0])
    torch.set_num_threads(before[1])


def test_loader_workers_run_opencv_on_one_thread(_restore_cv2):
    from torch.utils.data import DataLoader

    threads.set_override(4)
    plan = apply_threads("cpu", workers=1)
    assert plan.workers == 1 and plan.intra_op == 3
    assert cv2.getNumThreads() == 1  # the parent, before it forks
    seen = [int(v) for v in DataLoader(_OpenCvThreads(), batch_size=None, num_workers=1)]
    assert seen == [1, 1]  # each worker: one OpenCV thread, as the plan counts it

    threads.set_override(4)
    plan = apply_threads("cpu", workers=0)
    assert plan.workers == 0 and cv2.getNumThreads() == plan.intra_op == 4  # no workers: OpenCV may use them all
