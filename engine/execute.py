"""Run a plan: a reader thread fills block buffers, the compute stage merges them chunk by chunk,
and the writer puts each merged block at its offset.

Buffers are allocated once, sized by the plan's `MemoryPlan`, and reused for every block:
`depth` sets of input buffers circulate between the reader thread and the compute stage through
two queues, so reading block k+1 overlaps merging block k. Within a block the compute stage works
on chunks through a fixed float32 workspace: cache-sized on the CPU, because the arithmetic is
memory-bound, and large on a GPU, where a `Mover` (engine.device) stages them to the device.

A method with reducers gets one extra pass over the tensor's blocks per reducer before the apply
pass, but for a last one that folds each block just before it is merged (TIES' tie pass); a
tensor that fits in one block is read once and kept for all its passes, and so is one the plan
holds resident (read once into a buffer on the compute device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

from engine.device import on_device
from engine.io.checkpoint import BUFFERED, ReadOptions
from engine.io.inventory import Inventory
from engine.io.write_behind import WriteBehind
from engine.methods.base import Stats
from engine.pipeline import Pipeline
from engine.plan import Block, Plan, TensorPlan
from engine.prefetch import InputCheck, Prefetcher
from engine.stage import Event, OnEvent, Stage
from engine.stats import pairwise
from engine.vocab import open_streams

__all__ = ["Event", "OnEvent", "Pipeline", "execute", "execute_rows", "first_rows", "read_schedule", "tensor_stats"]


def first_rows(plan: Plan, rows_done: Mapping[str, int]) -> dict[str, int]:
    """Where each tensor starts given rows an earlier run wrote: done tensors at their end, a
    tensor that fits one block from 0 (rewriting one block is cheaper than tracking it)."""
    out = {}
    for t in plan.tensors:
        done = rows_done.get(t.name, 0)
        out[t.name] = t.rows if done >= t.rows else (done if t.n_blocks > 1 else 0)
    return out


def read_schedule(plan: Plan, start: Mapping[str, int]) -> Iterator[tuple[TensorPlan, Block]]:
    """Every block read, in order: each reduce pass that scans (`TensorPlan.scans`) reads all
    blocks of a tensor, the apply pass those from its first unwritten row; a tensor that fits one
    block is read once, and so is a resident one (all of it, for its statistics)."""
    for tensor in plan.tensors:
        first = start.get(tensor.name, 0)
        if tensor.numel == 0 or first >= tensor.rows:
            continue
        if not tensor.read_once:
            for _ in range(tensor.scans(first)):
                yield from ((tensor, b) for b in tensor.blocks())
        yield from ((tensor, b) for b in tensor.blocks(0 if tensor.resident else first))


def execute(
    plan: Plan,
    inv: Inventory,
    out: WriteBehind,
    pipe: Pipeline,
    *,
    start: Mapping[str, int] | None = None,
    on_event: OnEvent | None = None,
    reading: ReadOptions = BUFFERED,
    should_stop: Callable[[], bool] = lambda: False,
) -> bool:
    """Merge the tensors of `plan` into `out`, reading from `inv`.

    Args:
        start: first row to write per tensor (from `first_rows`, when resuming).
        should_stop: polled after every block; when it turns true the run stops there.
    Returns:
        True when every tensor is written, False when stopped early.
    """
    emit = on_event or (lambda e: None)
    start = start or {}
    scans = {t.name: t.scans(start.get(t.name, 0)) for t in plan.tensors}
    with _staged(plan, inv, out, pipe, read_schedule(plan, start), reading, emit, scans) as stage:
        for tensor in plan.tensors:
            first = start.get(tensor.name, 0)
            if tensor.numel and first < tensor.rows and not stage.run_tensor(tensor, first, should_stop):
                return False
            emit({"event": "tensor", "name": tensor.name})
    return True


def tensor_stats(
    plan: Plan, inv: Inventory, pipe: Pipeline, tensor: TensorPlan, reading: ReadOptions = BUFFERED
) -> Stats:
    """The statistics of one tensor of several blocks, all its reduce passes in the order
    `execute` runs them (for an executor that runs the apply pass's blocks elsewhere: `execute_rows`)."""
    schedule = ((tensor, b) for _ in range(tensor.scans(None)) for b in tensor.blocks())
    with _staged(plan, inv, None, pipe, schedule, reading, lambda e: None) as stage:
        return stage.statistics(tensor)[1]


def execute_rows(
    plan: Plan,
    inv: Inventory,
    out: WriteBehind,
    pipe: Pipeline,
    tensor: TensorPlan,
    rows: tuple[int, int],
    stats: Stats,
    reading: ReadOptions = BUFFERED,
) -> None:
    """Write the blocks of `tensor` that start in rows [r0, r1), given its `stats` from
    `tensor_stats` ({} without reducers); a tensor of one block is read once and computes its own."""
    r0, r1 = rows
    schedule = ((tensor, b) for b in tensor.blocks(0 if tensor.n_blocks == 1 else r0) if b.r0 < r1)
    with _staged(plan, inv, out, pipe, schedule, reading, lambda e: None, {tensor.name: 0}) as stage:
        stage.run_tensor(tensor, r0, lambda: False, None if tensor.n_blocks == 1 else stats, r1)


@contextmanager
def _staged(
    plan: Plan,
    inv: Inventory,
    out: WriteBehind | None,
    pipe: Pipeline,
    schedule: Iterator[tuple[TensorPlan, Block]],
    reading: ReadOptions,
    emit: OnEvent,
    scans: Mapping[str, int] | None = None,
) -> Iterator[Stage]:
    """A compute stage fed by reader threads that read `schedule` (`out`: None for statistics
    only; `scans`: the reduce passes it reads before each tensor's apply pass)."""
    with ExitStack() as stack:
        readers = open_streams(inv, stack, reading)
        sources = [str(c.folder) for c in (inv.base, *inv.models)]
        check = InputCheck(out.finite, sources, scans or {}) if out is not None else None
        prefetch = Prefetcher(schedule, readers, pipe.slots, check)
        stack.callback(prefetch.stop)
        stage = Stage(plan, pipe, prefetch, out, emit)
        if pipe.mover.reads_host:
            pairwise.say_if_slow()
        stack.enter_context(on_device(pipe.mover.device))
        yield stage
