"""Per-element cost of each method's merge pass on the CPU: the C (`engine.stats._fused`, one
call per block of the read buffers, as the executor makes it) at 1 and 2 threads, beside the eager
torch step (`apply` on 256K-element float32 chunks); of the two passes of SLERP and model stock
(statistics, then merge); and of the three top-k statistics passes of TIES and breadcrumbs, pass 1
also with the windows that spare pass 2 (C at 1 and 2 threads, torch). This is the CPU side of the
merge, measured apart from any I/O, so that two machines' figures say which part of a merge is
slow where.

`python -m bench.bench_steps [--models 3] [--repeats 9]` prints ns per *input* element (base and
every model count) *per thread* (so perfect scaling keeps it flat), the process's CPU ns per input
element (all threads: flat where the threads add no work, whatever cores the machine had free),
the speedup of 2 threads over 1, and the GB/s of bf16 input that this rate would sustain, and writes
`bench/results/steps-<UTC timestamp>.json` with the machine description. Inputs are bf16 in the
read buffer, as in a merge: the step includes the casts to float32 and back to bf16. Timings
alternate the thread counts and take medians: on a shared machine single runs swing by 2x.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from bench.common import BENCH, machine_info
from engine.budget import CHUNK_ELEMS
from engine.device import Mover
from engine.methods import steps
from engine.methods.base import Chunk, Method, Reducer, Stats, TensorParams
from engine.methods.registry import METHODS
from engine.rng import KeyedRng, stream_key
from engine.stats import pairwise, topk

ELEMENTWISE = ("linear", "task_arithmetic", "dare_linear", "dare_ties", "ties", "breadcrumbs_ties")
BLOCK_ELEMS = 1 << 22  # elements per stream of one C call: 8 MiB of bf16, a merge block
TWO_PASS = ("slerp", "model_stock")
TOP_K = ("ties", "breadcrumbs_ties")  # three statistics passes: the radix select of |delta|


def params_for(method: Method, k: int) -> TensorParams:
    """Realistic parameters: weights 1/k, density 0.1 (DARE drops 90%), gamma 0.01."""
    values = {"weight": 1.0 / k, "density": 0.1, "gamma": 0.01}
    per_model = {d.name: values[d.name] for d in method.params if d.per_model}
    globals_ = {d.name: d.default for d in method.params if not d.per_model}
    return TensorParams(globals_, tuple(dict(per_model) for _ in range(k)))


def bf16_family(k: int, n: int = CHUNK_ELEMS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """n elements of a base and k fine-tunes as the read buffers hold them (bfloat16)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    return base, [(base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(k)]


def whole_stats(method: Method, p: TensorParams, base: torch.Tensor, models: list[torch.Tensor]) -> Stats:
    """The method's statistics of the inputs as one tensor (its reducers, one chunk each)."""
    stats: Stats = {}
    c = Chunk((), 0, base.numel())
    for r in method.reducers(p):
        acc = r.start(p, stats, base.numel())
        r.chunk(acc, base.float(), [x.float() for x in models], p, stats, c)
        stats = {**stats, **r.finish(acc, p, stats)}
    return stats


def time_c(method: Method, k: int, repeats: int) -> dict[int, tuple[float, float]]:
    """Median wall and process CPU seconds of the C merge pass over one block, by thread count
    (alternating runs). The CPU seconds separate the work per element (flat when the threads add
    none) from the cores the machine had free (the wall time's speedup)."""
    base, models = bf16_family(k, BLOCK_ELEMS)
    p = params_for(method, k)
    program = method.steps(p, whole_stats(method, p, base, models), k)
    if program is None:
        raise ValueError(f"{method.name} writes no merge program")
    out = torch.empty(BLOCK_ELEMS, dtype=torch.bfloat16)
    keys = [stream_key(0, "bench", m) for m in range(k)]
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(repeats + 1):
        for threads in times:
            torch.set_num_threads(threads)
            t0, c0 = time.perf_counter(), time.process_time()
            steps.fused([base, *models], program, out, 1 << 40, keys)
            times[threads].append((time.perf_counter() - t0, time.process_time() - c0))
    return {
        t: (statistics.median(w for w, _ in v[1:]), statistics.median(c for _, c in v[1:])) for t, v in times.items()
    }


def cpu_mover(k: int) -> Mover:
    """The executor's CPU mover for a base and k models: the float32 copies its eager path makes."""
    return Mover([torch.empty(CHUNK_ELEMS) for _ in range(k + 1)], CHUNK_ELEMS)


def median_s(step: Callable[[], object], repeats: int) -> float:
    """Median seconds of `step` over `repeats` calls, after two unmeasured ones."""
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def time_two_pass(method: Method, k: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one chunk of the statistics pass and of the merge pass, each as the
    executor runs it: from the bf16 read buffers in C where `pairwise._fused` is set, else via
    float32 copies and torch ops."""
    base, models = bf16_family(k)
    p = params_for(method, k)
    (reducer,) = method.reducers(p)
    mover = cpu_mover(k)
    out = torch.empty(CHUNK_ELEMS, dtype=torch.bfloat16)
    c = Chunk((), 0, CHUNK_ELEMS)

    def statistics_pass() -> Any:
        acc = reducer.start(p, {}, CHUNK_ELEMS)
        if not reducer.raw_chunk(acc, [base, *models], p, {}, c):
            work = mover.to_work([base, *models], True)
            reducer.chunk(acc, work[0], work[1:], p, {}, c)
        return acc

    stats = reducer.finish(statistics_pass(), p, {})
    program = method.steps(p, stats, k)
    if program is None:
        raise ValueError(f"{method.name} writes no merge program")

    def merge_pass() -> None:
        if not steps.fused([base, *models], program, out):
            work = mover.to_work([base, *models], True)
            mover.store(method.apply(work[0], work[1:], p, stats, c), out)

    return median_s(statistics_pass, repeats), median_s(merge_pass, repeats)


def run_pass(r: Reducer, raw: list[torch.Tensor], p: TensorParams, stats: Stats, mover: Mover) -> Any:
    """One statistics pass over the block `raw` as the executor runs it: from the read buffers in C
    where the reducer can, else over float32 copies of the block's chunks with torch ops."""
    acc = r.start(p, stats, raw[0].numel())
    fold(r, acc, raw, p, stats, mover)
    return acc


def fold(r: Reducer, acc: Any, raw: list[torch.Tensor], p: TensorParams, stats: Stats, mover: Mover) -> None:
    """Fold the block `raw` into a pass's `acc`, as `run_pass` does."""
    n = raw[0].numel()
    if not r.raw_chunk(acc, raw, p, stats, Chunk((), 0, n)):
        for c0 in range(0, n, CHUNK_ELEMS):
            work = mover.to_work([x[c0 : c0 + CHUNK_ELEMS] for x in raw], True)
            r.chunk(acc, work[0], work[1:], p, stats, Chunk((), c0, n))


def time_top_k(method: Method, k: int, repeats: int, threads: int, n: int = BLOCK_ELEMS) -> list[float]:
    """Median seconds over one block of `n` elements on `threads` (the C where `pairwise._fused`
    is set, else torch) of: pass 1 as on every block after the first, counting its windows in the
    same sweep; then each statistics pass with no window (pass 2 runs only where the windows missed)."""
    base, models = bf16_family(k, n)
    raw, p, mover = [base, *models], params_for(method, k), cpu_mover(k)
    torch.set_num_threads(threads)
    first = method.reducers(p)[0]
    acc = run_pass(first, raw, p, {}, mover)  # the first block: the windows are guessed
    secs = [median_s(functools.partial(fold, first, acc, raw, p, {}, mover), repeats)]
    stats: Stats = {}
    window, topk.WINDOW = topk.WINDOW, 0
    try:
        for r in method.reducers(p):
            secs.append(median_s(functools.partial(run_pass, r, raw, p, stats, mover), repeats))
            stats = {**stats, **r.finish(run_pass(r, raw, p, stats, mover), p, stats)}
    finally:
        topk.WINDOW = window
    return secs


def time_step(method: Method, k: int, repeats: int) -> float:
    """Median seconds of one eager chunk step over `repeats` chunks at different positions."""
    base, models = bf16_family(k)
    mover = cpu_mover(k)
    out = torch.empty(CHUNK_ELEMS, dtype=torch.bfloat16)
    p = params_for(method, k)
    stats = whole_stats(method, p, base, models)
    streams = tuple(KeyedRng(stream_key(0, "bench", m)) for m in range(k))
    times = []
    for r in range(repeats + 2):  # two warm-up steps
        c = Chunk(streams, r * CHUNK_ELEMS, 1 << 40)
        t0 = time.perf_counter()
        work = mover.to_work([base, *models], True)
        mover.store(method.apply(work[0], work[1:], p, stats, c), out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


@click.command()
@click.option("--models", "k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(3), default=9, show_default=True)
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "results")
def main(k: int, repeats: int, results: Path) -> None:
    """Time every method's merge pass; print and save the table."""
    rows: list[dict[str, Any]] = []
    print(
        f"{'method':<16} {'kernel':<9} {'threads':>7} {'ns/elem/thread':>15} {'CPU ns':>8} {'2 vs 1':>7} {'GB/s bf16':>10}"
    )
    for name in ELEMENTWISE if pairwise._fused is not None else ():
        secs = time_c(METHODS[name], k, repeats)
        for threads, (sec, cpu) in secs.items():
            ns = sec * threads / (BLOCK_ELEMS * (k + 1)) * 1e9
            cpu_ns = cpu / (BLOCK_ELEMS * (k + 1)) * 1e9
            speedup = secs[1][0] / sec
            rows.append(
                {
                    "method": name,
                    "kernel": "C",
                    "threads": threads,
                    "ns_per_input_elem_thread": ns,
                    "cpu_ns_per_input_elem": cpu_ns,
                    "speedup": speedup,
                }
            )
            print(
                f"{name:<16} {'C':<9} {threads:>7} {ns:>15.3f} {cpu_ns:>8.3f} {speedup:>7.2f} {2 * threads / ns:>10.2f}"
            )
    torch.set_num_threads(1)
    for name in ELEMENTWISE:
        sec = time_step(METHODS[name], k, repeats)
        ns = sec / (CHUNK_ELEMS * (k + 1)) * 1e9
        rows.append({"method": name, "kernel": "eager", "threads": 1, "ns_per_input_elem_thread": ns})
        print(f"{name:<16} {'eager':<9} {1:>7} {ns:>15.3f} {'':>8} {'':>7} {2 / ns:>10.2f}")
    torch.set_num_threads(1)  # the C runs on the executor's one main thread: torch on one too, like for like
    kernels = [("C", pairwise._fused)] if pairwise._fused is not None else []
    print(f"\n{'two passes':<16} {'kernel':<9} {'models':>7} {'stats ns/elem':>14} {'merge ns/elem':>14}")
    for name in TWO_PASS:
        m = 1 if name == "slerp" else k
        for kind, module in [*kernels, ("torch", None)]:
            pairwise._fused = module  # None: the torch path, as where the C was not built
            try:
                secs = time_two_pass(METHODS[name], m, repeats)
            finally:
                pairwise._fused = kernels[0][1] if kernels else None
            per_elem = [sec / (CHUNK_ELEMS * (m + 1)) * 1e9 for sec in secs]
            for pass_, v in zip(("statistics", "merge"), per_elem):
                rows.append({"method": name, "pass": pass_, "kernel": kind, "threads": 1, "ns_per_input_elem": v})
            print(f"{name:<16} {kind:<9} {m:>7} {per_elem[0]:>14.2f} {per_elem[1]:>14.2f}")
    print(f"\n{'top-k passes':<16} {'kernel':<9} {'threads':>7} {'ns/elem/thread, 1+window, 1 2 3':>38}")
    runs = [("C", pairwise._fused, 1), ("C", pairwise._fused, 2)] if pairwise._fused is not None else []
    for name in TOP_K:
        for kind, module, threads in [*runs, ("torch", None, 1)]:
            pairwise._fused = module
            try:
                passes = time_top_k(METHODS[name], k, repeats, threads)
            finally:
                pairwise._fused = runs[0][1] if runs else None
            per_elem = [sec * threads / (BLOCK_ELEMS * (k + 1)) * 1e9 for sec in passes]
            for label, v in zip(("top-k 1 with window", "top-k 1", "top-k 2", "top-k 3"), per_elem):
                rows.append(
                    {
                        "method": name,
                        "pass": label,
                        "kernel": kind,
                        "threads": threads,
                        "ns_per_input_elem_thread": v,
                    }
                )
            print(f"{name:<16} {kind:<9} {threads:>7} {'  '.join(f'{v:7.3f}' for v in per_elem):>38}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"steps-{stamp}.json"
    path.write_text(
        json.dumps({"machine": machine_info(), "models": k, "chunk_elems": CHUNK_ELEMS, "rows": rows}, indent=2)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
