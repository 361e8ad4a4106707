"""What an interrupted merge left, and how the next run continues it.

A run keeps its work in the temporary folder with its journal (engine.io.journal). The next run
with `--resume` reopens it only for the same spec, inputs (by content: engine.io.fingerprint)
and output layout, re-reads every journaled row against the journal's running crc32 before
keeping it (`restore_start`), and fingerprints the inputs again before finalizing: nothing a
changed input or a damaged byte touched is renamed into place.
"""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.budget import fmt_bytes
from engine.errors import CheckpointError, Interrupted, OutputError
from engine.execute import first_rows
from engine.io.crc import crc32
from engine.io.fingerprint import fingerprint, input_change
from engine.io.inventory import Inventory
from engine.io.journal import Journal, JournalState, check_resumable, load_journal
from engine.io.safetensors_writer import ShardWriter
from engine.io.zarr_writer import ZarrWriter
from engine.plan import Plan, TensorPlan
from engine.signals import StopRequest

log = logging.getLogger(__name__)
SPACE_MARGIN = 64 << 20  # journal, index and side files
REHASH_PIECE = 16 << 20


def open_temp(tmp: Path, plan: Plan, header: dict[str, Any], resume: bool, data_bytes: int) -> JournalState | None:
    """The journal state to resume from, or None after creating a fresh temporary folder that
    will hold `data_bytes` of weights (0: they go to a store, engine.io.zarr_url)."""
    if tmp.exists():
        state = load_journal(tmp)
        if state is not None and resume:
            check_resumable(state, header, tmp)
            return state
        if state is not None:
            raise OutputError(
                f"{tmp}: an interrupted run left this folder; run the same command with --resume to continue it, "
                "or remove the folder to start over"
            )
        shutil.rmtree(tmp)  # never got as far as writing data
    elif resume:
        log.info("nothing to resume at %s: starting a fresh merge", tmp)
    free = shutil.disk_usage(tmp.parent).free
    if free < data_bytes + SPACE_MARGIN:
        raise OutputError(
            f"{tmp.parent}: {fmt_bytes(free)} free, the merged model needs {fmt_bytes(data_bytes + SPACE_MARGIN)}"
        )
    tmp.mkdir()
    return None


def interrupted(stop: StopRequest, tmp: Path) -> Interrupted:
    """The error a stopped run ends with: which signal, where the work is, how to continue."""
    name = signal.Signals(stop.signum).name
    return Interrupted(
        f"stopped by {name}; the work so far is saved in {tmp}: run the same command with --resume", stop.signum
    )


def restore_start(
    plan: Plan,
    writer: ShardWriter | ZarrWriter,
    journal: Journal,
    state: JournalState | None,
    resume_crc: Callable[[str, int], None],
) -> tuple[dict[str, int], set[str]]:
    """The first row to write of every tensor, after re-checking on disk what an earlier run
    journaled (`_restore_prefix`), and the tensors it had written whole (kept, not merged again)."""
    start = first_rows(plan, {t.name: state.rows_done(t.name) for t in plan.tensors} if state else {})
    for t in plan.tensors:
        if state is not None and start[t.name] > 0 and t.numel:
            start[t.name] = _restore_prefix(writer, resume_crc, journal, t, start[t.name], state)
    # every row on disk and re-checked: merged by the earlier run, not by this one
    return start, {t.name for t in plan.tensors if state is not None and t.numel and start[t.name] >= t.rows}


def _restore_prefix(
    writer: ShardWriter | ZarrWriter,
    resume_crc: Callable[[str, int], None],
    journal: Journal,
    tensor: TensorPlan,
    rows: int,
    state: JournalState,
) -> int:
    """Re-read the rows [0, rows) an earlier run wrote and check the running crc32 the journal
    recorded after each block: resume keeps only what it has re-checked, finished tensors too
    (a byte damaged on disk since is rewritten, never renamed into place).

    Returns the row to continue from: `rows`, or 0 if the bytes on disk do not match the journal.
    A finished tensor whose "t" record was torn off the journal gets it again.
    """
    row_bytes = tensor.out_nbytes // tensor.rows
    crc = 0
    for r0, r1, want in sorted(state.blocks[tensor.name]):
        if r0 >= rows:
            break
        for pos in range(r0 * row_bytes, r1 * row_bytes, REHASH_PIECE):
            crc = crc32(writer.read_back(tensor, pos, min(REHASH_PIECE, r1 * row_bytes - pos)), crc)
        if crc != want:
            log.warning("%s: rows %d..%d on disk do not match the journal; rewriting the tensor", tensor.name, r0, r1)
            state.done.pop(tensor.name, None)
            return 0
    if rows < tensor.rows:
        resume_crc(tensor.name, crc)
    elif state.done.get(tensor.name) != crc:
        journal.tensor(tensor.name, crc)
        state.done[tensor.name] = crc
    return rows


def check_inputs_unchanged(inv: Inventory, header: dict[str, Any]) -> None:
    """Fingerprint the inputs again before finalizing: one changed while the merge read it
    (so the output may mix its old and new data) discards the output."""
    change = input_change(header["inputs"], fingerprints(inv))
    if change:
        raise CheckpointError(
            f"{change} since the merge started reading it; the output is discarded: run the merge again"
        )


def fingerprints(inv: Inventory) -> list[dict[str, Any]]:
    """Every input shard's fingerprint, base first (what the journal header pins)."""
    return [fp for c in (inv.base, *inv.models) for fp in fingerprint(c)]
