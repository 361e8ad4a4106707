"""The driver of a merge on a Dask cluster: the plan's blocks as tasks, the journal kept here.

A `DaskRunner` takes the place of the local `engine.work.write_blocks`: `merge()` still checks
the target, opens or resumes the temporary folder, verifies and renames the result. Here the
driver preallocates the shards or creates the zarr arrays (on a filesystem every worker sees at the same path), sends the
`Job` to the cluster once, and submits, tensor by tensor in plan order:

- for a tensor of several blocks with reduce passes, one statistics task that runs every pass in
  the local executor's order (`tasks.stats_task`: the fixed-order sums and exact selections fold
  their blocks one after another, so the statistics are the local ones bit for bit);
- bands of whole blocks (`tasks.band_task`, about `band_bytes` of input each), which depend on it.

A band's bytes are durable when its task returns; the driver chains the bands' crc32 in row order
(`crc_combine`) and journals each band once every band before it in its tensor is journaled, so
the journal keeps its meaning (a prefix of rows, with their running crc32) and `--resume` redoes
the unjournaled bands only. A worker lost mid-band has its tasks rerun by Dask on another worker
(a band rewritten whole, at the same offsets, gives the same bytes).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.budget import peak_rss
from engine.cluster.crc_combine import crc32_combine
from engine.cluster.tasks import Band, Job, SafetensorsOutput, ZarrOutput, band_task, release_buffers, stats_task
from engine.dtypes import itemsize
from engine.errors import OutputError
from engine.execute import OnEvent
from engine.io.journal import Journal
from engine.io.safetensors_writer import ShardWriter
from engine.io.write_behind import Finite
from engine.io.zarr_writer import ZarrWriter
from engine.plan import Plan, TensorPlan
from engine.resume import interrupted, restore_start
from engine.signals import StopRequest
from engine.work import Work

BAND_BYTES = 256 << 20  # input bytes per band task: a task's fixed cost (~10 ms) well below its I/O
POLL_S = 0.05  # how often the driver looks for finished tasks and a stop request


def bands(tensor: TensorPlan, first_row: int, band_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges [r0, r1) of whole blocks from `first_row` on, each about `band_bytes` of input
    (at least one block); a tensor of one block is one band."""
    if tensor.n_blocks == 1:
        yield 0, tensor.rows
        return
    row_bytes = tensor.row_numel * sum(itemsize(d) for d in tensor.read_dtypes)
    per = max(1, band_bytes // max(row_bytes * tensor.block_rows, 1)) * tensor.block_rows
    for r0 in range(first_row, tensor.rows, per):
        yield r0, min(r0 + per, tensor.rows)


@dataclass
class DaskRunner:
    """Writes a merge's blocks on the cluster of `client` (a `distributed.Client`)."""

    client: Any
    threads: int | None = None  # compute threads per task (None: each worker's usable cores)
    band_bytes: int = BAND_BYTES

    def __call__(self, w: Work) -> set[str]:
        """Write every missing block of `w` on the cluster (`engine.work.Runner`)."""
        plan = w.plan
        with ExitStack() as stack:
            reopen = w.state is not None
            writer: ShardWriter | ZarrWriter = (  # the shards preallocated, or the arrays created, here, once
                ZarrWriter(w.tmp, plan, plan.spec.digest(), w.zfmt, reopen=reopen, root=w.zroot)
                if w.zfmt
                else ShardWriter(w.tmp, plan, w.metadata, reopen=reopen)
            )
            stack.callback(writer.close)
            journal = Journal.reopen(w.tmp) if w.state is not None else Journal.create(w.tmp, w.header)
            stack.callback(journal.close)
            chain = _Chain(plan, journal, w.emit, per_block=w.zfmt is not None)
            start, kept = restore_start(plan, writer, journal, w.state, chain.resume)
            chain.next = dict(start)
            journal.commit()
            output = (
                ZarrOutput(w.tmp, plan.spec.digest(), w.zfmt, w.zroot)
                if w.zfmt
                else SafetensorsOutput(w.tmp, w.metadata)
            )
            job = Job(plan, w.inv, output, w.reading, w.finite.strict, self.threads, w.sync_every)
            futures = self._submit(job, start)
            try:
                _collect(futures, chain, w.finite, w.stop, w.tmp)
            finally:
                self.client.cancel(list(futures))
                journal.commit()
        # each worker process's high-water RSS so far, to set beside the plan's per-worker peak
        peaks = self.client.run(peak_rss)
        self.client.run(release_buffers)
        w.emit({"event": "workers", "peak_rss": peaks, "predicted_peak_rss": plan.memory.predicted_peak})
        return kept

    def _submit(self, job: Job, start: Mapping[str, int]) -> dict[Any, TensorPlan]:
        """Every missing band's future (with its tensor), each after its tensor's statistics."""
        run = uuid.uuid4().hex[:12]
        job_f = self.client.submit(_the_job, job, key=f"leanmerge-job-{run}")  # recomputable if its holder is lost
        futures: dict[Any, TensorPlan] = {}
        for i, t in enumerate(job.plan.tensors):
            first = start.get(t.name, 0)
            if not t.numel or first >= t.rows:
                continue
            stats: Any = {}
            if t.n_blocks > 1 and t.passes > 1:
                stats = self.client.submit(stats_task, job_f, t.name, key=f"leanmerge-stats-{run}-{i}")
            for r0, r1 in bands(t, first, self.band_bytes):
                f = self.client.submit(band_task, job_f, t.name, r0, r1, stats, key=f"leanmerge-band-{run}-{i}-{r0}")
                futures[f] = t
        return futures


def warm_up() -> None:
    """Import the engine (and torch, 2-3 s on a loaded 2-core VM) in a worker before its first task."""
    import engine.cluster.tasks  # noqa: F401


def _the_job(job: Job) -> Job:
    return job


class _Chain:
    """Journals finished bands in row order per tensor, their crc32 chained (`crc32_combine`);
    `per_block`: a record per block (a zarr output's chunk crc32s come from them), else per band."""

    def __init__(self, plan: Plan, journal: Journal, emit: OnEvent, *, per_block: bool = False) -> None:
        self.journal, self.emit, self.per_block = journal, emit, per_block
        self.rows = {t.name: t.rows for t in plan.tensors}
        self.crc: dict[str, int] = {}
        self.next: dict[str, int] = {}  # per tensor: the first row not journaled (`restore_start`'s)
        self.waiting: dict[str, dict[int, Band]] = {}

    def resume(self, tensor: str, crc: int) -> None:
        """The running crc32 of rows an earlier run wrote (`engine.resume.restore_start`)."""
        self.crc[tensor] = crc

    def add(self, band: Band) -> None:
        """Journal `band` and the waiting bands it lets follow (each band's predecessor journaled)."""
        waiting = self.waiting.setdefault(band.tensor, {})
        waiting[band.r0] = band
        while (b := waiting.pop(self.next[band.tensor], None)) is not None:
            before = self.crc.get(b.tensor, 0)
            crc = self.crc[b.tensor] = crc32_combine(before, b.crc, b.nbytes)
            if self.per_block:  # each block's running crc32 within the band, chained onto the rows before it
                row_bytes = b.nbytes // (b.r1 - b.r0)
                for r0, r1, within in b.blocks:
                    self.journal.block(b.tensor, r0, r1, crc32_combine(before, within, (r1 - b.r0) * row_bytes))
            else:
                self.journal.block(b.tensor, b.r0, b.r1, crc)
            self.next[b.tensor] = b.r1
            if b.r1 == self.rows[b.tensor]:
                self.journal.tensor(b.tensor, self.crc.pop(b.tensor))
                self.emit({"event": "tensor", "name": b.tensor})


def _collect(futures: Mapping[Any, TensorPlan], chain: _Chain, finite: Finite, stop: StopRequest, tmp: Path) -> None:
    """Journal the bands as they finish (a durable commit per batch) until all are done; a stop
    request or a failed task ends it (the journal keeps what finished)."""
    from distributed import as_completed

    done = as_completed(list(futures))
    while not done.is_empty():
        if stop.requested():
            raise interrupted(stop, tmp)
        batch = done.next_batch(block=False)
        if not batch:
            time.sleep(POLL_S)
            continue
        for f in batch:
            band: Band = _result(f, futures[f], tmp)
            _count(finite, band)
            chain.add(band)
            chain.emit({"event": "block", "bytes": _read_bytes(futures[f], band)})
        chain.journal.commit()


def _result(future: Any, tensor: TensorPlan, tmp: Path) -> Band:
    from distributed import KilledWorker

    try:
        band: Band = future.result()
    except KilledWorker as e:
        raise OutputError(
            f"{tensor.name}: a task of this tensor killed {e.last_worker.address if e.last_worker else 'its'} worker "
            f"each time it ran (out of memory? lower --max-memory); the work so far is saved in {tmp}: "
            "fix the cause and run the same command with --resume"
        ) from None
    return band


def _count(finite: Finite, band: Band) -> None:
    if band.nonfinite:
        finite.counts[band.tensor] = finite.counts.get(band.tensor, 0) + band.nonfinite
    for src, n in band.nonfinite_inputs.items():
        per = finite.inputs.setdefault(src, {})
        per[band.tensor] = per.get(band.tensor, 0) + n


def _read_bytes(tensor: TensorPlan, band: Band) -> int:
    """What the band and its share of the statistics passes read (for the progress bar)."""
    per_row = tensor.row_numel * sum(itemsize(d) for d in tensor.read_dtypes)
    return (band.r1 - band.r0) * per_row * tensor.reads(None)  # the statistics task reads every pass
