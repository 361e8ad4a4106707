"""Output shards written in place: final header first, then blocks at their offsets.

Every offset is known from the plan, so each shard is created at its full size with its final
header, and blocks land at their places as soon as they are computed: never a whole tensor,
let alone a shard, in RAM. The header is padded with spaces (valid safetensors) so the data
starts 4096-aligned. Creating the shards claims their disk space up front (`posix_fallocate`),
so a disk too small fails before the work, not an hour into it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path

from engine.errors import OutputError, ResumeError
from engine.plan import Plan, ShardPlan, TensorPlan

ALIGN = 4096


def shard_header(plan: Plan, shard: ShardPlan, metadata: dict[str, str]) -> bytes:
    """The complete header (length prefix included) of one output shard."""
    by_name = {t.name: t for t in plan.tensors}
    entries: dict[str, object] = {"__metadata__": metadata}
    for name in shard.tensors:
        t = by_name[name]
        entries[name] = {
            "dtype": t.out_dtype,
            "shape": list(t.shape),
            "data_offsets": [t.offset, t.offset + t.out_nbytes],
        }
    body = json.dumps(entries, separators=(",", ":")).encode()
    padded = -(-(8 + len(body)) // ALIGN) * ALIGN - 8
    return struct.pack("<Q", padded) + body + b" " * (padded - len(body))


def layout_digest(plan: Plan, metadata: dict[str, str]) -> str:
    """sha256 over every output header: equal digests mean byte-identical layouts."""
    h = hashlib.sha256()
    for shard in plan.shards:
        h.update(shard.file.encode() + b"\0" + shard_header(plan, shard, metadata))
    return h.hexdigest()


class ShardWriter:
    """Creates (or, to resume, reopens) every output shard in `folder`; writes at planned offsets."""

    def __init__(self, folder: Path, plan: Plan, metadata: dict[str, str], *, reopen: bool = False) -> None:
        self._fds: list[int] = []
        self._data_start: list[int] = []
        self._paths = [folder / s.file for s in plan.shards]
        self.dirty: set[int] = set()
        try:
            for shard, path in zip(plan.shards, self._paths):
                header = shard_header(plan, shard, metadata)
                self._fds.append(self._reopen(path, header) if reopen else self._create(path, header, shard.data_bytes))
                self._data_start.append(len(header))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _create(path: Path, header: bytes, data_bytes: int) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            _reserve(fd, path, len(header) + data_bytes)
            _pwrite_all(fd, path, header, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _reopen(path: Path, header: bytes) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ResumeError(f"{path}: cannot reopen the interrupted run's shard: {e.strerror}") from None
        if os.pread(fd, len(header), 0) != header:
            os.close(fd)
            raise ResumeError(f"{path}: header differs from this run's plan; remove the temporary folder to start over")
        return fd

    def position(self, tensor: TensorPlan, byte_offset: int) -> tuple[int, int]:
        """(shard index, absolute file offset) of `byte_offset` inside `tensor`."""
        return tensor.shard, self._data_start[tensor.shard] + tensor.offset + byte_offset

    def write(self, tensor: TensorPlan, byte_offset: int, data: memoryview) -> None:
        """Write `data` at `byte_offset` inside `tensor`'s bytes."""
        shard, pos = self.position(tensor, byte_offset)
        _pwrite_all(self._fds[shard], self._paths[shard], data, pos)
        self.dirty.add(shard)

    def read_back(self, tensor: TensorPlan, byte_offset: int, nbytes: int) -> bytes:
        """Bytes already written (used to re-check and re-hash a resumed tensor's prefix)."""
        shard, pos = self.position(tensor, byte_offset)
        return os.pread(self._fds[shard], nbytes, pos)

    def sync(self) -> None:
        """Make every written byte durable, then drop it from the page cache (a long merge would
        otherwise fill RAM with dirty pages that count against memory-capped jobs)."""
        for i in sorted(self.dirty):
            try:
                os.fdatasync(self._fds[i])
            except OSError as e:
                raise OutputError(f"{self._paths[i]}: flushing to disk failed: {e.strerror}") from None
            os.posix_fadvise(self._fds[i], 0, 0, os.POSIX_FADV_DONTNEED)
        self.dirty.clear()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _reserve(fd: int, path: Path, size: int) -> None:
    """Claim the disk space now, so a full disk fails before the work rather than after."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            raise OutputError(
                f"{path}: no space left for {size} bytes on the output filesystem ({e.strerror})"
            ) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise OutputError(f"{path}: cannot allocate {size} bytes: {e.strerror}") from None
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, path: Path, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        raise OutputError(
            f"{path}: write at byte {offset + done} failed: {e.strerror}; the journal is intact: "
            "fix the cause and run the same command with --resume"
        ) from None
