"""Run a plan: a reader thread fills block buffers, the compute stage merges them chunk by chunk,
and the writer puts each merged block at its offset.

Buffers are allocated once, sized by the plan's `MemoryPlan`, and reused for every block:
`depth` sets of input buffers circulate between the reader thread and the compute stage through
two queues, so reading block k+1 overlaps merging block k. Within a block the compute stage works
on cache-sized chunks through a fixed float32 workspace, because the arithmetic is memory-bound.

A method with reducers gets one extra pass over the tensor's blocks per reducer before the apply
pass; a tensor that fits in one block is read once and kept for all its passes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Union

import torch

from engine.dtypes import DTYPES, itemsize
from engine.io.checkpoint import Reader
from engine.io.inventory import Inventory
from engine.io.safetensors_writer import ShardWriter
from engine.methods.base import Chunk, Method, Reducer, Stats, TensorParams
from engine.plan import Block, Plan, TensorPlan
from engine.rng import KeyedRng, stream_key

Event = dict[str, Any]
OnEvent = Callable[[Event], None]
Slot = list[torch.Tensor]  # one uint8 buffer per input stream (base first)
_Item = Union[tuple[TensorPlan, Block, Slot], BaseException, None]


@dataclass
class Pipeline:
    """The reused buffers of one run."""

    slots: list[Slot]
    out: torch.Tensor  # uint8, one output block
    work: torch.Tensor  # float32 (streams, chunk_elems)

    @classmethod
    def allocate(cls, plan: Plan) -> Pipeline:
        m = plan.memory
        slots = [[torch.empty(m.buffer_elems * b, dtype=torch.uint8) for b in m.in_bytes_per_elem] for _ in range(m.depth)]
        return cls(
            slots,
            torch.empty(m.buffer_elems * m.out_bytes_per_elem, dtype=torch.uint8),
            torch.empty(len(m.in_bytes_per_elem), m.chunk_elems, dtype=torch.float32),
        )


def read_schedule(plan: Plan) -> Iterator[tuple[TensorPlan, Block]]:
    """Every block read, in order: each pass of a tensor re-reads its blocks, unless it has one."""
    for tensor in plan.tensors:
        reps = tensor.passes if tensor.n_blocks > 1 else 1
        for _ in range(reps):
            yield from ((tensor, b) for b in tensor.blocks())


def execute(plan: Plan, inv: Inventory, writer: ShardWriter, on_event: OnEvent | None = None, *, drop_cache: bool = False) -> None:
    """Merge every tensor of `plan` into `writer`, reading from `inv`."""
    emit = on_event or (lambda e: None)
    pipe = Pipeline.allocate(plan)
    with ExitStack() as stack:
        readers = [stack.enter_context(Reader(c, drop_cache=drop_cache)) for c in (inv.base, *inv.models)]
        prefetch = _Prefetcher(read_schedule(plan), readers, pipe.slots)
        stack.callback(prefetch.stop)
        stage = _Stage(plan, pipe, prefetch, writer, emit)
        for tensor in plan.tensors:
            stage.run_tensor(tensor)
            emit({"event": "tensor", "name": tensor.name})


class _Stage:
    """The compute side: consumes filled slots in `read_schedule` order."""

    def __init__(self, plan: Plan, pipe: Pipeline, prefetch: _Prefetcher, writer: ShardWriter, emit: OnEvent) -> None:
        self.plan, self.pipe, self.prefetch, self.writer, self.emit = plan, pipe, prefetch, writer, emit
        self.method: Method = plan.spec.method_impl
        self.params: TensorParams = plan.spec.tensor_params()
        self.filled = iter(prefetch)

    def _next(self, tensor: TensorPlan, block: Block) -> Slot:
        _, got, slot = next(self.filled)
        assert got == block, "reader and compute stage disagree on the schedule"
        self.emit({"event": "block", "bytes": _block_read_bytes(tensor, block)})
        return slot

    def run_tensor(self, tensor: TensorPlan) -> None:
        if tensor.n_blocks == 0:
            return
        if not tensor.merge:
            for block in tensor.blocks():
                slot = self._next(tensor, block)
                self._write(tensor, block, slot[0][: block.numel * itemsize(tensor.in_dtypes[0])])
                self.prefetch.release(slot)
            return
        streams = _streams(self.method, self.plan.spec.seed, tensor.name, len(tensor.in_dtypes) - 1)
        reducers = self.method.reducers(self.params)
        if tensor.n_blocks == 1:  # read once, keep it for every pass
            (block,) = tensor.blocks()
            slot = self._next(tensor, block)
            stats: Stats = {}
            for r in reducers:
                stats = {**stats, **self._reduce(r, tensor, [(block, slot)], streams, stats)}
            self._apply(tensor, block, slot, streams, stats)
            self.prefetch.release(slot)
            return
        stats = {}
        for r in reducers:
            stats = {**stats, **self._reduce(r, tensor, None, streams, stats)}
        for block in tensor.blocks():
            slot = self._next(tensor, block)
            self._apply(tensor, block, slot, streams, stats)
            self.prefetch.release(slot)

    def _reduce(
        self, r: Reducer, tensor: TensorPlan, held: list[tuple[Block, Slot]] | None, streams: tuple[KeyedRng, ...], stats: Stats
    ) -> dict[str, Any]:
        acc = r.start(self.params, stats, tensor.numel)
        for block in tensor.blocks():
            slot = held[0][1] if held else self._next(tensor, block)
            for base, models, c in self._chunks(tensor, block, slot, streams):
                r.chunk(acc, base, models, self.params, stats, c)
            if not held:
                self.prefetch.release(slot)
        return r.finish(acc, self.params, stats)

    def _apply(self, tensor: TensorPlan, block: Block, slot: Slot, streams: tuple[KeyedRng, ...], stats: Stats) -> None:
        out_bytes = self.pipe.out[: block.numel * itemsize(tensor.out_dtype)]
        out = out_bytes.view(DTYPES[tensor.out_dtype])
        for base, models, c in self._chunks(tensor, block, slot, streams):
            o = c.start - block.start
            out[o : o + base.numel()].copy_(self.method.apply(base, models, self.params, stats, c))
        self._write(tensor, block, out_bytes)

    def _chunks(
        self, tensor: TensorPlan, block: Block, slot: Slot, streams: tuple[KeyedRng, ...]
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor], Chunk]]:
        """Float32 copies of each chunk of the block (whole rows for row-aligned methods)."""
        inputs = [buf[: block.numel * itemsize(d)].view(DTYPES[d]) for buf, d in zip(slot, tensor.in_dtypes)]
        step = self.plan.memory.chunk_elems
        if self.method.row_aligned:
            step = max(1, step // tensor.row_numel) * tensor.row_numel
        for c0 in range(0, block.numel, step):
            c1 = min(c0 + step, block.numel)
            work = [self.pipe.work[i, : c1 - c0] for i in range(len(inputs))]
            for w, x in zip(work, inputs):
                w.copy_(x[c0:c1])
            yield work[0], work[1:], Chunk(streams, block.start + c0, tensor.numel, tensor.row_numel)

    def _write(self, tensor: TensorPlan, block: Block, data: torch.Tensor) -> None:
        self.writer.write(tensor, block.start * itemsize(tensor.out_dtype), memoryview(data.numpy()))


def _block_read_bytes(tensor: TensorPlan, block: Block) -> int:
    dtypes = tensor.in_dtypes if tensor.merge else tensor.in_dtypes[:1]
    return block.numel * sum(itemsize(d) for d in dtypes)


def _streams(method: Method, seed: int, tensor: str, n_models: int) -> tuple[KeyedRng, ...]:
    if not method.uses_rng:
        return ()
    return tuple(KeyedRng(stream_key(seed, tensor, m)) for m in range(n_models))


class _Prefetcher:
    """A reader thread that fills free slots in schedule order; iterate to get filled ones.

    Errors in the thread are re-raised in the consumer; `stop` ends the thread early.
    """

    def __init__(self, schedule: Iterator[tuple[TensorPlan, Block]], readers: Sequence[Reader], slots: list[Slot]) -> None:
        self._free: queue.Queue[Slot] = queue.Queue()
        self._ready: queue.Queue[_Item] = queue.Queue()
        self._stopped = threading.Event()
        for s in slots:
            self._free.put(s)
        self._thread = threading.Thread(target=self._run, args=(schedule, readers), name="leanmerge-reader", daemon=True)
        self._thread.start()

    def _run(self, schedule: Iterator[tuple[TensorPlan, Block]], readers: Sequence[Reader]) -> None:
        try:
            for tensor, block in schedule:
                slot = self._take_free()
                if slot is None:
                    return
                for reader, buf in zip(readers if tensor.merge else readers[:1], slot):
                    reader.read_rows(tensor.name, block.r0, block.r1, out=buf)
                self._ready.put((tensor, block, slot))
            self._ready.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._ready.put(e)

    def _take_free(self) -> Slot | None:
        while not self._stopped.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def __iter__(self) -> Iterator[tuple[TensorPlan, Block, Slot]]:
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, slot: Slot) -> None:
        self._free.put(slot)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
