"""Threads applied to a run: OpenCV keeps to one thread in a process that forks DataLoader workers; host
memory freed by one image's maps is kept for the next."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

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
    plan = apply_threads("cpu", workers=1, adapt_to_load=False)
    assert plan.workers == 1 and plan.intra_op == 3
    assert cv2.getNumThreads() == 1  # the parent, before it forks
    seen = [int(v) for v in DataLoader(_OpenCvThreads(), batch_size=None, num_workers=1)]
    assert seen == [1, 1]  # each worker: one OpenCV thread, as the plan counts it

    threads.set_override(4)
    plan = apply_threads("cpu", workers=0, adapt_to_load=False)
    assert plan.workers == 0 and cv2.getNumThreads() == plan.intra_op == 4  # no workers: OpenCV may use them all


HOST_MEMORY_CHILD = r"""
import resource
import torch
import torch.nn.functional as F
from handseg.inference import runtime
kept = runtime.reuse_host_memory()
low = torch.rand(1, 4, 256, 256)
faults = []
for _ in range(4):  # a map of 64 MiB made at full size from the network's, freed, made again: as every image's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = F.interpolate(low, size=(2048, 2048), mode="bilinear", align_corners=False)[0].sigmoid_()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del p
runtime.release_host_memory()
print(kept, faults[-1])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("setting, kept", [("", True), ("system", False)])
def test_freed_host_memory_is_kept_for_the_next_map_unless_told_otherwise(setting, kept):
    # in a child: the setting is per process, and the fault count is the process's own
    env = {**os.environ, "HANDSEG_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", HOST_MEMORY_CHILD], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    pages = (64 << 20) // 4096
    assert out[0] == str(kept)
    if kept:
        assert int(out[1]) < pages // 10  # a later map reuses an earlier one's pages
    else:
        assert int(out[1]) > pages // 2  # glibc's own way: fresh pages, faulted in again
