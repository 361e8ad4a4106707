"""How many cores this process may use: the CPUs it may run on (affinity), and no more than its
cgroup's CPU quota allows (`cpu.max`, cgroup v2; `cfs_quota_us`, v1).

A container given 4 CPUs' worth of quota on a 64-core host, or a job pinned to 8 cores, would
otherwise start one thread per core of the machine: threads that take turns on the cores they
have, each waiting for the others at every step. The merge's threads (`--threads` caps them) are
sized from this instead.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def _quota_v2(root: Path) -> float | None:
    """CPUs' worth of quota in cgroup v2's `cpu.max` ("max 100000" or "200000 100000")."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(root: Path) -> float | None:
    """CPUs' worth of quota in cgroup v1's cpu controller (-1: none)."""
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cores(root: Path = _CGROUP) -> int:
    """Cores this process may use: its affinity, capped by its cgroup quota (rounded up), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _quota_v2(root)
    if quota is None:
        quota = _quota_v1(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


@functools.cache
def default_threads() -> int:
    """The compute threads of a merge without `--threads`: `usable_cores`, once per process."""
    return usable_cores()
