"""The compute side of a run: consumes the blocks a `Prefetcher` filled, in `read_schedule`
order, runs a tensor's reduce passes then its apply pass chunk by chunk through the `Mover`'s
float32 workspace (or the C's fused program straight from the read buffers), and hands each
merged block to the writer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.dtypes import DTYPES, itemsize
from engine.io.write_behind import WriteBehind
from engine.methods import steps
from engine.methods.base import Chunk, Method, Reducer, Stats, TensorParams
from engine.pipeline import Pipeline
from engine.plan import Block, Plan, TensorPlan
from engine.prefetch import Decisions, Filled, Prefetcher
from engine.rng import KeyedRng, stream_key

TWO32 = 1 << 32
Event = dict[str, Any]
OnEvent = Callable[[Event], None]


class Stage:
    """The compute side: consumes filled slots in `read_schedule` order."""

    def __init__(
        self,
        plan: Plan,
        pipe: Pipeline,
        prefetch: Prefetcher,
        out: WriteBehind | None,
        emit: OnEvent,
        decisions: Decisions,
    ) -> None:
        self.plan, self.pipe, self.prefetch, self.out, self.emit = plan, pipe, prefetch, out, emit
        self.decisions = decisions  # told of each skippable pass whether it runs, for the reader
        self.method: Method = plan.spec.method_impl
        self.params: TensorParams = plan.spec.tensor_params()
        self.filled = iter(prefetch)
        self.mover = pipe.mover

    def _next(self, tensor: TensorPlan, block: Block) -> Filled:
        _, got, filled = next(self.filled)
        assert got == block, "reader and compute stage disagree on the schedule"
        self.emit({"event": "block", "bytes": block_read_bytes(tensor, block)})
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
        streams = keyed_streams(self.method, self.plan.spec.seed, tensor.name, len(tensor.in_dtypes) - 1)
        reducers = self.method.reducers(self.params) if tensor.merge else ()
        if tensor.n_blocks == 1:  # read once, keep it for every pass
            (block,) = tensor.blocks()
            filled = self._next(tensor, block)
            stats = {}
            for r in reducers:
                stats = {**stats, **self._reduce(r, tensor, lambda b: filled, streams, stats)}
            self._emit_block(tensor, block, filled, streams, stats)
            return not should_stop()
        held, ahead = None, None
        if stats is None:
            scans = tensor.scans(first_row)
            held, stats = self.statistics(tensor, streams, scans)
            if scans < len(reducers):  # the last pass folds each block just before its merge
                last, acc = reducers[-1], reducers[-1].start(self.params, stats, tensor.numel)
                if last.needed(self.params, stats):
                    ahead = last, acc
                else:
                    stats = {**stats, **last.finish(acc, self.params, stats)}
        for block in tensor.blocks(first_row):
            if end_row is not None and block.r0 >= end_row:
                break
            filled = held(block) if held else self._next(tensor, block)
            here = stats
            if ahead is not None:
                r, acc = ahead
                self._fold(r, acc, tensor, block, filled, streams, stats)
                here = {**stats, **r.so_far(acc, self.params, stats)}
            self._emit_block(tensor, block, filled, streams, here)
            if should_stop() and block.r1 < tensor.rows:
                return False
        return not should_stop()

    def statistics(
        self, tensor: TensorPlan, streams: tuple[KeyedRng, ...] | None = None, scans: int | None = None
    ) -> tuple[Callable[[Block], Filled] | None, Stats]:
        """Run the first `scans` reduce passes (default all) of a tensor of several blocks: its
        statistics, and for a tensor held resident each block's view of the hold."""
        self.params = self.plan.params_for(tensor.name) if self.plan.spec.varies_by_tensor else self.params
        if streams is None:
            streams = keyed_streams(self.method, self.plan.spec.seed, tensor.name, len(tensor.in_dtypes) - 1)
        held, todo = None, list(self.method.reducers(self.params) if tensor.merge else ())[:scans]
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
        landing in the hold), or read again without it; or none, where a skippable pass finds
        nothing to count (the reader is told either way)."""
        acc = r.start(self.params, stats, tensor.numel)
        if r.skippable:
            runs = r.needed(self.params, stats)
            self.decisions.decide(tensor.name, runs)
            if not runs:
                if held is None:
                    self.emit({"event": "skipped", "bytes": tensor.scan_bytes})
                return r.finish(acc, self.params, stats)
        for block in tensor.blocks():
            filled = held(block) if held is not None else self._next(tensor, block)
            self._fold(r, acc, tensor, block, filled, streams, stats)
            if held is None:
                self.prefetch.release(filled.slot)
        return r.finish(acc, self.params, stats)

    def _fold(
        self,
        r: Reducer,
        acc: Any,
        tensor: TensorPlan,
        block: Block,
        filled: Filled,
        streams: tuple[KeyedRng, ...],
        stats: Stats,
    ) -> None:
        """Fold one block into a pass's `acc`: from the read buffers where the reducer can (the C
        tiles the block itself), else chunk by chunk through the float32 workspace."""
        whole = self._chunk(tensor, streams, block.start)
        if not (self._reads_raw(tensor) and r.raw_chunk(acc, filled.data, self.params, stats, whole)):
            for c0, c1 in self._spans(tensor, block):
                c = self._chunk(tensor, streams, block.start + c0)
                base, *models = self.mover.to_work([x[c0:c1] for x in filled.data], tensor.reads_base)
                r.chunk(acc, base, models, self.params, stats, c)
        self.mover.inputs_done()

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
        return Chunk(streams, start, tensor.numel, tensor.row_numel, self.mover.device, tensor.shape, tensor.name)

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


def block_read_bytes(tensor: TensorPlan, block: Block) -> int:
    dtypes = tensor.read_dtypes
    return block.numel * sum(itemsize(d) for d in dtypes)


def keyed_streams(method: Method, seed: int, tensor: str, n_models: int) -> tuple[KeyedRng, ...]:
    if not method.uses_rng:
        return ()
    return tuple(KeyedRng(stream_key(seed, tensor, m)) for m in range(n_models))
