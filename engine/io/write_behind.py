"""A writer thread: output blocks are written, checksummed and journaled while the next block is
being merged.

Each tensor gets a crc32 of its bytes, run along its blocks (they arrive in row order); the
journal records the running value after every block, so a resumed run checks what is on disk
and carries on from a plain integer. (crc32 runs at ~2 GB/s here through zlib and ~13 GB/s
through ISA-L, sha256 at ~1 GB/s: see engine.io.crc.) Every `sync_every` bytes the shards are
flushed to disk and only then are the journal records appended and fsync'd: whatever the journal
says is written, is. crc32 releases the GIL on large buffers, so this runs beside
the compute stage on another core.

Every merged float block is also checked for NaN/Inf (`Finite`): the output is the one place
that sees both a non-finite input carried through the arithmetic (a NaN in one input turns a
whole SLERP tensor NaN) and a value that overflows the output dtype (fp16). The reader threads
count the inputs' own NaN/Inf as each block lands (`Finite.check_input`), which names the input
that holds them. Counting: `engine.stats.finite`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.defaults import SYNC_EVERY
from engine.dtypes import DTYPES, byte_view, itemsize
from engine.errors import NonFiniteError
from engine.io.crc import crc32
from engine.io.safetensors_writer import ShardWriter
from engine.io.zarr_writer import ZarrWriter
from engine.plan import Block, TensorPlan
from engine.stats.finite import count_nonfinite


class Records(Protocol):
    """Where written blocks are recorded: the `Journal`, or a Dask worker's note of its band."""

    def block(self, tensor: str, r0: int, r1: int, crc: int) -> None: ...
    def tensor(self, tensor: str, crc: int) -> None: ...
    def commit(self) -> None: ...


_Job = tuple[TensorPlan, Block, torch.Tensor, torch.Tensor, Any] | None


@dataclass
class Finite:
    """NaN/Inf counted per tensor in the merged blocks written and in the inputs' blocks read (each
    block's first read, a resumed tensor's merge pass's); `strict` refuses the first."""

    strict: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, dict[str, int]] = field(default_factory=dict)  # input folder -> tensor -> count
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self, tensor: TensorPlan, block: Block, data: torch.Tensor) -> None:
        """Count the non-finite elements of one block (`data`: its bytes)."""
        if not tensor.merge:
            return  # copied through as stored, not computed here
        n = count_nonfinite(data.view(DTYPES[tensor.out_dtype]))
        if n == 0:
            return
        if self.strict:
            raise NonFiniteError(
                f"{tensor.name}: {n} NaN/Inf value(s) in merged rows {block.r0}..{block.r1}; --strict-finite refuses "
                "the merge (nothing was written): check the inputs for NaN/Inf, or use a wider --out-dtype"
            )
        self.counts[tensor.name] = self.counts.get(tensor.name, 0) + n

    def check_input(self, source: str, tensor: TensorPlan, block: Block, data: torch.Tensor) -> None:
        """Count the non-finite elements of input `source`'s block as read (1-D `data`, its
        stored dtype); the reader threads call this, one per input, at once."""
        n = count_nonfinite(data)
        if n == 0:
            return
        if self.strict:
            raise NonFiniteError(
                f"{source}: tensor {tensor.name!r} holds {n} NaN/Inf value(s) in rows {block.r0}..{block.r1}; "
                "--strict-finite refuses the merge (nothing was written): repair or leave out that input"
            )
        with self._lock:
            per_tensor = self.inputs.setdefault(source, {})
            per_tensor[tensor.name] = per_tensor.get(tensor.name, 0) + n


class WriteBehind:
    """Owns the output buffers: `take` one, fill it, `submit` it; `drain` waits for all writes."""

    def __init__(
        self,
        writer: ShardWriter | ZarrWriter,
        journal: Records,
        buffers: list[torch.Tensor],
        sync_every: int = SYNC_EVERY,
        finite: Finite | None = None,
    ) -> None:
        self.writer, self.journal, self.sync_every = writer, journal, sync_every
        self.finite = finite or Finite()
        self.bytes_written = 0
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._crc: dict[str, int] = {}
        self._unsynced = 0
        self._error: BaseException | None = None
        for b in buffers:
            self._free.put(b)
        self._thread = threading.Thread(target=self._run, name="leanmerge-writer", daemon=True)
        self._thread.start()

    def resume_crc(self, tensor: str, crc: int) -> None:
        """Continue the crc32 of a tensor whose first rows an earlier run wrote."""
        self._crc[tensor] = crc

    def take(self) -> torch.Tensor:
        """A free output buffer (uint8); waits while both are being written."""
        while True:
            self._raise_if_failed()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def submit(
        self, tensor: TensorPlan, block: Block, data: torch.Tensor, buffer: torch.Tensor, ready: Any = None
    ) -> None:
        """Queue `data` (a view of `buffer`) to be written as `block` of `tensor`, once `ready`
        (a CUDA event recorded after the block's last copy from the device; None: already) is."""
        self._raise_if_failed()
        self._jobs.put((tensor, block, data, buffer, ready))

    def drain(self) -> None:
        """Wait for every queued write, then make all of it durable and journaled."""
        self.close()
        self._raise_if_failed()
        self.writer.sync()
        self.journal.commit()

    def close(self) -> None:
        """Stop the thread after the queued writes (idempotent)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                self._write(*job)
        except BaseException as e:  # re-raised in the compute thread
            self._error = e
            while self._jobs.get() is not None:  # unblock a producer waiting on a full pipeline
                pass

    def _write(self, tensor: TensorPlan, block: Block, data: torch.Tensor, buffer: torch.Tensor, ready: Any) -> None:
        if ready is not None:
            ready.synchronize()
        self.finite.check(tensor, block, data)
        view = byte_view(data)
        self.writer.write(tensor, block.start * itemsize(tensor.out_dtype), view)
        crc = self._crc[tensor.name] = crc32(view, self._crc.get(tensor.name, 0))
        self.journal.block(tensor.name, block.r0, block.r1, crc)
        if block.r1 == tensor.rows:
            self.journal.tensor(tensor.name, self._crc.pop(tensor.name))
        self.bytes_written += len(view)
        self._unsynced += len(view)
        self._free.put(buffer)
        if self._unsynced >= self.sync_every:
            self.writer.sync()
            self.journal.commit()
            self._unsynced = 0
