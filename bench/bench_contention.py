"""A merge beside busy neighbours: each method alone, beside N CPU-bound neighbours (`yes`, N = the
cores this process may use) and beside one that reads a large file, in one run, as ratios to the
quiet run. Shared servers are one of the uses this project exists for: there a merge should slow
down about as much as its share of the cores shrinks, and burn no more CPU than alone (issue 33's
targets: at most 3x the wall time, at most 1.3x the user CPU-seconds).

`python -m bench.bench_contention FAMILY [--method ties --method dare_ties] [--repeats 2]` merges
FAMILY/base with FAMILY/ft1, FAMILY/ft2 (slerp: ft1; passthrough: the base alone;
`tools.make_synthetic` writes such a folder), every method unless `--method` names some, prints
median wall and CPU seconds per setting with the ratios, and writes
`bench/results/contention-<UTC timestamp>.json`. Settings alternate within each repeat, so a
machine whose load drifts (other jobs) hits all of them alike.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from bench.common import BENCH, machine_info

SETTINGS = ("alone", "busy", "reader")
ALL_METHODS = (
    "linear",
    "task_arithmetic",
    "dare_linear",
    "dare_ties",
    "ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "model_stock",
    "passthrough",
)
MODELS = {"slerp": ("ft1",), "passthrough": ()}  # the fine-tunes a method takes, where not two


def usable_cores() -> int:
    """The CPUs this process may run on (its own, so that it also runs beside an older engine)."""
    return len(os.sched_getaffinity(0))


def neighbours(setting: str, read_file: Path) -> list[subprocess.Popen[bytes]]:
    """Start the neighbours of a setting: N `yes`, or one reader of `read_file` in a loop."""
    if setting == "busy":
        return [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(usable_cores())]
    if setting == "reader":
        loop = f"while true; do cat {read_file} > /dev/null; done"
        return [subprocess.Popen(["sh", "-c", loop], start_new_session=True)]
    return []


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def one_merge(family: Path, method: str, setting: str, scratch: Path) -> tuple[float, float, float]:
    """(wall, user, system) seconds of one `leanmerge merge` of `family` beside `setting`'s neighbours."""
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "engine.cli", "merge", "--base", str(family / "base")]
    cmd += [a for m in MODELS.get(method, ("ft1", "ft2")) for a in ("--model", str(family / m))]
    cmd += ["--method", method, "--density", "0.5", "--buffered-io", "-o", str(out)]
    procs = neighbours(setting, family / "ft1" / "model.safetensors")
    try:
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        stop(procs)  # their own CPU is counted once reaped: take the merge's before that
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


@click.command()
@click.argument("family", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--method", "methods", multiple=True, default=ALL_METHODS, help="Repeat; default: every method.")
@click.option("--repeats", type=click.IntRange(1), default=2, show_default=True)
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "results")
def main(family: Path, methods: tuple[str, ...], repeats: int, results: Path) -> None:
    """Time each method alone and beside neighbours; print and save the ratios."""
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="leanmerge-contention-") as tmp:
        for _ in range(repeats):
            for method in methods:
                for setting in SETTINGS:
                    runs.setdefault((method, setting), []).append(one_merge(family, method, setting, Path(tmp)))
    rows: list[dict[str, Any]] = []
    print(f"{'method':<12} {'setting':<8} {'wall s':>7} {'user s':>7} {'sys s':>6} {'wall x':>7} {'user x':>7}")
    for method in methods:
        alone = [statistics.median(v) for v in zip(*runs[(method, "alone")])]
        for setting in SETTINGS:
            wall, user, sys_s = (statistics.median(v) for v in zip(*runs[(method, setting)]))
            row = {"method": method, "setting": setting, "wall_s": wall, "user_s": user, "sys_s": sys_s}
            row |= {"wall_ratio": wall / alone[0], "user_ratio": user / alone[1] if alone[1] else None}
            rows.append(row)
            user_x = f"{user / alone[1]:>7.2f}" if alone[1] else f"{'-':>7}"
            print(f"{method:<12} {setting:<8} {wall:>7.1f} {user:>7.1f} {sys_s:>6.1f} {wall / alone[0]:>7.2f} {user_x}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"contention-{stamp}.json"
    summary = {"machine": machine_info(), "family": str(family), "neighbours": usable_cores(), "rows": rows}
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
