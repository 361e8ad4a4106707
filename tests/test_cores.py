"""The merge's default threads: the cores this process may use, capped by its cgroup's quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.cores import usable_cores


@pytest.mark.parametrize(
    ("v2", "v1", "want"),
    [
        (None, None, None),  # no cgroup files: the affinity
        ("max 100000\n", None, None),
        ("150000 100000\n", None, 2),  # 1.5 CPUs of quota: 2 threads
        ("50000 100000\n", None, 1),
        (None, ("100000", "100000"), 1),  # cgroup v1
        (None, ("-1", "100000"), None),
        ("garbage", None, None),
    ],
)
def test_quota_caps_the_affinity(tmp_path: Path, v2: str | None, v1: tuple[str, str] | None, want: int | None) -> None:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    cores = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (cores if want is None else min(cores, want))
