"""Ending the decode threads that the timeout tests abandon on purpose.

A test of ``decode_timeout`` points a decoder at a named pipe that nobody writes, so the decode
thread blocks inside FFmpeg and is abandoned. Left blocked (or running on when the pipe is
released later), such a thread is inside decord or PyAV whenever a later test forks DataLoader
workers, and a forked worker inherits that half-done decoder state: CI saw workers segfault in
decord right after these tests. So every test that abandons a thread ends it before returning.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def release_hung_decodes(fifo: str | Path, timeout: float = 20.0) -> None:
    """Unblock every decode thread stuck on ``fifo`` (a writer opens and closes it: the reader
    sees end of file, the decoder fails) and wait until they have all ended; a decoder that
    falls back to another backend blocks on the pipe again and is released again."""
    name = f"decode:{Path(fifo).name}"
    deadline = time.monotonic() + timeout
    while any(t.name == name and t.is_alive() for t in threading.enumerate()):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails (ENXIO) while no reader waits
            os.close(fd)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"decode threads on {fifo} did not end within {timeout:g} s")
        time.sleep(0.02)
