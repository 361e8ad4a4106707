"""The reader side of a run: a thread that fills reused block buffers ("slots") in the order the
compute stage will consume them, and what the stage tells it back: which statistics passes it
skips (`Decisions`).

`engine.execute` wires a `Prefetcher` to an `engine.stage.Stage`; the two meet only through the
two queues here (free slots one way, filled ones the other), so the disk reads block k+1 while
block k is merged, and through `Decisions`, which the reader waits on only where a read depends
on one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.dtypes import DTYPES, itemsize
from engine.io.lora import RowReader
from engine.io.write_behind import Finite
from engine.plan import Block, TensorPlan

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
# One read of the schedule: a block, and whether its read counts the inputs' NaN/Inf (each block
# once); or None just before the schedule waits on the stage's word (`Decisions`), so that the
# reader hands over the block it holds first.
Read = tuple[TensorPlan, Block, bool] | None
_END = object()


def unread_base(tensor: TensorPlan, block: Block, slot: Slot) -> torch.Tensor:
    """Stands in for a base the method ignores: the right dtype and length, never read or written
    (its pages need not even be touched)."""
    dtype = tensor.in_dtypes[0]
    return slot[0][: block.numel * itemsize(dtype)].view(DTYPES[dtype])


@dataclass(frozen=True)
class InputCheck:
    """Where the reads the schedule marks count the inputs' NaN/Inf: into `finite`, by input folder."""

    finite: Finite
    sources: Sequence[str]


class Decisions:
    """The stage's word to the reader on each statistics pass that may be skipped
    (`TensorPlan.skippable`): whether it runs, in pass order, by tensor. The reader reads on without
    them as far as the fewest scans go, and asks only where the next read depends on one."""

    def __init__(self) -> None:
        self._said: dict[str, list[bool]] = {}
        self._changed = threading.Condition()
        self._closed = False

    def decide(self, tensor: str, runs: bool) -> None:
        with self._changed:
            self._said.setdefault(tensor, []).append(runs)
            self._changed.notify_all()

    def scan_runs(self, tensor: TensorPlan, first_row: int | None, j: int) -> bool:
        """Whether the tensor's (j + 1)-th scan runs; waits for the stage's word where that
        depends on it (False once closed)."""
        fewest, skippable = tensor.fewest_scans(first_row), tensor.scans(first_row) - tensor.fewest_scans(first_row)
        with self._changed:
            while True:
                said = self._said.get(tensor.name, [])
                if j < fewest + sum(said):
                    return True
                if len(said) >= skippable or self._closed:
                    return False
                self._changed.wait()

    def close(self) -> None:
        """Wake a reader waiting on a word that will not come (the stage stopped or failed)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Prefetcher:
    """A reader thread that fills free slots in schedule order; iterate to get filled ones.

    The input streams of a block are read in parallel, one thread per stream: a virtual disk
    serves several outstanding requests faster than one (four files read cold here: 0.96 GB/s
    from one thread, 1.34 GB/s from two). Each thread still reads its file front to back.
    Errors in the threads are re-raised in the consumer; `stop` ends them early.
    """

    def __init__(
        self,
        schedule: Iterator[Read],
        readers: Sequence[RowReader],
        slots: list[Slot],
        check: InputCheck | None = None,
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

    def _run(self, schedule: Iterator[Read], readers: Sequence[RowReader]) -> None:
        try:
            upcoming: Read | object = next(schedule, _END)
            while upcoming is not _END:
                current, upcoming = upcoming, next(schedule, _END)
                if not isinstance(current, tuple):  # None: the schedule asked the stage (in `next`)
                    continue
                tensor, block, counted = current
                if isinstance(upcoming, tuple):  # the disk reads ahead while we wait for a slot and read this block
                    for i in upcoming[0].streams:
                        readers[i].advise_rows(upcoming[0].name, upcoming[1].r0, upcoming[1].r1)
                slot = self._take_free()
                if slot is None:
                    return
                reads = [
                    self._pool.submit(self._read, readers[i], i, tensor, block, slot, counted) for i in tensor.streams
                ]
                data = [r.result().reshape(-1) for r in reads]
                if tensor.streams[0] != 0:
                    data.insert(0, unread_base(tensor, block, slot))
                self._ready.put((tensor, block, Filled(slot, data)))
            self._ready.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._ready.put(e)

    def _read(
        self, reader: RowReader, i: int, tensor: TensorPlan, block: Block, slot: Slot, counted: bool
    ) -> torch.Tensor:
        """Input `i`'s rows of `block` into its buffer of `slot`, NaN/Inf counted where the
        schedule says (`counted`), here on the reader thread, beside the merge."""
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
