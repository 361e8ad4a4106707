"""The benchmark sections: peak RSS against the budget, peak RSS against model size, throughput.

Each section returns a JSON-ready dict whose `runs` list holds one entry per (tool, method,
setting), every figure as `stats` of the repeats (min / median / max). A run that fails is kept
as an entry with an `error` (a benchmark that stops at the first failure hides the rest), and
a size or baseline that cannot run here (disk, RAM, not installed) is listed under `skipped`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import GB, RunFailed, drop_from_page_cache, read_hot, read_limit, stats, warm_page_cache
from bench.families import (
    Family,
    ensure_family,
    fits_on_disk,
    input_bytes,
    method_models,
    naive_fits,
    run_tool,
)

log = logging.getLogger("bench")
GiB = 1 << 30
MiB = 1 << 20
BUDGETS = (512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB)
SIZE_BUDGET = 1 * GiB
BUDGET_METHODS = ("task_arithmetic", "dare_ties", "ties")  # ties only once it is registered
SIZE_METHODS = ("task_arithmetic",)
BASELINES = ("naive", "mergekit")
WARM_RAM_SHARE = 0.6  # a warm run needs the inputs in page cache: skip it when they would not fit
SECTIONS = ("rss_vs_budget", "rss_vs_size", "throughput")
CACHES = ("cold", "warm")


@dataclass(frozen=True)
class Settings:
    """What one benchmark invocation measures."""

    cache: Path
    repeats: int
    family: str  # preset of the family for rss_vs_budget and throughput
    sizes: tuple[str, ...]  # presets for rss_vs_size, smallest first
    methods: tuple[str, ...] | None = None  # None: every registered method
    budgets: tuple[int, ...] = BUDGETS
    size_budget: int = SIZE_BUDGET
    n_models: int = 3
    caches: tuple[str, ...] = CACHES  # page-cache states the throughput section measures
    baselines: tuple[str, ...] = BASELINES  # the other tools measured beside leanmerge
    scratch: Path | None = None  # where merge outputs go; None: inside `cache`, the inputs' disk

    @property
    def outputs(self) -> Path:
        return self.scratch or self.cache

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if set(self.baselines) - set(BASELINES):
            raise ValueError(f"baselines must be among {', '.join(BASELINES)}, got {self.baselines}")
        if set(self.caches) - set(CACHES) or not self.caches:
            raise ValueError(f"caches must be among {', '.join(CACHES)}, got {self.caches}")

    def registered(self, wanted: Sequence[str] | None = None) -> list[str]:
        """Registered methods (read now, so new ones are picked up) among `wanted`, narrowed to
        `--methods`; when none of `wanted` is in `--methods`, those of `--methods` instead."""
        from engine.methods.registry import METHODS

        names = [m for m in (wanted or sorted(METHODS)) if m in METHODS]
        if self.methods is None:
            return names
        return [m for m in names if m in self.methods] or [m for m in self.methods if m in METHODS]


def figures(results: Sequence[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    """Every figure of the repeats as stats. GB/s use the tool's own wall time when it reports
    one (leaving out interpreter start and `import torch`); `*_process` figures include them."""
    inner = [r["report"]["wall_s"] if r.get("report") else r["wall_s"] for r in results]
    out = {
        "peak_rss": stats([r["peak_rss"] for r in results]),
        "wall_s": stats(inner),
        "wall_s_process": stats([r["wall_s"] for r in results]),
        "cpu_s": stats([r["cpu_s"] for r in results]),
        "gbps": stats([nbytes / w / GB for w in inner]),
        "gbps_process": stats([nbytes / r["wall_s"] / GB for r in results]),
        "launcher_rss": max(r["launcher_rss"] for r in results),
    }
    reports = [r["report"] for r in results if r.get("report") and "peak_rss" in r["report"]]
    if reports:  # leanmerge's own view, to compare with the kernel's
        out["engine_peak_rss"] = stats([r["peak_rss"] for r in reports])
        out["predicted_peak_rss"] = reports[-1]["predicted_peak_rss"]
        # Everything the disk moved: the output competes with the inputs for the same disk.
        out["disk_gbps"] = stats([(r["bytes_read"] + r["bytes_written"]) / r["wall_s"] / GB for r in reports])
    return out


def measure(
    s: Settings,
    tool: str,
    family: Family,
    method: str,
    *,
    budget: int | None = None,
    io: str = "direct",
    before: Callable[[], float | None] | None = None,
    **labels: Any,
) -> dict[str, Any] | None:
    """`s.repeats` measured runs summarised as one entry; None if the tool cannot run `method`.

    leanmerge entries also say how it read.
    `before` runs before each repeat; the read limits (GB/s) it returns, if any, are kept as
    `read_limit_gbps` (the disk's speed just before each run) and each run's GB/s over the limit
    read just before it as `ratio_before`.
    """
    entry = {"tool": tool, "method": method, "preset": family.preset, "budget": budget, **labels}
    if tool == "leanmerge":
        entry |= {"io": io}
    entry["input_bytes"] = inputs = input_bytes(family, method)
    where = "".join(f", {k} {v}" for k, v in labels.items()) + (f", --max-memory {budget >> 20} MiB" if budget else "")
    log.info("%s %s on %s%s", tool, method, family.preset, where)
    results = []
    limits: list[float] = []
    load = 0.0  # others' work on a shared machine shows up here before it skews a figure
    try:
        for _ in range(s.repeats):
            if before is not None and (got := before()) is not None:
                limits.append(got)
            load = max(load, os.getloadavg()[0])
            r = run_tool(tool, family, method, s.outputs, budget, io)
            if r is None:
                return None
            results.append(r)
    except RunFailed as e:
        return {**entry, "error": str(e)}
    out = {**entry, **figures(results, inputs), "loadavg_1m_max": load}
    if limits:
        out["read_limit_gbps"] = stats(limits)
        out["ratio_before"] = stats([g / lim for g, lim in zip(out["gbps"]["values"], limits)])
    return out


def baselines(
    s: Settings,
    family: Family,
    method: str,
    skipped: list[dict[str, Any]],
    *,
    before: Callable[[], float | None] | None = None,
    **labels: Any,
) -> list[dict[str, Any]]:
    """The naive (and mergekit, if installed) entries for `method`, unless they would not fit in RAM
    (mergekit is guarded by the naive estimate: it too holds whole tensors)."""
    ok, why = naive_fits(family, method)
    if not ok:
        skipped += [
            {"tool": t, "method": method, "preset": family.preset, "reason": why, **labels} for t in s.baselines
        ]
        return []
    out = []
    for tool in s.baselines:
        e = measure(s, tool, family, method, before=before, **labels)
        if e is None:
            skipped.append(
                {"tool": tool, "method": method, "preset": family.preset, "reason": "not available", **labels}
            )
        else:
            out.append(e)
    return out


def mergeable(family: Family, methods: Sequence[str], skipped: list[dict[str, Any]]) -> list[str]:
    """`methods` that merge fine-tunes; any other (passthrough: its run is a copy of the base, with
    nothing to merge) is listed in `skipped` instead."""
    out = []
    for m in methods:
        if method_models(family, m):
            out.append(m)
        else:
            skipped.append({"tool": "all", "method": m, "preset": family.preset, "reason": "it takes no fine-tunes"})
    return out


def rss_vs_budget(s: Settings) -> dict[str, Any]:
    """Peak RSS of each method at each `--max-memory`, and whether it stayed under; naive for scale."""
    fam = ensure_family(s.cache, s.family, s.n_models)
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    methods = mergeable(fam, s.registered(BUDGET_METHODS), skipped)
    for method in methods:
        for budget in s.budgets:
            e = measure(s, "leanmerge", fam, method, budget=budget)
            if e is not None and "error" not in e:
                e["within_budget"] = e["peak_rss"]["max"] <= budget
            runs += [e] if e is not None else []
        runs += baselines(s, fam, method, skipped)
    return {
        "preset": fam.preset,
        "input_bytes": fam.input_bytes,
        "runs": runs,
        "skipped": skipped,
    }


def rss_vs_size(s: Settings) -> dict[str, Any]:
    """Peak RSS at one budget as the models grow: leanmerge's line should stay flat, naive's climb."""
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for preset in s.sizes:
        ok, why = fits_on_disk(s.cache, preset, s.n_models)
        if not ok:
            skipped.append({"tool": "all", "preset": preset, "reason": why})
            continue
        fam = ensure_family(s.cache, preset, s.n_models)
        for method in mergeable(fam, s.registered(SIZE_METHODS), skipped):
            e = measure(s, "leanmerge", fam, method, budget=s.size_budget)
            runs += [e] if e is not None else []
            runs += baselines(s, fam, method, skipped)
    return {"budget": s.size_budget, "runs": runs, "skipped": skipped}


def throughput(s: Settings) -> dict[str, Any]:
    """GB/s of input per method and tool, cold and warm, next to this disk's read limit.

    The read limit is measured up front and again before every cold run, and every `ratio` is
    over the fastest of those reads: this VM's disk swings between 0.5 and 1.5 GB/s from one
    minute to the next (slowest just after a merge wrote its output), and the fastest read is the
    one limit no run can blame on a slow spell. Cold runs read with O_DIRECT (the default), warm ones with
    `--buffered-io`, as a user whose inputs sit in the page cache would (direct reads bypass the
    cache, so warm would equal cold).
    """
    fam = ensure_family(s.cache, s.family, s.n_models)
    limit = stats([read_limit(fam.files) for _ in range(s.repeats)])
    warm_ok = fam.input_bytes <= WARM_RAM_SHARE * psutil.virtual_memory().available
    warm = "warm" in s.caches and warm_ok
    hot = stats([read_hot(fam.files) for _ in range(s.repeats)]) if warm else None

    def cold() -> float:
        limit = read_limit(fam.files)  # leaves the files cached: drop them again
        drop_from_page_cache(fam.folders)
        return limit

    prepares: dict[str, Callable[[], float | None]] = {"cold": cold, "warm": lambda: warm_page_cache(fam.files)}
    states = {k: f for k, f in prepares.items() if k in s.caches and (k != "warm" or warm)}
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if "warm" in s.caches and not warm_ok:
        skipped.append({"tool": "all", "cache": "warm", "reason": "inputs larger than the page cache can hold"})
    for method in mergeable(fam, s.registered(), skipped):
        for state, prepare in states.items():
            entries = [
                measure(
                    s,
                    "leanmerge",
                    fam,
                    method,
                    budget=s.size_budget,
                    before=prepare,
                    cache=state,
                    io="buffered" if state == "warm" else "direct",
                )
            ]
            entries += baselines(s, fam, method, skipped, before=prepare, cache=state)
            runs += [e for e in entries if e is not None]
    reads = limit["values"] + [v for r in runs for v in r.get("read_limit_gbps", {}).get("values", [])]
    for e in runs:
        if "error" not in e:
            e["ratio"] = stats([g / max(reads) for g in e["gbps"]["values"]])
        if "disk_gbps" in e:
            e["disk_ratio"] = stats([g / max(reads) for g in e["disk_gbps"]["values"]])
    return {
        "preset": fam.preset,
        "input_bytes": fam.input_bytes,
        "read_limit_gbps": limit,
        "read_limit_all_gbps": stats(reads),
        "read_hot_gbps": hot,
        "scratch": str(s.scratch) if s.scratch else None,  # outputs off the inputs' disk
        "runs": runs,
        "skipped": skipped,
    }


RUNNERS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "rss_vs_budget": rss_vs_budget,
    "rss_vs_size": rss_vs_size,
    "throughput": throughput,
}
