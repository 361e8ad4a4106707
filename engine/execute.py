"""Run a plan: a reader thread fills block buffers, the compute stage merges them chunk by chunk,
and the writer puts each merged block at its offset.

Buffers are allocated once, sized by the plan's `MemoryPlan`, and reused for every block:
`depth` sets of input buffers circulate between the reader thread and the compute stage through
two queues, so reading block k+1 overlaps merging block k. Within a block the compute stage works
on cache-sized chunks through a fixed float32 workspace, because the arithmetic is memory-bound.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Union

import torch

from engine.budget import CHUNK_ELEMS
from engine.dtypes import DTYPES, itemsize
from engine.io.checkpoint import Reader
from engine.io.inventory import Inventory
from engine.io.safetensors_writer import ShardWriter
from engine.methods.base import ChunkRandom, Method, TensorParams
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
    work: torch.Tensor  # float32 (streams, CHUNK_ELEMS)

    @classmethod
    def allocate(cls, plan: Plan) -> Pipeline:
        m = plan.memory
        slots = [[torch.empty(m.buffer_elems * b, dtype=torch.uint8) for b in m.in_bytes_per_elem] for _ in range(m.depth)]
        return cls(
            slots,
            torch.empty(m.buffer_elems * m.out_bytes_per_elem, dtype=torch.uint8),
            torch.empty(len(m.in_bytes_per_elem), CHUNK_ELEMS, dtype=torch.float32),
        )


def execute(plan: Plan, inv: Inventory, writer: ShardWriter, on_event: OnEvent | None = None, *, drop_cache: bool = False) -> None:
    """Merge every tensor of `plan` into `writer`, reading from `inv`."""
    emit = on_event or (lambda e: None)
    method = plan.spec.method_impl
    params = plan.spec.tensor_params()
    pipe = Pipeline.allocate(plan)
    with ExitStack() as stack:
        readers = [stack.enter_context(Reader(c, drop_cache=drop_cache)) for c in (inv.base, *inv.models)]
        prefetch = _Prefetcher(plan, readers, pipe.slots)
        stack.callback(prefetch.stop)
        filled = iter(prefetch)
        for tensor in plan.tensors:
            for _ in range(tensor.n_blocks):
                _, block, slot = next(filled)
                if tensor.merge:
                    data = _merge_block(tensor, block, slot, pipe, method, params, plan.spec.seed)
                else:
                    data = slot[0][: block.numel * itemsize(tensor.in_dtypes[0])]
                writer.write(tensor, block.start * itemsize(tensor.out_dtype), memoryview(data.numpy()))
                prefetch.release(slot)
                emit({"event": "block", "bytes": _block_read_bytes(tensor, block)})
            emit({"event": "tensor", "name": tensor.name})


def _block_read_bytes(tensor: TensorPlan, block: Block) -> int:
    dtypes = tensor.in_dtypes if tensor.merge else tensor.in_dtypes[:1]
    return block.numel * sum(itemsize(d) for d in dtypes)


def _merge_block(
    tensor: TensorPlan, block: Block, slot: Slot, pipe: Pipeline, method: Method, params: TensorParams, seed: int
) -> torch.Tensor:
    """Merge one block chunk by chunk; returns the output block's bytes (a view of `pipe.out`)."""
    inputs = [buf[: block.numel * itemsize(d)].view(DTYPES[d]) for buf, d in zip(slot, tensor.in_dtypes)]
    out_bytes = pipe.out[: block.numel * itemsize(tensor.out_dtype)]
    out = out_bytes.view(DTYPES[tensor.out_dtype])
    streams = _streams(method, seed, tensor.name, len(inputs) - 1)
    for c0 in range(0, block.numel, CHUNK_ELEMS):
        c1 = min(c0 + CHUNK_ELEMS, block.numel)
        work = [pipe.work[i, : c1 - c0] for i in range(len(inputs))]
        for w, x in zip(work, inputs):
            w.copy_(x[c0:c1])
        rng = ChunkRandom(streams, block.start + c0)
        out[c0:c1].copy_(method.apply(work[0], work[1:], params, rng))
    return out_bytes


def _streams(method: Method, seed: int, tensor: str, n_models: int) -> tuple[KeyedRng, ...]:
    if not method.uses_rng:
        return ()
    return tuple(KeyedRng(stream_key(seed, tensor, m)) for m in range(n_models))


class _Prefetcher:
    """A reader thread that fills free slots in plan order; iterate to get filled ones.

    Errors in the thread are re-raised in the consumer; `stop` ends the thread early.
    """

    def __init__(self, plan: Plan, readers: Sequence[Reader], slots: list[Slot]) -> None:
        self._free: queue.Queue[Slot] = queue.Queue()
        self._ready: queue.Queue[_Item] = queue.Queue()
        self._stopped = threading.Event()
        for s in slots:
            self._free.put(s)
        self._thread = threading.Thread(target=self._run, args=(plan, readers), name="leanmerge-reader", daemon=True)
        self._thread.start()

    def _run(self, plan: Plan, readers: Sequence[Reader]) -> None:
        try:
            for tensor in plan.tensors:
                sources = readers if tensor.merge else readers[:1]
                for block in tensor.blocks():
                    slot = self._take_free()
                    if slot is None:
                        return
                    for reader, buf in zip(sources, slot):
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
