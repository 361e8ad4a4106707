"""One writer per output: an advisory lock file beside the target, released when the process
ends however it ends (the kernel drops `flock` locks with the descriptor)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import OutputError


@contextmanager
def output_lock(target: Path) -> Iterator[Path]:
    """Hold the lock of `target` for the duration of the block (yields the lock file's path), or
    raise `OutputError`."""
    path = target.parent / f".{target.name}.leanmerge-lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(f"{target}: another leanmerge process (pid {other}) is writing this output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.unlink(path)  # while still holding the lock, so no other run is using it
    finally:
        os.close(fd)
