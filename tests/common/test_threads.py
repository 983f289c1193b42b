"""Thread decisions from the CPUs a process may use (affinity, cgroup quota, --threads), never os.cpu_count()."""

from __future__ import annotations

import json

import pytest

from handseg.common import threads
from handseg.common.threads import _sample_load as real_sample_load
from handseg.common.threads import busy_cpus, cpu_times, plan_threads, read_cgroup_quota, usable_cpus
from tests.conftest import run_cli


@pytest.mark.parametrize("affinity, quota, count, expected", [
    (2, None, 64, 2),       # taskset to 2 of 64 cores
    (64, 1.5, 64, 2),       # a container with 1.5 CPUs: rounded up
    (64, 0.5, 64, 1),       # half a CPU: still one thread
    (4, 8.0, 64, 4),        # the smaller of the two limits
    (None, None, 6, 6),     # nothing known: the machine's count
    (None, 3.0, 6, 3),
])
def test_usable_cpus_is_the_smallest_limit(affinity, quota, count, expected):
    assert usable_cpus(affinity=affinity, quota=quota, count=count) == expected


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert read_cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert read_cgroup_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert read_cgroup_quota(tmp_path / "v1") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert read_cgroup_quota(tmp_path / "v1") is None
    assert read_cgroup_quota(tmp_path / "none") is None


def test_readers_feed_the_decision(monkeypatch):
    monkeypatch.setattr(threads, "read_affinity", lambda: 32)
    monkeypatch.setattr(threads, "read_cgroup_quota", lambda root=threads.CGROUP: 2.0)
    assert usable_cpus() == 2
    assert threads.budget() == (2, "usable CPUs (affinity and cgroup quota)")
    threads.set_override(5)
    assert threads.budget() == (5, "--threads")


@pytest.mark.parametrize("budget, device, workers, intra, chosen", [
    (2, "cpu", None, 2, 0),      # a 2-core box: the network gets both, no loader processes
    (1, "cpu", None, 1, 0),
    (8, "cpu", None, 6, 2),      # one worker per four threads
    (16, "cuda", None, 8, 8),    # GPU: workers, at most 8
    (4, "cuda", None, 1, 3),     # GPU: all threads but one
    (2, "cpu", 4, 1, 1),         # --workers 4 on 2 threads: cut to 1, the model keeps 1
    (1, "cuda", 4, 1, 0),
    (8, "cpu", 2, 6, 2),         # fits: kept
    (8, "cpu", 0, 8, 0),
])
def test_threads_plus_workers_never_exceed_the_budget(budget, device, workers, intra, chosen):
    plan = plan_threads(budget, device, workers)
    assert (plan.intra_op, plan.workers) == (intra, chosen)
    assert plan.intra_op + plan.workers <= budget


def test_train_fits_workers_to_threads_and_the_manifest_records_them(synth_data, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    code, said, err = run_cli(["--threads", 2, "train", "--data", synth_data / "train", "--arch", "unet", "--encoder",
                            "resnet18", "--encoder-weights", "none", "--size", 64, "--epochs", 1, "--batch-size", 4,
                            "--workers", 3, "--device", "cpu", "--augment", "light", "--fold", -1, "--out", out],
                              capsys)
    assert code == 0, err
    assert "--workers 3 with 2 threads (--threads): using 1 worker" in " ".join(said.split())
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["options"]["workers"] == 1
    assert doc["threads"] == {"budget": 2, "source": "--threads", "intra_op": 1, "workers": 1, "workers_asked": 3,
                              "busy": None}
    assert torch.get_num_threads() == 1
    assert "UserWarning" not in err  # torch's warning about more workers than cores


def test_threads_option_is_checked(capsys):
    code, _, err = run_cli(["--threads", 0, "kfold"], capsys)
    assert code == 2 and "--threads" in err


@pytest.mark.parametrize("usable, load, expected", [
    (2, (0.2, 2), 2),       # quiet
    (2, (8.0, 2), 1),       # the shared 2-core box under load 8
    (2, (1.0, 2), 1),       # one core busy elsewhere
    (4, (16.0, 64), 3),     # a quarter of a big host busy: 3 of a 4-CPU quota
    (4, None, 4),           # load unknown
])
def test_a_busy_machine_gets_fewer_intra_op_threads(usable, load, expected):
    assert threads.free_cpus(usable, load) == expected


def test_the_load_caps_intra_op_threads_but_not_an_explicit_budget(monkeypatch):
    monkeypatch.setattr(threads, "read_load", lambda: (1.8, 2))
    cap = threads.intra_op_cap(2)
    assert cap == (1, "other work busy on 1.8 of 2 CPUs")
    plan = plan_threads(2, "cpu", None, cap=cap)
    assert (plan.intra_op, plan.workers, plan.busy) == (1, 0, "other work busy on 1.8 of 2 CPUs")
    threads.set_override(2)
    assert threads.intra_op_cap(2) == (2, None)


STAT = "cpu  {} 0 {} {} {} 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 12345\n"


def test_the_machine_load_is_its_busy_share_now_read_from_proc_stat_once(tmp_path, monkeypatch):
    # user, nice, system, idle, iowait, irq, softirq, steal (guest time is inside user)
    assert cpu_times(STAT.format(100, 50, 800, 50)) == (850, 1000)
    before, after = (850, 1000), (850 + 50, 1000 + 200)  # 200 ticks, 50 idle: 3/4 of the machine busy
    assert busy_cpus(before, after, 2) == pytest.approx(1.5)
    assert busy_cpus(before, before, 2) == 0.0  # no tick passed: nothing known to be busy
    with pytest.raises(ValueError):
        cpu_times("intr 1 2 3\n")

    # the sample: two readings SAMPLE_SECONDS apart, taken once per process (reset forgets it)
    stat = tmp_path / "stat"
    readings = iter([STAT.format(100, 50, 800, 50), STAT.format(250, 50, 800, 50)])

    def read_text(self):
        assert self == stat
        return next(readings)

    monkeypatch.setattr(threads, "_sample_load", real_sample_load)
    monkeypatch.setattr(threads, "STAT", stat)
    monkeypatch.setattr(threads, "SAMPLE_SECONDS", 0.0)
    monkeypatch.setattr(type(stat), "read_text", read_text)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    threads.reset()
    assert threads.read_load() == (pytest.approx(2 * 150 / 150), 2)  # all 150 ticks busy: both CPUs
    assert threads.read_load() == (pytest.approx(2.0), 2)  # cached: the readings are not taken again
    assert threads.free_cpus(2) == 1

    # no /proc/stat (macOS): the 1-minute load average
    monkeypatch.setattr(type(stat), "read_text", lambda self: (_ for _ in ()).throw(OSError("no such file")))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.5, 0.4, 0.3))
    threads.reset()
    assert threads.read_load() == (0.5, 2)
