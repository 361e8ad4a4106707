"""How many cores this process may use: the CPUs it may run on (affinity), and no more than the
CPU quota of its cgroups allow (`cpu.max`, cgroup v2; `cpu.cfs_quota_us`, v1), its own group's
or an ancestor's.

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

from engine.cgroup import group_dirs, read_text


def _quota(version: int, folder: Path) -> float | None:
    """CPUs' worth of quota in one group: v2 `cpu.max` ("max 100000" or "200000 100000"), v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none); None where there is none."""
    try:
        if version == 2:
            quota, period = (read_text(folder, "cpu.max") or "").split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q, p = int(read_text(folder, "cpu.cfs_quota_us") or ""), int(read_text(folder, "cpu.cfs_period_us") or "")
    except ValueError:
        return None
    return None if q <= 0 or p <= 0 else q / p


def cpu_quota(root: Path | None = None) -> float | None:
    """The tightest CPU quota on this process from its cgroups, in CPUs; None where there is none."""
    quotas = [q for version, folder in group_dirs("cpu", root) if (q := _quota(version, folder)) is not None]
    return min(quotas, default=None)


def usable_cores(root: Path | None = None) -> int:
    """Cores this process may use: its affinity, capped by its cgroup quota (rounded up), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(root)
    if quota is not None and quota > 0:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


@functools.cache
def default_threads() -> int:
    """The compute threads of a merge without `--threads`: `usable_cores`, once per process."""
    return usable_cores()
