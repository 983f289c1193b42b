"""How many CPU threads handseg uses: decided once from the CPUs this process may use.

``os.cpu_count()`` counts the machine's cores, not the ones this process may run on: in a container
limited by a cgroup quota, under ``taskset``, or on a shared box it overstates them, and torch's
intra-op threads, OpenCV's threads and DataLoader workers then fight over the few cores there are
(on a busy 2-core machine the demo ran 9x slower with torch's defaults than with one thread). The
budget is the smallest of the CPU affinity (``os.sched_getaffinity``) and the cgroup quota (v2
``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded up, or ``handseg --threads N``.
Intra-op threads plus loader workers never exceed it; each worker runs one thread.

Nothing here imports torch or OpenCV (the manifest writer reads :func:`recorded`); applying a plan to
them is :func:`handseg.inference.runtime.apply_threads`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from handseg.common.errors import HandsegError

CGROUP = Path("/sys/fs/cgroup")
MAX_WORKERS = 8
"""More loader workers than this only add memory: one worker prepares a 1024 px sample in ~10 ms."""

_override: int | None = None
_recorded: dict | None = None


def read_affinity() -> int | None:
    """CPUs this process may run on (``None`` where the OS does not say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return None


def read_cgroup_quota(root: Path = CGROUP) -> float | None:
    """The cgroup's CPU quota in CPUs (e.g. 1.5), or ``None`` when unlimited or not in a cgroup.

    Reads v2 ``cpu.max`` (``"150000 100000"`` or ``"max 100000"``), else v1 ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us`` (quota -1: unlimited) under ``cpu/`` or ``cpu,cpuacct/``.
    """
    try:
        parts = (root / "cpu.max").read_text().split()
        if len(parts) >= 2 and parts[0] != "max":
            return int(parts[0]) / int(parts[1])
        if parts:
            return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


_READ = object()


def usable_cpus(affinity=_READ, quota=_READ, count: int | None = None) -> int:
    """The CPUs this process may use: the smallest of its affinity and its cgroup quota (rounded up, at
    least 1); ``count`` (default ``os.cpu_count()``) only where neither is known.

    Args:
        affinity: CPUs in the affinity mask (``None``: unknown); read when not given.
        quota: the cgroup quota in CPUs (``None``: unlimited); read when not given.
    """
    affinity = read_affinity() if affinity is _READ else affinity
    quota = read_cgroup_quota() if quota is _READ else quota
    limits = [n for n in (affinity, math.ceil(quota) if quota else None) if n]
    if not limits:
        limits = [count or os.cpu_count() or 1]
    return max(1, min(limits))


STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.25
"""How long :func:`read_load` watches the machine's CPU counters (once per process)."""

_load: tuple | None = None
"""The cached :func:`read_load` result, in a 1-tuple (so that "the OS does not say" is cached too)."""


def cpu_times(text: str) -> tuple[int, int]:
    """``(idle ticks, all ticks)`` of all CPUs from the text of ``/proc/stat`` (its ``cpu`` line: user,
    nice, system, idle, iowait, irq, softirq, steal; guest time is already inside user)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            ticks = [int(v) for v in parts[1:9]]
            return ticks[3] + (ticks[4] if len(ticks) > 4 else 0), sum(ticks)
    raise ValueError("no cpu line")


def busy_cpus(before: tuple[int, int], after: tuple[int, int], cpus: int) -> float:
    """CPUs busy between two :func:`cpu_times` readings (0 .. ``cpus``)."""
    idle, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    return min(float(cpus), max(0.0, cpus * (1.0 - idle / total)))


def read_load() -> tuple[float, int] | None:
    """``(CPUs the machine's other work keeps busy now, online CPUs of the machine)``, or ``None`` where
    the OS does not say; read once per process (:func:`reset` forgets it).

    Linux: the busy share of all CPUs over :data:`SAMPLE_SECONDS` from ``/proc/stat``, while this process
    sleeps, so its own work is not counted. Elsewhere: the 1-minute load average, which lags: right after
    a previous command it still counts that command's work.
    """
    global _load
    if _load is None:
        _load = (_sample_load(),)
    return _load[0]


def _sample_load() -> tuple[float, int] | None:
    cpus = os.cpu_count() or 1
    try:
        before = cpu_times(STAT.read_text())
        time.sleep(SAMPLE_SECONDS)
        return busy_cpus(before, cpu_times(STAT.read_text()), cpus), cpus
    except (OSError, ValueError):
        pass
    try:
        return os.getloadavg()[0], cpus
    except (AttributeError, OSError):
        return None


def free_cpus(usable: int, load=_READ) -> int:
    """Of ``usable`` CPUs, those the machine's other work leaves free: ``usable`` times the idle share of
    the machine (``1 - busy / cpus``), rounded up, at least 1.

    Why: torch's intra-op threads meet at a barrier after every operation, so one thread the OS has
    descheduled for a busy neighbour stalls the others; on a loaded 2-core box two threads ran the demo
    9x slower than one. A busy machine gets fewer threads, a quiet one all it may use.
    """
    load = read_load() if load is _READ else load
    if not load:
        return usable
    average, cpus = load
    idle = max(0.0, 1.0 - average / max(1, cpus))
    return max(1, min(usable, math.ceil(usable * idle - 1e-9)))


def set_override(threads: int | None) -> None:
    """``handseg --threads N``: the budget for this run, whatever the machine says (``None``: decide)."""
    global _override
    if threads is not None and threads < 1:
        raise HandsegError(f"--threads {threads}: give 1 or more")
    _override = threads


def overridden() -> bool:
    """Whether ``handseg --threads`` set this run's budget."""
    return _override is not None


def budget() -> tuple[int, str]:
    """``(threads, where the number comes from)``: ``--threads``, or the usable CPUs."""
    if _override is not None:
        return _override, "--threads"
    return usable_cpus(), "usable CPUs (affinity and cgroup quota)"


def intra_op_cap(plan_budget: int) -> tuple[int, str | None]:
    """The most intra-op threads worth running now, and why when fewer than ``plan_budget``: all of them
    with ``--threads``, else :func:`free_cpus` of the budget."""
    if _override is not None:
        return plan_budget, None
    free = free_cpus(plan_budget)
    if free >= plan_budget:
        return plan_budget, None
    load = read_load()
    return free, f"other work busy on {load[0]:.1f} of {load[1]} CPUs" if load else None


@dataclass(frozen=True)
class ThreadPlan:
    """What one run uses: ``intra_op`` torch/OpenCV threads in the main process and ``workers`` loader
    processes of one thread each; ``intra_op + workers <= budget`` (with one worker or more the main
    process keeps at least one thread)."""

    budget: int
    source: str
    intra_op: int
    workers: int
    workers_asked: int | None = None
    busy: str | None = None
    """Why ``intra_op`` is below what the budget allows (the machine's load), or ``None``."""

    def to_json(self) -> dict:
        return asdict(self)


def plan_threads(budget: int, device: str = "cpu", workers: int | None = None, source: str = "",
                 cap: tuple[int, str | None] | None = None) -> ThreadPlan:
    """Split ``budget`` threads between the main process and DataLoader workers.

    On CPU the network is the work and the loader's share is small (a cached sample takes ~10 ms), so
    up to 2 threads go to the network alone, and beyond that one worker per four threads. On a GPU the
    main process mostly waits for the device: every thread but one becomes a worker (at most
    :data:`MAX_WORKERS`). Asked-for ``workers`` are kept when they fit, else cut to ``budget - 1``.

    Args:
        budget: threads this run may use (>= 1).
        device: ``cpu`` or ``cuda[:N]``.
        workers: ``--workers`` as given (``None``: fit the machine); 0 loads in the main process.
        cap: ``(most intra-op threads, why)`` from :func:`intra_op_cap` (``None``: no cap).
    """
    budget = max(1, int(budget))
    if workers is None:
        if device.startswith("cuda"):
            chosen = min(MAX_WORKERS, budget - 1)
        else:
            chosen = 0 if budget <= 2 else min(MAX_WORKERS, budget // 4)
    else:
        chosen = min(workers, budget - 1)
    intra = max(1, budget - chosen)
    busy = None
    if cap is not None and cap[0] < intra:
        intra, busy = max(1, cap[0]), cap[1]
    return ThreadPlan(budget, source, intra, chosen, workers, busy)


def record(plan: ThreadPlan) -> None:
    """Remember the plan applied in this process: manifests written afterwards record it."""
    global _recorded
    _recorded = plan.to_json()


def recorded() -> dict | None:
    """The plan applied in this process, as JSON (``None`` before any)."""
    return None if _recorded is None else dict(_recorded)


def reset() -> None:
    """Forget ``--threads``, the machine's load and the recorded plan (each CLI run in one process starts
    afresh)."""
    global _override, _recorded, _load
    _override = None
    _recorded = None
    _load = None
