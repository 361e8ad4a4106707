"""Per-element cost of one chunk step of each elementwise method: eager torch vs torch.compile,
1 and 2 threads; and of the two passes of SLERP and model stock (statistics, then merge), in C
(`engine.stats._fused`, where built) and in torch. This is the CPU side of the merge, measured
apart from any I/O, so that two machines' figures say which part of a merge is slow where.

`python -m bench.bench_steps [--models 3] [--repeats 9]` prints ns per *input* element (base and
every model count) and the GB/s of bf16 input that this rate would sustain, and writes
`bench/results/steps-<UTC timestamp>.json` with the machine description. Inputs are bf16 chunks
of 256K elements in the read buffer, as in a merge: the step includes the casts to float32 and
back to bf16.
"""

from __future__ import annotations

import datetime as dt
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
from engine.kernels import CompiledApply
from engine.methods import steps
from engine.methods.base import Chunk, Method, TensorParams
from engine.methods.registry import METHODS
from engine.rng import KeyedRng, stream_key
from engine.stats import pairwise

ELEMENTWISE = ("linear", "task_arithmetic", "dare_linear", "dare_ties")
TWO_PASS = ("slerp", "model_stock")


def params_for(method: Method, k: int) -> TensorParams:
    """Realistic parameters: weights 1/k, density 0.1 (DARE drops 90%)."""
    per_model = {d.name: (1.0 / k if d.name == "weight" else 0.1) for d in method.params if d.per_model}
    globals_ = {d.name: d.default for d in method.params if not d.per_model}
    return TensorParams(globals_, tuple(dict(per_model) for _ in range(k)))


def bf16_family(k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One chunk of a base and k fine-tunes as the read buffers hold them (bfloat16)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(CHUNK_ELEMS, generator=g).to(torch.bfloat16)
    return base, [(base.float() + 0.01 * torch.randn(CHUNK_ELEMS, generator=g)).to(torch.bfloat16) for _ in range(k)]


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


def time_step(method: Method, k: int, compiled: bool, repeats: int) -> float:
    """Median seconds of one chunk step over `repeats` chunks at different positions."""
    base, models = bf16_family(k)
    mover = cpu_mover(k)
    out = torch.empty(CHUNK_ELEMS, dtype=torch.bfloat16)
    p = params_for(method, k)
    streams = tuple(KeyedRng(stream_key(0, "bench", m)) for m in range(k))
    kernel = CompiledApply(method) if compiled else None
    times = []
    for r in range(repeats + 2):  # two warm-up steps (the first compiles)
        c = Chunk(streams, r * CHUNK_ELEMS, 1 << 40)
        t0 = time.perf_counter()
        if kernel is None or not kernel.run(base, models, p, {}, c, out):
            work = mover.to_work([base, *models], True)
            mover.store(method.apply(work[0], work[1:], p, {}, c), out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


@click.command()
@click.option("--models", "k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(3), default=9, show_default=True)
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "results")
def main(k: int, repeats: int, results: Path) -> None:
    """Time every elementwise method's chunk step; print and save the table."""
    rows: list[dict[str, Any]] = []
    print(f"{'method':<16} {'kernel':<9} {'threads':>7} {'ns/elem':>8} {'GB/s bf16':>10}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name in ELEMENTWISE:
            for compiled in (False, True):
                sec = time_step(METHODS[name], k, compiled, repeats)
                ns = sec / (CHUNK_ELEMS * (k + 1)) * 1e9
                rows.append({"method": name, "compiled": compiled, "threads": threads, "ns_per_input_elem": ns})
                kind = "compiled" if compiled else "eager"
                print(f"{name:<16} {kind:<9} {threads:>7} {ns:>8.2f} {2 / ns:>10.2f}")
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
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"steps-{stamp}.json"
    path.write_text(
        json.dumps({"machine": machine_info(), "models": k, "chunk_elems": CHUNK_ELEMS, "rows": rows}, indent=2)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
