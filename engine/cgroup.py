"""This process's cgroups: the one reader of `/proc/self/cgroup` and the controller files above it.

A limit set on any group above this process binds it, so every reader walks from the process's own
group up to the mount's root: in a container whose cgroup namespace hides the path, the walk ends
at the mount's root file, which is the container's own limit. The budget (memory limit) and the
default thread count (CPU quota) read their files through `group_dirs`, so both see the same
groups for cgroup v2, v1, and v1 beside a "unified" v2 mount.
"""

from __future__ import annotations

from pathlib import Path

SYSTEM_ROOT = Path("/")  # where /proc and /sys are read from (tests point it at fakes)


def group_dirs(controller: str, root: Path | None = None) -> list[tuple[int, Path]]:
    """(cgroup version, folder) for every group from this process's own up to the root that may
    hold `controller`'s files ("memory", "cpu"), deepest first; [] without /proc/self/cgroup."""
    root = root or SYSTEM_ROOT
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    mounts = root / "sys/fs/cgroup"
    found: list[tuple[int, Path]] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and not controllers:  # v2, mounted alone or as "unified" beside v1
            found += [(2, d) for d in _dirs_up([mounts, mounts / "unified"], path)]
        elif controller in controllers.split(","):
            found += [(1, d) for d in _dirs_up([mounts / controller], path)]
    return found


def _dirs_up(mounts: list[Path], path: str) -> list[Path]:
    """The folders of the group at `path` and of every group above it, under each mount that exists."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:depth]) for mount in mounts for depth in range(len(parts), -1, -1)]


def read_text(folder: Path, name: str) -> str | None:
    """The stripped text of `folder/name`, or None where it cannot be read."""
    try:
        return (folder / name).read_text().strip()
    except (OSError, ValueError):
        return None
