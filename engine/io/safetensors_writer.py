"""Output shards written in place: final header first, then blocks at their offsets.

Every offset is known from the plan, so each shard is created at its full size with its final
header, and blocks land at their places as soon as they are computed: never a whole tensor,
let alone a shard, in RAM. The header is padded with spaces (valid safetensors) so the data
starts 4096-aligned. Writes go through the page cache; every `SYNC_EVERY` bytes a shard is
flushed and dropped from the cache so a long merge does not fill RAM with dirty pages.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

from engine.errors import OutputError
from engine.plan import Plan, ShardPlan, TensorPlan

ALIGN = 4096
SYNC_EVERY = 256 << 20


def shard_header(plan: Plan, shard: ShardPlan, metadata: dict[str, str]) -> bytes:
    """The complete header (length prefix included) of one output shard."""
    by_name = {t.name: t for t in plan.tensors}
    entries: dict[str, object] = {"__metadata__": metadata}
    for name in shard.tensors:
        t = by_name[name]
        entries[name] = {"dtype": t.out_dtype, "shape": list(t.shape), "data_offsets": [t.offset, t.offset + t.out_nbytes]}
    body = json.dumps(entries, separators=(",", ":")).encode()
    padded = -(-(8 + len(body)) // ALIGN) * ALIGN - 8
    return struct.pack("<Q", padded) + body + b" " * (padded - len(body))


class ShardWriter:
    """Creates every output shard in `folder` and writes blocks at their planned offsets."""

    def __init__(self, folder: Path, plan: Plan, metadata: dict[str, str]) -> None:
        self._fds: list[int] = []
        self._data_start: list[int] = []
        self._unsynced: list[int] = []
        self.bytes_written = 0
        try:
            for shard in plan.shards:
                header = shard_header(plan, shard, metadata)
                path = folder / shard.file
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _reserve(fd, path, len(header) + shard.data_bytes)
                _pwrite_all(fd, path, header, 0)
                self._data_start.append(len(header))
                self._unsynced.append(0)
        except BaseException:
            self.close()
            raise
        self._paths = [folder / s.file for s in plan.shards]

    def write(self, tensor: TensorPlan, byte_offset: int, data: memoryview) -> None:
        """Write `data` at `byte_offset` inside `tensor`'s bytes."""
        fd = self._fds[tensor.shard]
        _pwrite_all(fd, self._paths[tensor.shard], data, self._data_start[tensor.shard] + tensor.offset + byte_offset)
        self.bytes_written += len(data)
        self._unsynced[tensor.shard] += len(data)
        if self._unsynced[tensor.shard] >= SYNC_EVERY:
            self._sync(tensor.shard)

    def _sync(self, i: int) -> None:
        os.fdatasync(self._fds[i])
        os.posix_fadvise(self._fds[i], 0, 0, os.POSIX_FADV_DONTNEED)
        self._unsynced[i] = 0

    def finish(self) -> None:
        """Make every byte durable, then close."""
        for i in range(len(self._fds)):
            self._sync(i)
        self.close()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _reserve(fd: int, path: Path, size: int) -> None:
    """Claim the disk space now, so a full disk fails before the work rather than after."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"{path}: no space left for {size} bytes on the output filesystem") from None
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
        raise OutputError(f"{path}: write at byte {offset + done} failed: {e.strerror}") from None
