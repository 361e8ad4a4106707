"""The resume journal: an append-only, fsync'd record of what a merge has durably written.

`journal.jsonl` in the temporary output folder starts with a header line that pins down the run
(spec digest, input fingerprints, output layout). Each later line records either a written
block `{"b": tensor, "r0", "r1", "crc32"}` (the tensor's running crc32 up to row r1) or a finished
tensor `{"t": tensor, "crc32"}`.
Lines are appended only after the bytes they describe are on disk (`fdatasync`), and the journal
itself is fsync'd, so after any crash every recorded block is really there. A torn tail (killed
or out of space mid-append: a cut line, a line without its newline, zeros) is discarded on
loading and cut off before appending, so the work it described is redone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import OutputError, ResumeError
from engine.io.fingerprint import input_change

JOURNAL_NAME = "journal.jsonl"
VERSION = 1


@dataclass
class JournalState:
    """What an earlier run finished: whole tensors (with their crc32) and block row ranges."""

    header: dict[str, Any]
    done: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # tensor -> (r0, r1, running crc)

    def rows_done(self, tensor: str) -> int:
        """Rows [0, n) of `tensor` covered by contiguous recorded blocks."""
        n = 0
        for r0, r1, _ in sorted(self.blocks.get(tensor, [])):
            if r0 > n:
                break
            n = max(n, r1)
        return n


class Journal:
    """Appends records; `commit` makes them durable (the caller syncs the data first)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._pending: list[bytes] = []

    @classmethod
    def create(cls, folder: Path, header: dict[str, Any]) -> Journal:
        path = folder / JOURNAL_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        journal = cls(path, fd)
        journal._pending.append(_line({"leanmerge_journal": VERSION, **header}))
        journal.commit()
        return journal

    @classmethod
    def reopen(cls, folder: Path) -> Journal:
        """Open for appending after cutting a torn last line, so new records follow whole ones."""
        path = folder / JOURNAL_NAME
        _, length = _whole_lines(path.read_bytes())
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.ftruncate(fd, length)
        return cls(path, fd)

    def block(self, tensor: str, r0: int, r1: int, crc: int) -> None:
        self._pending.append(_line({"b": tensor, "r0": r0, "r1": r1, "crc32": crc}))

    def tensor(self, tensor: str, crc: int) -> None:
        self._pending.append(_line({"t": tensor, "crc32": crc}))

    def commit(self) -> None:
        """Append and fsync the pending records."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, "short write")
            os.fsync(self._fd)
        except OSError as e:
            raise OutputError(
                f"{self.path}: cannot extend the journal: {e.strerror}; the journal up to its last complete "
                "line is intact: free space and run the same command with --resume"
            ) from None
        self._pending.clear()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _whole_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The records of `data` up to its first torn or malformed line, and their length in bytes."""
    records: list[dict[str, Any]] = []
    pos = 0
    while (end := data.find(b"\n", pos)) >= 0:
        try:
            rec = json.loads(data[pos:end])
        except ValueError:
            break
        if not isinstance(rec, dict) or not (pos == 0 or _well_formed(rec)):
            break
        records.append(rec)
        pos = end + 1
    return records, pos


def _well_formed(rec: dict[str, Any]) -> bool:
    """A tensor record `{"t": name, "crc32"}` or a block record `{"b": name, "r0", "r1", "crc32"}`
    with the types we write: a damaged line that still parses as JSON ends the journal there."""
    key, ints = ("t", ("crc32",)) if "t" in rec else ("b", ("r0", "r1", "crc32"))
    return type(rec.get(key)) is str and all(type(rec.get(k)) is int for k in ints)


def load_journal(folder: Path) -> JournalState | None:
    """The state recorded in `folder`'s journal, or None when there is none."""
    path = folder / JOURNAL_NAME
    if not path.is_file():
        return None
    records, _ = _whole_lines(path.read_bytes())
    if not records:
        raise ResumeError(f"{path}: the journal header is unreadable; remove {folder} and start over")
    header = records[0]
    if header.get("leanmerge_journal") != VERSION:
        raise ResumeError(f"{path}: not a leanmerge journal of version {VERSION}; remove {folder} and start over")
    state = JournalState(header)
    for rec in records[1:]:
        if "t" in rec:
            state.done[rec["t"]] = rec["crc32"]
        elif rec["r0"] == 0:  # a tensor (re)written from its start: earlier records are stale
            state.done.pop(rec["b"], None)
            state.blocks[rec["b"]] = [(0, rec["r1"], rec["crc32"])]
        else:
            state.blocks.setdefault(rec["b"], []).append((rec["r0"], rec["r1"], rec["crc32"]))
    return state


def check_resumable(state: JournalState, header: dict[str, Any], folder: Path) -> None:
    """Raise `ResumeError` naming the first field where this run differs from the journaled one
    (for the inputs: the file, and the tensor whose sampled bytes differ)."""
    for key in ("spec", "inputs", "layout"):
        if state.header.get(key) != header[key]:
            raise ResumeError(
                f"{folder}: cannot resume: the {key} changed since the interrupted run "
                f"({_what_changed(key, state.header.get(key), header[key])}); "
                f"run the original command again, or remove {folder} to start over"
            )


def _what_changed(key: str, old: Any, new: Any) -> str:
    if key == "inputs":
        return input_change(old, new) or "the inputs differ"
    if key == "spec" and isinstance(old, dict) and isinstance(new, dict):
        diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"fields {', '.join(diffs)}"
    return "the output shard layout differs"
