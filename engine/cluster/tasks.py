"""What runs in a Dask worker: a tensor's statistics, and a band of its blocks written in place.

A task gets the whole `Job` (the plan, the inventory, where the output goes) from the cluster's
memory, opens the inputs itself (a shared filesystem: the same paths on every machine), and runs
the local executor's own pieces on its rows (`engine.execute.tensor_stats`, `execute_rows`): the
same reads, the same C merge pass, the same keyed randomness, so the bytes are the local
executor's. A band is written at its offsets in the preallocated shards and made durable
(`fdatasync`) before the task returns its crc32: the driver journals only what is on disk.

The write step is the `Job.output`: the preallocated safetensors shards, or the zarr group whose
arrays the driver created (`ZarrOutput`): a band is whole blocks, and a zarr output's blocks are
its chunks, so workers write disjoint chunks, which zarr allows from any number of writers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.cores import default_threads
from engine.defaults import SYNC_EVERY
from engine.execute import Pipeline, execute_rows, tensor_stats
from engine.io.checkpoint import BUFFERED, ReadOptions
from engine.io.inventory import Inventory
from engine.io.safetensors_writer import ShardWriter
from engine.io.write_behind import Finite, WriteBehind
from engine.io.zarr_format import Compression
from engine.io.zarr_writer import ZarrWriter
from engine.methods.base import Stats
from engine.plan import Plan, TensorPlan


@dataclass(frozen=True)
class SafetensorsOutput:
    """The preallocated shards of the temporary output folder, reopened by each task."""

    folder: Path
    metadata: dict[str, str]

    def open(self, plan: Plan) -> ShardWriter:
        return ShardWriter(self.folder, plan, self.metadata, reopen=True)


@dataclass(frozen=True)
class ZarrOutput:
    """The zarr group in the temporary output folder (arrays created by the driver), reopened by each task."""

    folder: Path
    spec_sha256: str
    compression: Compression
    root: str | None = None  # the group's store URL (engine.io.zarr_url); None: in `folder`

    def open(self, plan: Plan) -> ZarrWriter:
        return ZarrWriter(
            self.folder, plan, self.spec_sha256, self.compression, reopen=True, root=self.root, joined=True
        )


@dataclass(frozen=True)
class Job:
    """Everything a task needs besides its own rows: sent to the cluster once per merge."""

    plan: Plan
    inv: Inventory
    output: SafetensorsOutput | ZarrOutput
    reading: ReadOptions = BUFFERED
    strict_finite: bool = False
    threads: int | None = None  # compute threads per task (None: the worker's usable cores)
    sync_every: int = SYNC_EVERY

    def tensor(self, name: str) -> TensorPlan:
        return next(t for t in self.plan.tensors if t.name == name)


@dataclass(frozen=True)
class Band:
    """Rows [r0, r1) of a tensor, written and durable: their crc32 and length, and the NaN/Inf
    counted in the merged rows and (by input folder) in the inputs' rows."""

    tensor: str
    r0: int
    r1: int
    crc: int
    nbytes: int
    nonfinite: int = 0
    nonfinite_inputs: dict[str, int] = field(default_factory=dict)
    blocks: tuple[tuple[int, int, int], ...] = ()  # each block's (r0, r1, running crc32 from r0 of the band)


class _BandNote:
    """Stands in for the journal in a worker: keeps the band's crc32 and its blocks' (the driver
    journals them: a zarr output's record needs each chunk's crc32)."""

    def __init__(self) -> None:
        self.crc = 0
        self.blocks: list[tuple[int, int, int]] = []

    def block(self, tensor: str, r0: int, r1: int, crc: int) -> None:
        self.crc = crc
        self.blocks.append((r0, r1, crc))

    def tensor(self, tensor: str, crc: int) -> None:
        self.crc = crc

    def commit(self) -> None:
        """Nothing to record here: `WriteBehind` has synced the shards before calling this."""


class _Held:
    """A worker process's buffers, kept from task to task: allocating and first touching them
    (352 MiB under a 2 GiB budget) took ~0.6 s, as long as merging a band's 256 MiB. One set per
    process, used by one task at a time, so a worker with several threads still stays within one
    budget; plans with equal buffer sizes (a sweep's points) share it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[Any, ...] | None = None
        self.pipe: Pipeline | None = None


@contextmanager
def _pipeline(plan: Plan) -> Iterator[Pipeline]:
    """The worker's buffers for `plan` (fresh ones outside a Dask worker), one task at a time."""
    try:
        from distributed import get_worker

        worker: Any = get_worker()
    except (ImportError, ValueError):  # not in a worker: a caller running the task itself
        pipe = Pipeline.allocate(plan)
        try:
            yield pipe
        finally:
            pipe.close()
        return
    held: _Held = worker.__dict__.setdefault("_leanmerge_held", _Held())
    with held.lock:
        key = (plan.memory, plan.device, plan.resident)
        if held.pipe is None or held.key != key:
            if held.pipe is not None:
                held.pipe.close()
            held.pipe, held.key = None, None  # freed before the next set is allocated
            held.pipe, held.key = Pipeline.allocate(plan), key
        yield held.pipe


def release_buffers(dask_worker: Any) -> None:
    """Free a worker's kept buffers once a merge is done (`client.run` passes `dask_worker`); a
    set in use by another merge's task (a sweep) is left to it."""
    held: _Held | None = dask_worker.__dict__.get("_leanmerge_held")
    if held is not None and held.lock.acquire(blocking=False):
        try:
            if held.pipe is not None:
                held.pipe.close()
            held.pipe, held.key = None, None
        finally:
            held.lock.release()


def stats_task(job: Job, name: str) -> Stats:
    """Every reduce pass over tensor `name`, in the local executor's order: its statistics."""
    torch.set_num_threads(job.threads or default_threads())
    with _pipeline(job.plan) as pipe:
        return tensor_stats(job.plan, job.inv, pipe, job.tensor(name), job.reading)


def band_task(job: Job, name: str, r0: int, r1: int, stats: Stats) -> Band:
    """Merge rows [r0, r1) of tensor `name` (whole blocks) into the output and make them durable."""
    torch.set_num_threads(job.threads or default_threads())
    tensor = job.tensor(name)
    finite, note = Finite(job.strict_finite), _BandNote()
    with ExitStack() as stack:
        writer = job.output.open(job.plan)
        stack.callback(writer.close)
        pipe = stack.enter_context(_pipeline(job.plan))
        out = WriteBehind(writer, note, pipe.outs, job.sync_every, finite)
        stack.callback(out.close)
        execute_rows(job.plan, job.inv, out, pipe, tensor, (r0, r1), stats, job.reading)
        out.drain()  # every byte fdatasync'd before the driver hears of it
    inputs = {src: n[name] for src, n in finite.inputs.items() if name in n}
    return Band(name, r0, r1, note.crc, out.bytes_written, finite.counts.get(name, 0), inputs, tuple(note.blocks))
