"""Merge throughput on a local Dask cluster of 1, 2 and 4 worker processes, beside the local
executor, and each worker's peak RSS beside its budget (`--max-memory` is per worker).

    python -m bench.bench_dask [--cache DIR] [--budget 2GiB]

Each run is `leanmerge merge` in a fresh process (inputs dropped from the page cache first); its
report gives the merge's wall time without the cluster's start, its `workers` event each worker's
high-water RSS. The disk's cold read limit (`bench.common.read_limit`) is measured beside them:
where the workers share one disk, it and not their number sets the speed. JSON into bench/results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH,
    GB,
    drop_from_page_cache,
    last_event,
    machine_info,
    read_limit,
    run_leanmerge,
    scratch_dir,
)
from engine.budget import parse_bytes
from tools.make_synthetic import SyntheticShape, make_family

SHAPE = SyntheticShape(hidden=2048, intermediate=5632, layers=8, vocab=32000, heads=32, kv_heads=4)  # ~1 GB per model
EXECUTORS: list[list[str]] = [[], *(["--executor", "dask", "--workers", str(n)] for n in (1, 2, 4))]


def run(base: Path, models: list[Path], root: Path, executor: list[str], budget: str) -> dict[str, Any]:
    """One cold dare_ties merge; its throughput and the RSS of the driver and of each worker."""
    drop_from_page_cache([base, *models])
    out = scratch_dir(root)
    args = ["--method", "dare_ties", "--base", str(base), *(a for m in models for a in ("--model", f"{m}:0.5")),
            "--density", "0.5", "--max-memory", budget, "-o", str(out / "merged"), *executor]  # fmt: skip
    figures = run_leanmerge(args, out / "log.jsonl")
    report, workers = figures["report"], last_event(out / "log.jsonl", "workers")
    return {
        "executor": " ".join(executor) or "local",
        "merge_wall_s": report["wall_s"],
        "command_wall_s": figures["wall_s"],
        "read_gbps": report["read_gbps"],
        "bytes_read": report["bytes_read"],
        "driver_peak_rss": figures["peak_rss"],
        "predicted_peak_rss_per_process": report["predicted_peak_rss"],
        "budget_per_process": report["budget"],
        "worker_peak_rss": sorted(workers["peak_rss"].values()) if workers else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=BENCH / "cache" / "dask")
    ap.add_argument("--budget", default="2GiB", help="--max-memory (per worker with Dask)")
    opts = ap.parse_args()
    parse_bytes(opts.budget)
    family = opts.cache / "family"
    if not (family / "ft2").exists():
        make_family(family, SHAPE, n_models=2)
    base, models = family / "base", [family / "ft1", family / "ft2"]
    runs = [run(base, models, opts.cache, ex, opts.budget) for ex in EXECUTORS]
    result = {
        "bench": "dask",
        "when": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine_info(opts.cache),
        "note": "2-core VM shared with other jobs (load average ~10 during the runs): figures are under load",
        "disk_read_limit_gbps": read_limit([base, *models]),
        "input_gb": sum(r["bytes_read"] for r in runs[:1]) / GB,
        "runs": runs,
    }
    out = BENCH / "results" / f"dask-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(f"{r['executor']:<28} {r['read_gbps']:.2f} GB/s  worker peak RSS {r['worker_peak_rss']}")
    print(f"disk read limit {result['disk_read_limit_gbps']:.2f} GB/s -> {out}")


if __name__ == "__main__":
    main()
