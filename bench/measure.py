"""Run one command and report its wall time and peak RSS, from a lean launcher process.

Why a launcher: on Linux a child's `ru_maxrss` (from `wait4`) includes the high-water RSS of
the process image it replaced at `exec`, and `subprocess` spawns through `vfork`, so that image
is the *parent's*. A runner that imported torch or generated models (hundreds of MiB) would make
every child look at least that big. Measuring from this small stdlib-only process, started
fresh per command, keeps the floor at ~10 MiB. Its report carries that floor (`launcher_rss`,
the launcher's own VmHWM: its `ru_maxrss` is inflated by the runner for the same reason).

Usage (what `bench.common` does): `python -m bench.measure RESULT.json STDOUT STDERR -- CMD...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def measure(cmd: list[str], stdout: Path, stderr: Path, cwd: Path | None = None) -> dict[str, float | int]:
    """Run `cmd` to completion; return wall seconds, peak RSS bytes, CPU seconds and exit code.

    Output goes to files, not pipes: `wait4` does not drain pipes, so a chatty child would block.
    """
    with stdout.open("wb") as out, stderr.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
    return {
        "wall_s": wall,
        "peak_rss": usage.ru_maxrss * 1024,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "returncode": proc.returncode,
        "launcher_rss": own_hwm(),
    }


def own_hwm() -> int:
    """This process's peak RSS since its exec (VmHWM, per address space), in bytes; 0 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def main(argv: list[str]) -> int:
    """`RESULT STDOUT STDERR -- CMD...`: measure CMD and write the figures to RESULT as JSON."""
    if len(argv) < 5 or argv[3] != "--":
        print("usage: python -m bench.measure RESULT.json STDOUT STDERR -- CMD...", file=sys.stderr)
        return 2
    result = measure(argv[4:], Path(argv[1]), Path(argv[2]))
    Path(argv[0]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
