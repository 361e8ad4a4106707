"""TIES on tensors larger than the budget: exact out-of-core top-k vs the whole tensor in memory.

Base + 1 fine-tune of the "llama70b-layer" preset (128256 x 8192 bf16 embedding and lm_head,
2.1 GB each; ~12 GB of inputs). leanmerge runs `ties` (density 0.2) under `--max-memory 1GiB`: its
trim threshold takes three extra read passes over each multi-block tensor. Next to it, in the same
run: the same merge by the naive whole-tensor baseline (`bench/naive_merge.py`, torch.kthvalue on
the whole |delta|), and leanmerge's `task_arithmetic` on the same files as the single-pass cost.
Caches are dropped before each run.

`python -m bench.bench_ties [--cache DIR]` writes `bench/results/ties-<UTC timestamp>.json`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import click

from bench.common import BENCH, RunFailed, drop_from_page_cache, machine_info, run_leanmerge, run_naive, scratch_dir
from bench.families import ensure_family
from bench.report import fmt_bytes


def one(kind: str, method: str, fam: Any, work: Path) -> dict[str, Any]:
    """Run one cold merge and return its figures (or the error)."""
    out = work / f"{kind}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    drop_from_page_cache([fam.base, *fam.models])
    models = [str(m) for m in fam.models]
    try:
        if kind == "naive":
            r = run_naive(method, fam.base, fam.models, out, {"density": 0.2})
        else:
            args = ["--method", method, "--base", str(fam.base), *(a for m in models for a in ("--model", m))]
            args += ["--max-memory", "1GiB", "-o", str(out)] + (["--density", "0.2"] if method == "ties" else [])
            r = run_leanmerge(args, work / f"{kind}-{method}.jsonl")
    except RunFailed as e:
        return {"tool": kind, "method": method, "error": str(e)[-500:]}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"tool": kind, "method": method, "wall_s": r["wall_s"], "peak_rss": r["peak_rss"]}


@click.command()
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "cache")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "results")
def main(cache: Path, results: Path) -> None:
    """Run the three merges and print their wall time and peak RSS."""
    fam = ensure_family(cache, "llama70b-layer", n_models=1)
    work = scratch_dir(cache)
    runs = [
        one("leanmerge", "ties", fam, work),
        one("leanmerge", "task_arithmetic", fam, work),
        one("naive", "ties", fam, work),
    ]
    shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        what = r.get("error") or f"wall {r['wall_s']:.1f} s, peak RSS {fmt_bytes(r['peak_rss'])}"
        print(f"{r['tool']:<10} {r['method']:<16} {what}")
    if "error" not in runs[0] and "error" not in runs[1]:
        print(f"ties / single pass (task_arithmetic) wall time: {runs[0]['wall_s'] / runs[1]['wall_s']:.2f}x")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"ties-{stamp}.json"
    path.write_text(
        json.dumps({"machine": machine_info(cache), "input_bytes": fam.input_bytes, "runs": runs}, indent=2)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
