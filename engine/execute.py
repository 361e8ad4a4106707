"""Run a plan: a reader thread fills block buffers, the compute stage merges them chunk by chunk,
and the writer puts each merged block at its offset.

Buffers are allocated once, sized by the plan's `MemoryPlan`, and reused for every block:
`depth` sets of input buffers circulate between the reader thread and the compute stage through
two queues, so reading block k+1 overlaps merging block k. Within a block the compute stage works
on chunks through a fixed float32 workspace: cache-sized on the CPU, because the arithmetic is
memory-bound, and large on a GPU, where a `Mover` (engine.device) stages them to the device.

A method with reducers gets one extra pass over the tensor's blocks per reducer before the apply
pass, but for a last one that folds each block just before it is merged (TIES' tie pass) and one
that the passes before it leave with nothing to count (`Reducer.needed`: the stage tells the
reader, `Decisions`); a tensor that fits in one block is read once and kept for all its passes,
and so is one the plan holds resident (read once into a buffer on the compute device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from itertools import count

from engine.device import on_device
from engine.io.checkpoint import BUFFERED, ReadOptions
from engine.io.inventory import Inventory
from engine.io.write_behind import WriteBehind
from engine.methods.base import Stats
from engine.pipeline import Pipeline
from engine.plan import Plan, TensorPlan
from engine.prefetch import Decisions, InputCheck, Prefetcher, Read
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


def read_schedule(plan: Plan, start: Mapping[str, int], decisions: Decisions) -> Iterator[Read]:
    """Every block read, in order: each reduce pass that scans (`TensorPlan.scans`) and runs reads
    all blocks of a tensor, the apply pass those from its first unwritten row; a tensor that fits
    one block is read once, and so is a resident one (all of it, for its statistics). Each block's
    NaN/Inf are counted on its first read, or for a resumed tensor on the apply pass's."""
    for tensor in plan.tensors:
        first = start.get(tensor.name, 0)
        if tensor.numel == 0 or first >= tensor.rows:
            continue
        if tensor.read_once:
            yield from ((tensor, b, True) for b in tensor.blocks(0 if tensor.resident else first))
            continue
        yield from scan_cycles(tensor, first, decisions)
        if first > 0:
            yield from ((tensor, b, True) for b in tensor.blocks(first))


def scan_cycles(tensor: TensorPlan, first_row: int | None, decisions: Decisions) -> Iterator[Read]:
    """The whole-tensor reads of its scans, and from row 0 its apply pass's: the same blocks in
    the same order, so which pass a read serves is left to the stage, and the stage's word on a
    skippable pass is awaited only for the read that depends on it. The first read counts."""
    merged = first_row == 0  # the apply pass reads the tensor whole too
    for c in count():
        j = c - merged  # this read serves the j-th scan (0-based) if it runs, else the apply pass
        if j >= tensor.scans(first_row):
            return
        if j >= tensor.fewest_scans(first_row):
            yield None  # the reader hands over what it holds before the schedule waits
            if not decisions.scan_runs(tensor, first_row, j):
                return
        yield from ((tensor, b, c == 0 and merged) for b in tensor.blocks())


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
    with _staged(plan, inv, out, pipe, lambda d: read_schedule(plan, start, d), reading, emit) as stage:
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
    with _staged(plan, inv, None, pipe, lambda d: scan_cycles(tensor, None, d), reading, lambda e: None) as stage:
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
    schedule = [(tensor, b, True) for b in tensor.blocks(0 if tensor.n_blocks == 1 else r0) if b.r0 < r1]
    with _staged(plan, inv, out, pipe, lambda d: iter(schedule), reading, lambda e: None) as stage:
        stage.run_tensor(tensor, r0, lambda: False, None if tensor.n_blocks == 1 else stats, r1)


@contextmanager
def _staged(
    plan: Plan,
    inv: Inventory,
    out: WriteBehind | None,
    pipe: Pipeline,
    schedule: Callable[[Decisions], Iterator[Read]],
    reading: ReadOptions,
    emit: OnEvent,
) -> Iterator[Stage]:
    """A compute stage fed by reader threads that read `schedule(decisions)` (`out`: None for
    statistics only), the two sharing the stage's `Decisions`."""
    with ExitStack() as stack:
        readers = open_streams(inv, stack, reading)
        sources = [str(c.folder) for c in (inv.base, *inv.models)]
        check = InputCheck(out.finite, sources) if out is not None else None
        decisions = Decisions()
        prefetch = Prefetcher(schedule(decisions), readers, pipe.slots, check)
        stack.callback(prefetch.stop)
        stack.callback(decisions.close)  # first: a reader waiting on the stage's word must not hang the stop
        stage = Stage(plan, pipe, prefetch, out, emit, decisions)
        if pipe.mover.reads_host:
            pairwise.say_if_slow()
        stack.enter_context(on_device(pipe.mover.device))
        yield stage
