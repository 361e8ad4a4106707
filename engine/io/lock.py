"""One writer per output: an advisory lock file beside the target, released when the process
ends however it ends (the kernel drops `flock` locks with the descriptor).

The lock file is opened without following a link (`O_NOFOLLOW`) and used only when it is a
plain file of one link: a symbolic or hard link planted at its name would otherwise have the
merge truncate whatever it names and write a PID into it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import OutputError

OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.leanmerge-lock"


@contextmanager
def output_lock(target: Path, shown: str | None = None) -> Iterator[Path]:
    """Hold the lock of `target` for the duration of the block (yields the lock file's path), or
    raise `OutputError` naming `shown` (default: `target`; a store URL's local anchor is named by its URL)."""
    path = lock_path(target)
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(
                f"{shown or target}: another leanmerge process (pid {other}) is writing this output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still holding the lock, so no other run is using it
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    """The lock file's descriptor; refuses a link or anything but a plain file."""
    try:
        fd = os.open(path, OPEN_FLAGS, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(
                f"{path}: a symbolic link where leanmerge keeps its lock file; remove it (it was not followed)"
            ) from None
        raise OutputError(f"{path}: cannot open the lock file: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a plain file"
        raise OutputError(f"{path}: {what} where leanmerge keeps its lock file; remove it (it was left unchanged)")
    return fd
