"""The work of a merge once planned: what a `Runner` gets, the local runner, and the finish.

`merge()` (engine.merge) checks the target and opens or resumes the temporary folder; a
`Runner` writes every missing block into it, journaled (`write_blocks` in this process, or
`engine.cluster` on a Dask cluster); `finish` checks the inputs again and writes the record
(`verify`'s checksums, the side files) so the folder is ready to be renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, NonFiniteError, OutputError
from engine.execute import OnEvent, Pipeline, execute
from engine.io.checkpoint import ReadOptions
from engine.io.inventory import Inventory
from engine.io.journal import Journal, JournalState, load_journal
from engine.io.output import abort_output, copy_side_files, write_side_files
from engine.io.safetensors_writer import ShardWriter
from engine.io.write_behind import Finite, WriteBehind
from engine.io.zarr_format import Compression
from engine.io.zarr_record import finalize_zarr
from engine.io.zarr_writer import ZarrWriter
from engine.plan import Plan
from engine.resume import check_inputs_unchanged, interrupted, restore_start
from engine.signals import StopRequest


@dataclass(frozen=True)
class Work:
    """What a `Runner` gets: the plan and inputs, the temporary folder with its shard metadata
    and journal header, the resumed journal state (None: a fresh run), and the run's settings."""

    plan: Plan
    inv: Inventory
    tmp: Path
    metadata: dict[str, str]
    header: dict[str, Any]
    state: JournalState | None
    emit: OnEvent
    reading: ReadOptions
    sync_every: int
    stop: StopRequest
    finite: Finite
    zfmt: Compression | None = None  # a zarr output's compression; None: safetensors shards
    zroot: str | None = None  # a zarr output's group at a store URL (engine.io.zarr_url); None: in `tmp`


# Writes every missing block of `Work` into its temporary folder, journaled, and returns the
# tensors an earlier run had written whole that were kept: `write_blocks` here, or a cluster's.
Runner = Callable[[Work], set[str]]


def finish(w: Work, side: dict[str, Any], runner: Runner) -> set[str]:
    """Write every missing block into `w.tmp` with `runner` and finalize it (`side`: `write_side_files`'s
    options); returns the tensors an earlier run had written whole that were kept (their bytes re-checked).
    Input errors remove `tmp`; anything else leaves it to resume from."""
    try:
        kept = runner(w)
        check_inputs_unchanged(w.inv, w.header)
        final = load_journal(w.tmp)
        if final is None:
            raise OutputError(
                f"{w.tmp}: the temporary folder vanished during the merge; nothing was written: run again"
            )
        if w.zfmt:
            copy_side_files(w.tmp, w.plan, **side)
            finalize_zarr(w.tmp, w.plan, final, checksums(w.plan, final), w.zroot)
        else:
            write_side_files(w.tmp, w.plan, checksums(w.plan, final), **side)
        (w.tmp / "journal.jsonl").unlink()
    except (CheckpointError, NonFiniteError):
        abort_output(w.tmp)
        raise
    return kept


def write_blocks(w: Work) -> set[str]:
    """The local `Runner`: write every missing block into `w.tmp` in this process, journaled;
    returns the tensors an earlier run had written whole that were kept (re-checked on disk)."""
    plan, state = w.plan, w.state
    with ExitStack() as stack:
        writer: ShardWriter | ZarrWriter = (
            ZarrWriter(w.tmp, plan, plan.spec.digest(), w.zfmt, reopen=state is not None, root=w.zroot)
            if w.zfmt
            else ShardWriter(w.tmp, plan, w.metadata, reopen=state is not None)
        )
        stack.callback(writer.close)
        journal = Journal.reopen(w.tmp) if state is not None else Journal.create(w.tmp, w.header)
        stack.callback(journal.close)
        pipe = Pipeline.allocate(plan)
        stack.callback(pipe.close)
        if pipe.pinned.locked or pipe.pinned.failed:  # on CUDA: did the copies get page-locked buffers?
            w.emit(
                {
                    "event": "device",
                    "device": plan.device.device,
                    "pinned": pipe.pinned.locked,
                    "not_pinned": pipe.pinned.failed,
                }
            )
        out = WriteBehind(writer, journal, pipe.outs, w.sync_every, w.finite)
        stack.callback(out.close)
        start, kept = restore_start(plan, writer, journal, state, out.resume_crc)
        stop = w.stop.requested
        complete = execute(plan, w.inv, out, pipe, start=start, on_event=w.emit, reading=w.reading, should_stop=stop)
        out.drain()
        if not complete:
            raise interrupted(w.stop, w.tmp)
    return kept


def checksums(plan: Plan, state: JournalState) -> dict[str, str]:
    """crc32 of every tensor as 8 hex digits (an empty tensor's is 00000000)."""
    sums = {t.name: state.done.get(t.name, 0 if t.numel == 0 else None) for t in plan.tensors}
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise OutputError(
            f"finalize: {len(missing)} tensor(s) were never completed, e.g. {missing[:3]}; rerun with --resume"
        )
    return {n: f"{s:08x}" for n, s in sums.items()}
