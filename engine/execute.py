"""Run a plan: a reader thread fills block buffers, the compute stage merges them chunk by chunk,
and the writer puts each merged block at its offset.

Buffers are allocated once, sized by the plan's `MemoryPlan`, and reused for every block:
`depth` sets of input buffers circulate between the reader thread and the compute stage through
two queues, so reading block k+1 overlaps merging block k. Within a block the compute stage works
on chunks through a fixed float32 workspace: cache-sized on the CPU, because the arithmetic is
memory-bound, and large on a GPU, where a `Mover` (engine.device) stages them to the device.

A method with reducers gets one extra pass over the tensor's blocks per reducer before the apply
pass; a tensor that fits in one block is read once and kept for all its passes, and so is one
the plan holds resident (read once into a buffer on the compute device).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from engine.device import Mover, PinnedBuffers, Staged, on_device
from engine.dtypes import DTYPES, itemsize
from engine.io.checkpoint import BUFFERED, ReadOptions, direct_buffer
from engine.io.inventory import Inventory
from engine.io.lora import RowReader
from engine.io.write_behind import Finite, WriteBehind
from engine.methods import steps
from engine.methods.base import Chunk, Method, Reducer, Stats, TensorParams
from engine.plan import Block, Plan, TensorPlan
from engine.rng import KeyedRng, stream_key
from engine.stats import pairwise
from engine.vocab import open_streams

TWO32 = 1 << 32
Event = dict[str, Any]
OnEvent = Callable[[Event], None]
Slot = list[torch.Tensor]  # one uint8 buffer per input stream (base first)


@dataclass(frozen=True)
class Filled:
    """A slot the reader filled with one block: the buffers (to release) and, for each stream
    of the tensor (base first; only the base for a copy), the block's elements in their storage
    dtype (flat; they may start a little into the buffer, where an aligned direct read put them).
    A base the method ignores (`TensorPlan.reads_base` False) is not read: its entry is the
    unfilled buffer."""

    slot: Slot | None  # None: the data is held resident, not in a read buffer
    data: list[torch.Tensor]


_Item = tuple[TensorPlan, Block, Filled] | BaseException | None


@dataclass
class Pipeline:
    """The reused buffers of one run, and the mover that takes chunks to the compute device."""

    slots: list[Slot]
    outs: list[torch.Tensor]  # uint8 output blocks: one being filled, one being written
    mover: Mover
    pinned: PinnedBuffers
    resident: list[torch.Tensor]  # uint8 per input stream, on the compute device: a held tensor

    @classmethod
    def allocate(cls, plan: Plan, staged: bool | None = None) -> Pipeline:
        """Buffers for `plan`; `staged` (default: on CUDA) moves chunks through device staging
        buffers, page-locking the host buffers when the device is a GPU."""
        m = plan.memory
        dev = torch.device(plan.device.device)
        slots = [[direct_buffer(m.buffer_elems * b) for b in m.in_bytes_per_elem] for _ in range(m.depth)]
        outs = [torch.empty(m.buffer_elems * m.out_bytes_per_elem, dtype=torch.uint8) for _ in range(m.out_depth)]
        if staged if staged is not None else dev.type == "cuda":
            mover: Mover = Staged(dev, plan.device, m.in_bytes_per_elem, m.out_bytes_per_elem)
        else:  # float32 (chunk_elems,) per stream; separate tensors, never aliased
            mover = Mover([torch.empty(m.chunk_elems, dtype=torch.float32) for _ in m.in_bytes_per_elem], m.chunk_elems)
        resident = [torch.empty(b, dtype=torch.uint8, device=dev) for b in plan.resident]
        return cls(slots, outs, mover, PinnedBuffers(dev, [b for s in slots for b in s] + outs), resident)

    def close(self) -> None:
        self.pinned.close()


def first_rows(plan: Plan, rows_done: Mapping[str, int]) -> dict[str, int]:
    """Where each tensor starts given rows an earlier run wrote: done tensors at their end, a
    tensor that fits one block from 0 (rewriting one block is cheaper than tracking it)."""
    out = {}
    for t in plan.tensors:
        done = rows_done.get(t.name, 0)
        out[t.name] = t.rows if done >= t.rows else (done if t.n_blocks > 1 else 0)
    return out


def read_schedule(plan: Plan, start: Mapping[str, int]) -> Iterator[tuple[TensorPlan, Block]]:
    """Every block read, in order: each reduce pass reads all blocks of a tensor, the apply pass
    those from its first unwritten row; a tensor that fits one block is read once, and so is a
    resident one (all of it, for its statistics)."""
    for tensor in plan.tensors:
        first = start.get(tensor.name, 0)
        if tensor.numel == 0 or first >= tensor.rows:
            continue
        if not tensor.read_once:
            for _ in range(tensor.passes - 1):
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
    with _staged(plan, inv, out, pipe, read_schedule(plan, start), reading, emit) as stage:
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
    schedule = ((tensor, b) for _ in range(tensor.passes - 1) for b in tensor.blocks())
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
    given = () if tensor.n_blocks == 1 else (tensor.name,)
    with _staged(plan, inv, out, pipe, schedule, reading, lambda e: None, given) as stage:
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
    given: Collection[str] = (),
) -> Iterator[_Stage]:
    """A compute stage fed by reader threads that read `schedule` (`out`: None for statistics only)."""
    with ExitStack() as stack:
        readers = open_streams(inv, stack, reading)
        sources = [str(c.folder) for c in (inv.base, *inv.models)]
        check = _InputCheck(out.finite, sources, given) if out is not None else None
        prefetch = _Prefetcher(schedule, readers, pipe.slots, check)
        stack.callback(prefetch.stop)
        stage = _Stage(plan, pipe, prefetch, out, emit)
        if pipe.mover.reads_host:
            pairwise.say_if_slow()
        stack.enter_context(on_device(pipe.mover.device))
        yield stage


class _Stage:
    """The compute side: consumes filled slots in `read_schedule` order."""

    def __init__(
        self,
        plan: Plan,
        pipe: Pipeline,
        prefetch: _Prefetcher,
        out: WriteBehind | None,
        emit: OnEvent,
    ) -> None:
        self.plan, self.pipe, self.prefetch, self.out, self.emit = plan, pipe, prefetch, out, emit
        self.method: Method = plan.spec.method_impl
        self.params: TensorParams = plan.spec.tensor_params()
        self.filled = iter(prefetch)
        self.mover = pipe.mover

    def _next(self, tensor: TensorPlan, block: Block) -> Filled:
        _, got, filled = next(self.filled)
        assert got == block, "reader and compute stage disagree on the schedule"
        self.emit({"event": "block", "bytes": _block_read_bytes(tensor, block)})
        return filled

    def run_tensor(
        self,
        tensor: TensorPlan,
        first_row: int,
        should_stop: Callable[[], bool],
        stats: Stats | None = None,
        end_row: int | None = None,
    ) -> bool:
        """Write `tensor` from `first_row` on (to the block that starts at `end_row`, with its
        `stats` given, when another process computed them); False if `should_stop` cut it short."""
        self.params = self.plan.params_for(tensor.name) if self.plan.spec.varies_by_tensor else self.params
        streams = _streams(self.method, self.plan.spec.seed, tensor.name, len(tensor.in_dtypes) - 1)
        reducers = self.method.reducers(self.params) if tensor.merge else ()
        if tensor.n_blocks == 1:  # read once, keep it for every pass
            (block,) = tensor.blocks()
            filled = self._next(tensor, block)
            stats = {}
            for r in reducers:
                stats = {**stats, **self._reduce(r, tensor, lambda b: filled, streams, stats)}
            self._emit_block(tensor, block, filled, streams, stats)
            return not should_stop()
        held = None
        if stats is None:
            held, stats = self.statistics(tensor, streams)
        for block in tensor.blocks(first_row):
            if end_row is not None and block.r0 >= end_row:
                break
            self._emit_block(tensor, block, held(block) if held else self._next(tensor, block), streams, stats)
            if should_stop() and block.r1 < tensor.rows:
                return False
        return not should_stop()

    def statistics(
        self, tensor: TensorPlan, streams: tuple[KeyedRng, ...] | None = None
    ) -> tuple[Callable[[Block], Filled] | None, Stats]:
        """Run the reduce passes of a tensor of several blocks: its statistics, and for a tensor
        held resident each block's view of the hold."""
        self.params = self.plan.params_for(tensor.name) if self.plan.spec.varies_by_tensor else self.params
        if streams is None:
            streams = _streams(self.method, self.plan.spec.seed, tensor.name, len(tensor.in_dtypes) - 1)
        held, todo = None, list(self.method.reducers(self.params) if tensor.merge else ())
        stats: Stats = {}
        if tensor.resident and todo:  # the first pass runs as the blocks land, behind the next reads
            held, stats = self._hold(tensor, todo.pop(0), streams)
        for r in todo:
            stats = {**stats, **self._reduce(r, tensor, held, streams, stats)}
        return held, stats

    def _hold(
        self, tensor: TensorPlan, first: Reducer, streams: tuple[KeyedRng, ...]
    ) -> tuple[Callable[[Block], Filled], Stats]:
        """Read every block of a resident tensor once into the resident buffers (on the compute
        device), giving each read buffer back at once, and run the `first` statistics pass over
        each block as it lands, while the readers fill the next ones.

        Returns each block's view of the buffers, and the first pass's statistics.
        """
        whole = [b[: tensor.numel * itemsize(d)].view(DTYPES[d]) for b, d in zip(self.pipe.resident, tensor.in_dtypes)]

        def held(b: Block) -> Filled:
            return Filled(None, [w[b.start : b.start + b.numel] for w in whole])

        def land(b: Block) -> Filled:  # read the block into the buffers, free its read buffer
            filled, view = self._next(tensor, b), held(b)
            for i in tensor.streams:
                self.mover.upload(view.data[i], filled.data[i])
            self.mover.inputs_done()
            self.prefetch.release(filled.slot)
            return view

        return held, self._reduce(first, tensor, land, streams, {})

    def _reduce(
        self,
        r: Reducer,
        tensor: TensorPlan,
        held: Callable[[Block], Filled] | None,
        streams: tuple[KeyedRng, ...],
        stats: Stats,
    ) -> dict[str, Any]:
        """One statistics pass over the tensor: each block from `held` (held blocks, or blocks
        landing in the hold), or read again without it."""
        acc = r.start(self.params, stats, tensor.numel)
        for block in tensor.blocks():
            filled = held(block) if held is not None else self._next(tensor, block)
            whole = self._chunk(tensor, streams, block.start)  # the C tiles the block itself
            if not (self._reads_raw(tensor) and r.raw_chunk(acc, filled.data, self.params, stats, whole)):
                for c0, c1 in self._spans(tensor, block):
                    c = self._chunk(tensor, streams, block.start + c0)
                    base, *models = self.mover.to_work([x[c0:c1] for x in filled.data], tensor.reads_base)
                    r.chunk(acc, base, models, self.params, stats, c)
            self.mover.inputs_done()
            if held is None:
                self.prefetch.release(filled.slot)
        return r.finish(acc, self.params, stats)

    def _emit_block(
        self, tensor: TensorPlan, block: Block, filled: Filled, streams: tuple[KeyedRng, ...], stats: Stats
    ) -> None:
        """Merge (or copy) one block into a free output buffer and hand it to the writer."""
        assert self.out is not None, "a statistics-only stage writes nothing"
        buffer = self.out.take()
        out_bytes = buffer[: block.numel * itemsize(tensor.out_dtype)]
        ready = None
        if not tensor.merge:
            out_bytes.copy_(filled.data[0].view(torch.uint8))
        else:
            out = out_bytes.view(DTYPES[tensor.out_dtype])
            inputs = filled.data
            # one program for the whole block (the statistics and parameters are the tensor's),
            # which the C runs in one call: it keeps its own cache-sized tiles
            program = self.method.steps(self.params, stats, len(inputs) - 1) if self.mover.reads_host else None
            if program is not None and not tensor.reads_base and 0 in steps.streams_read(program):
                program = None  # the base was not read into its buffer
            keys = [s.key for s in streams]
            whole = program is not None and steps.fused(inputs, program, out, block.start, keys)
            for c0, c1 in () if whole else self._spans(tensor, block):
                c = self._chunk(tensor, streams, block.start + c0)
                raw = [x[c0:c1] for x in inputs]
                base, *models = self.mover.to_work(raw, tensor.reads_base)
                self.mover.store(self.method.apply(base, models, self.params, stats, c), out[c0:c1])
            self.mover.inputs_done()
            ready = self.mover.outputs_ready()
        self.prefetch.release(filled.slot)
        self.out.submit(tensor, block, out_bytes, buffer, ready)

    def _reads_raw(self, tensor: TensorPlan) -> bool:
        """Whether the C may take this tensor's chunks from the read buffers (and write the output
        buffer) itself: the buffers are on the host, not staged, and hold the base it reads."""
        return self.mover.reads_host and tensor.reads_base

    def _chunk(self, tensor: TensorPlan, streams: tuple[KeyedRng, ...], start: int) -> Chunk:
        return Chunk(streams, start, tensor.numel, tensor.row_numel, self.mover.device, tensor.shape)

    def _spans(self, tensor: TensorPlan, block: Block) -> Iterator[tuple[int, int]]:
        """Chunk bounds inside the block: cache-sized, whole rows for row-aligned methods, and
        never across a 2**32 flat-index boundary (one set of rng round keys per chunk)."""
        step = self.mover.chunk_elems
        if self.method.row_aligned:
            step = max(1, step // tensor.row_numel) * tensor.row_numel
        c0 = 0
        while c0 < block.numel:
            c1 = min(c0 + step, block.numel)
            if not self.method.row_aligned:
                c1 = min(c1, ((block.start + c0) // TWO32 + 1) * TWO32 - block.start)
            yield c0, c1
            c0 = c1


def _unread_base(tensor: TensorPlan, block: Block, slot: Slot) -> torch.Tensor:
    """Stands in for a base the method ignores: the right dtype and length, never read or written
    (its pages need not even be touched)."""
    dtype = tensor.in_dtypes[0]
    return slot[0][: block.numel * itemsize(dtype)].view(DTYPES[dtype])


def _block_read_bytes(tensor: TensorPlan, block: Block) -> int:
    dtypes = tensor.read_dtypes
    return block.numel * sum(itemsize(d) for d in dtypes)


def _streams(method: Method, seed: int, tensor: str, n_models: int) -> tuple[KeyedRng, ...]:
    if not method.uses_rng:
        return ()
    return tuple(KeyedRng(stream_key(seed, tensor, m)) for m in range(n_models))


class _InputCheck:
    """Which reads of the schedule count the inputs' NaN/Inf: each block once, on its last read
    (the merge pass's; a tensor read once for all its passes, on that read)."""

    def __init__(self, finite: Finite, sources: Sequence[str], given: Collection[str] = ()) -> None:
        self.finite, self.sources, self.given = finite, sources, given  # given: stats from elsewhere
        self._reads: dict[str, int] = {}

    def last_read(self, tensor: TensorPlan) -> bool:
        """Called once per block read, in schedule order: is this the block's last read?"""
        n = self._reads[tensor.name] = self._reads.get(tensor.name, 0) + 1
        return tensor.read_once or tensor.name in self.given or n > (tensor.passes - 1) * tensor.n_blocks


class _Prefetcher:
    """A reader thread that fills free slots in schedule order; iterate to get filled ones.

    The input streams of a block are read in parallel, one thread per stream: a virtual disk
    serves several outstanding requests faster than one (four files read cold here: 0.96 GB/s
    from one thread, 1.34 GB/s from two). Each thread still reads its file front to back.
    Errors in the threads are re-raised in the consumer; `stop` ends them early.
    """

    def __init__(
        self,
        schedule: Iterator[tuple[TensorPlan, Block]],
        readers: Sequence[RowReader],
        slots: list[Slot],
        check: _InputCheck | None = None,
    ) -> None:
        self._check = check
        self._free: queue.Queue[Slot] = queue.Queue()
        self._ready: queue.Queue[_Item] = queue.Queue()
        self._stopped = threading.Event()
        for s in slots:
            self._free.put(s)
        self._pool = ThreadPoolExecutor(max_workers=len(readers), thread_name_prefix="leanmerge-read")
        self._thread = threading.Thread(
            target=self._run, args=(schedule, readers), name="leanmerge-reader", daemon=True
        )
        self._thread.start()

    def _run(self, schedule: Iterator[tuple[TensorPlan, Block]], readers: Sequence[RowReader]) -> None:
        try:
            upcoming = next(schedule, None)
            while upcoming is not None:
                tensor, block = upcoming
                upcoming = next(schedule, None)
                if upcoming is not None:  # the disk reads ahead while we wait for a slot and read this block
                    for i in upcoming[0].streams:
                        readers[i].advise_rows(upcoming[0].name, upcoming[1].r0, upcoming[1].r1)
                slot = self._take_free()
                if slot is None:
                    return
                counted = self._check is not None and self._check.last_read(tensor)
                reads = [
                    self._pool.submit(self._read, readers[i], i, tensor, block, slot, counted) for i in tensor.streams
                ]
                data = [r.result().reshape(-1) for r in reads]
                if tensor.streams[0] != 0:
                    data.insert(0, _unread_base(tensor, block, slot))
                self._ready.put((tensor, block, Filled(slot, data)))
            self._ready.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._ready.put(e)

    def _read(
        self, reader: RowReader, i: int, tensor: TensorPlan, block: Block, slot: Slot, counted: bool
    ) -> torch.Tensor:
        """Input `i`'s rows of `block` into its buffer of `slot`, NaN/Inf counted on the merge
        pass's read (`counted`), here on the reader thread, beside the merge."""
        rows = reader.read_rows(tensor.name, block.r0, block.r1, out=slot[i])
        if counted and self._check is not None:
            self._check.finite.check_input(self._check.sources[i], tensor, block, rows.reshape(-1))
        return rows

    def _take_free(self) -> Slot | None:
        while not self._stopped.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def __iter__(self) -> Iterator[tuple[TensorPlan, Block, Filled]]:
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, slot: Slot | None) -> None:
        """Give a slot back to the reader (None: a held block's, given back when it was read)."""
        if slot is not None:
            self._free.put(slot)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._pool.shutdown()
