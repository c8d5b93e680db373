"""How many threads a CPU time loop may use: torch's thread count, capped by what the OS gives the process."""
from __future__ import annotations

import contextlib
import math
import os

import torch

# The OS's limit, read once per process (a forked child reads it again).
_os_limit: tuple[int, int] | None = None  # (pid, limit)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_quota() -> int | None:
    """CPUs allowed by the cgroup's CFS quota (v2 cpu.max, else v1), rounded down, at least 1; None: no quota.
    Rounded down: a team larger than the quota is throttled as a whole mid-step."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return max(1, math.floor(int(quota) / int(period)))
        return None
    for folder in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):
        quota, period = _read(f"{folder}/cpu.cfs_quota_us"), _read(f"{folder}/cpu.cfs_period_us")
        if quota and period and int(quota) > 0 and int(period) > 0:
            return max(1, math.floor(int(quota) / int(period)))
    return None


def os_thread_limit() -> int:
    """min(CPUs in the affinity mask, cgroup quota): computed once per process."""
    global _os_limit
    if _os_limit is None or _os_limit[0] != os.getpid():
        quota = _cgroup_quota()
        limit = _affinity() if quota is None else min(_affinity(), quota)
        _os_limit = (os.getpid(), max(1, limit))
    return _os_limit[1]


def usable_threads() -> int:
    """Threads for a CPU time loop: torch.get_num_threads() (the user's knob), capped by os_thread_limit()."""
    return max(1, min(torch.get_num_threads(), os_thread_limit()))


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op thread count set to 1 inside, restored after (setting it costs under a microsecond)."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)
