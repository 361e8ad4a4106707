"""Graceful stop on SIGINT / SIGTERM: the first signal asks the merge to stop after the current
block (the journal is then synced and the run can resume); a second one exits at once, which is
safe because the journal only ever records bytes that are already on disk."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)


@dataclass
class StopRequest:
    signum: int = 0

    def requested(self) -> bool:
        return self.signum != 0


@contextmanager
def graceful_stop(enabled: bool = True, at_exit: Callable[[], None] | None = None) -> Iterator[StopRequest]:
    """Install the handlers for the duration of the block (main thread only); `at_exit` runs
    before a second signal's immediate exit (to clean up and say how to resume)."""
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.signum:
            try:
                if at_exit is not None:
                    at_exit()
            finally:
                os._exit(128 + signum)
        stop.signum = signum
        log.warning(
            "%s: finishing the current block, then stopping (send again to exit at once)", signal.Signals(signum).name
        )

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
