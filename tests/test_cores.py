"""The merge's default threads: the cores this process may use, capped by its cgroups' CPU quota
(its own group's or an ancestor's), read through the same walk as the memory limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.cores import usable_cores
from tests.test_limits import fake_root


@pytest.mark.parametrize(
    ("cgroup", "files", "want"),
    [
        ("0::/\n", {}, None),  # no cgroup files: the affinity
        ("0::/\n", {"cpu.max": "max 100000"}, None),
        ("0::/\n", {"cpu.max": "150000 100000"}, 2),  # 1.5 CPUs of quota: 2 threads
        ("0::/\n", {"cpu.max": "50000 100000"}, 1),
        # v2: the job's own group says "max", its parent 1 CPU: the parent's quota applies
        ("0::/job/step\n", {"job/cpu.max": "100000 100000", "job/step/cpu.max": "max 100000"}, 1),
        ("0::/\n", {"cpu.max": "garbage"}, None),
        # v1 beside v2: the cpu controller's own path, and its root says none
        (
            "4:cpu,cpuacct:/batch/x\n0::/\n",
            {
                "cpu/cpu.cfs_quota_us": "-1",
                "cpu/cpu.cfs_period_us": "100000",
                "cpu/batch/x/cpu.cfs_quota_us": "100000",
                "cpu/batch/x/cpu.cfs_period_us": "100000",
            },
            1,
        ),
        ("4:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ],
    ids=["none", "v2-max", "v2-1.5", "v2-0.5", "v2-parent", "v2-garbage", "v1-own-group", "v1-none"],
)
def test_quota_caps_the_affinity(tmp_path: Path, cgroup: str, files: dict[str, str], want: int | None) -> None:
    cores = len(os.sched_getaffinity(0))
    assert usable_cores(fake_root(tmp_path, cgroup, files)) == (cores if want is None else min(cores, want))


def test_no_proc_file_means_the_affinity(tmp_path: Path) -> None:
    assert usable_cores(tmp_path) == len(os.sched_getaffinity(0))
