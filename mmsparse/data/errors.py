"""Media failures: one exception type carrying a reason, a diagnosis helper, and the counter.

Reasons (``REASONS``): ``missing`` (no such file), ``unreadable`` (a directory, no permission,
I/O error), ``empty`` (zero bytes), ``truncated`` (the container declares more bytes than the
file holds, or a stream holds less than its header declares), ``corrupt`` (anything else the
decoder rejects), ``corrupt_audio`` (the audio track fails to decode, or decodes short of its
declared duration: damaged packets), ``no_audio`` (audio required but the file has no audio
track), ``too_short`` (fewer frames than asked), ``timeout`` (decode did not finish in time),
``crashed`` (the decoder killed its DataLoader worker, e.g. a segfault in decord's C++ on a
damaged file; see ``CrashGuard``).

Decoder libraries' own log lines (decord's C++ checks, its bundled FFmpeg) are captured from the
process's stderr while they run (``capture_stderr``) and shown only as an error's detail.

A decode that the configured fallback backend rescued (see ``decode.with_fallback``) is not a
failure: ``FailureStats`` counts it apart, as ``fallback``, with the path and the primary
backend's error.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("mmsparse.data")

REASONS = ("missing", "unreadable", "empty", "truncated", "corrupt", "corrupt_audio", "no_audio", "too_short",
           "timeout", "crashed")


class MediaError(Exception):
    """A sample could not be loaded; ``reason`` is one of ``REASONS``.

    A DataLoader worker hands an exception to the main process as its type and formatted text,
    and torch rebuilds it there by calling the type with that text alone ("Caught MediaError in
    DataLoader worker process 0. Original Traceback ... MediaError: <path>: <reason> (<detail>)");
    given one argument, MediaError reads its path, reason and detail back from that text, so
    strict mode raises a MediaError from workers as it does without them.
    """

    def __init__(self, path: str | Path, reason: str | None = None, detail: str = ""):
        if reason is None:
            path, reason, detail = _parse_worker_text(str(path))
        if reason not in REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; expected one of {REASONS}")
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # picklable across DataLoader workers
        return (MediaError, (self.path, self.reason, self.detail))


_WORKER_TEXT = re.compile(r"MediaError: (?P<path>.*?): (?P<reason>" + "|".join(REASONS) + r")(?: \((?P<detail>.*)\))?$")


def _parse_worker_text(text: str) -> tuple[str, str, str]:
    """(path, reason, detail) from the last ``MediaError: ...`` line of a worker's traceback."""
    for line in reversed(text.strip().splitlines()):
        m = _WORKER_TEXT.search(line.strip())
        if m:
            return m["path"], m["reason"], m["detail"] or ""
    raise ValueError(f"MediaError needs (path, reason[, detail]); got only {text[:200]!r}")


class TooManyBadSamples(RuntimeError):
    """The fraction of failed samples passed the configured bound; the message is the summary."""


def check_file(path: str | Path) -> None:
    """Raise MediaError for a path that cannot be a media file before any decoder touches it.

    Non-regular files (named pipes, devices) are passed on: FFmpeg can read them, and a pipe
    that never delivers is what the decode timeout is for.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise MediaError(p, "missing", "no such file") from None
    except OSError as err:
        raise MediaError(p, "unreadable", err.strerror or str(err)) from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(p, "unreadable", "is a directory")
    if stat.S_ISREG(st.st_mode):
        if st.st_size == 0:
            raise MediaError(p, "empty", "zero-length file")
        if not os.access(p, os.R_OK):
            raise MediaError(p, "unreadable", "permission denied")


class _StderrCapture:
    """Output written to file descriptor 2 (by C and C++ libraries, which Python cannot
    intercept) while a capture is open goes to a temporary file instead of the terminal.

    One capture per process at a time (a nested or concurrent one captures nothing of its
    own). ``restore`` puts the terminal back even while a capture is open, for a decode that was
    abandoned inside one (``decode.call_with_timeout``); that capture's end then changes nothing.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._saved: int | None = None  # the terminal's fd 2, while a capture is open
        self._owner: object | None = None

    @contextlib.contextmanager
    def capture(self):
        """Yields a list that holds the captured text (one string) once the block has ended."""
        out: list[str] = []
        token, f = object(), None
        with self._lock:
            if self._owner is None:
                try:
                    f = tempfile.TemporaryFile(mode="w+b")
                    saved = os.dup(2)
                    os.dup2(f.fileno(), 2)
                    self._saved, self._owner = saved, token
                except OSError:  # no fd 2 to redirect: capture nothing
                    if f is not None:
                        f.close()
                    f = None
        try:
            yield out
        finally:
            if f is not None:
                with self._lock:
                    if self._owner is token:
                        self._restore_fd()
                f.seek(0)
                out.append(f.read().decode("utf-8", "replace"))
                f.close()

    def _restore_fd(self) -> None:
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        self._saved = self._owner = None

    def restore(self) -> None:
        with self._lock:
            self._restore_fd()


_STDERR = _StderrCapture()
capture_stderr = _STDERR.capture  # with capture_stderr() as log: ...; then "".join(log)
restore_stderr = _STDERR.restore


# decord's log prefix: "[08:46:50] /github/workspace/src/video/video_reader.cc:486: "
_LOG_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+\.(?:cc|cpp|h):\d+: ")


def library_log(text: str, keep: int = 3) -> str:
    """The last ``keep`` distinct non-empty lines of a captured library log, without decord's
    time and source-file prefixes, joined with "; "."""
    lines: list[str] = []
    for line in (_LOG_PREFIX.sub("", " ".join(t.split())) for t in text.splitlines()):
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines[-keep:])


def iso_bmff_truncated(path: Path) -> bool:
    """True when an MP4/MOV top-level box runs past the end of the file (a cut-off download)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 8 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
                return False
            pos = 0
            while pos + 8 <= size:
                fh.seek(pos)
                hdr = fh.read(16)
                n = int.from_bytes(hdr[:4], "big")
                if n == 1 and len(hdr) >= 16:
                    n = int.from_bytes(hdr[8:16], "big")
                elif n == 0:  # box extends to the end of the file by definition
                    return False
                if n < 8:
                    return False
                if pos + n > size:
                    return True
                pos += n
    except OSError:
        return False
    return False


def diagnose(path: str | Path, err: BaseException) -> MediaError:
    """Turn a decoder exception into a MediaError with the most specific reason."""
    if isinstance(err, MediaError):
        return err
    p = Path(path)
    try:
        check_file(p)
    except MediaError as pre:
        return pre
    detail = " ".join(str(err).split())[:200] or type(err).__name__
    if isinstance(err, (PermissionError, IsADirectoryError)):
        return MediaError(p, "unreadable", detail)
    if iso_bmff_truncated(p):
        return MediaError(p, "truncated", detail)
    return MediaError(p, "corrupt", detail)


@contextlib.contextmanager
def media_errors(path: str | Path):
    """Around a decoder call on ``path``: a MediaError passes as it is, any other exception
    becomes the MediaError that ``diagnose`` finds for it (chained, so the decoder's own error
    stays in the traceback)."""
    try:
        yield
    except MediaError:
        raise
    except Exception as err:
        raise diagnose(path, err) from err


class FailureStats:
    """Per-reason failure counts shared by the main process and every DataLoader worker.

    Counts live in shared memory (``multiprocessing.RawArray``), so the bad-fraction bound is
    checked against the whole loader, not one worker. The last few failures (path and reason)
    are kept per process for the report.
    """

    def __init__(self, keep: int = 20):
        ctx = mp.get_context()
        self._counts = ctx.RawArray("q", len(REASONS) + 2)  # [attempts, *reasons, fallbacks]
        self._lock = ctx.Lock()
        self.keep = keep
        self.recent: list[tuple[str, str, str]] = []
        self.recent_fallbacks: list[tuple[str, str, str]] = []  # (path, rescuing backend, primary's error)

    def attempt(self) -> None:
        with self._lock:
            self._counts[0] += 1

    def record(self, err: MediaError, warn: bool = True) -> None:
        """Count ``err``; ``warn``: also log it (a caller that reports it itself passes False)."""
        with self._lock:
            self._counts[1 + REASONS.index(err.reason)] += 1
        self.recent = (self.recent + [(err.path, err.reason, err.detail)])[-self.keep:]
        if warn:
            log.warning("skipping %s: %s%s", err.path, err.reason, f" ({err.detail})" if err.detail else "")

    def fallback(self, err: MediaError, backend: str) -> None:
        """The primary backend failed with ``err`` and ``backend`` decoded the sample instead."""
        with self._lock:
            self._counts[-1] += 1
        entry = (err.path, backend, f"{err.reason}: {err.detail}")
        self.recent_fallbacks = (self.recent_fallbacks + [entry])[-self.keep:]
        # a warning like a failure's: a file only the fallback reads costs a second open every epoch
        log.warning("fallback: decoded %s with %s after the primary backend failed: %s (%s)", err.path, backend,
                    err.reason, err.detail)

    @property
    def fallbacks(self) -> int:
        """Samples decoded by the fallback backend after the primary failed (not failures)."""
        return int(self._counts[-1])

    @property
    def attempts(self) -> int:
        return int(self._counts[0])

    @property
    def counts(self) -> dict[str, int]:
        return {r: int(self._counts[1 + i]) for i, r in enumerate(REASONS) if self._counts[1 + i]}

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def fraction(self) -> float:
        return self.bad / self.attempts if self.attempts else 0.0

    def reset(self) -> None:
        with self._lock:
            for i in range(len(self._counts)):
                self._counts[i] = 0
        self.recent = []
        self.recent_fallbacks = []

    def summary(self) -> str:
        by = ", ".join(f"{k}={v}" for k, v in self.counts.items()) or "none"
        lines = [f"{self.bad} of {self.attempts} sample loads failed ({self.fraction():.1%}); by reason: {by}"
                 + (f"; fallback={self.fallbacks} (decoded by the fallback backend)" if self.fallbacks else "")]
        lines += [f"  {p}: {r}" + (f" ({d})" if d else "") for p, r, d in self.recent]
        lines += [f"  {p}: fallback to {b} ({d})" for p, b, d in self.recent_fallbacks]
        return "\n".join(lines)


class CrashGuard:
    """Which sample each DataLoader worker is decoding, and which samples crashed a worker.

    A decoder that dies in C code (decord segfaults on some damaged files) takes its worker
    process with it; Python never sees an exception. The guard makes that survivable: before a
    decode, the worker writes (its pid, the sample index, the attempt level) into its slot of a
    shared array; the loader (``MediaLoader``), told by torch which worker pid died, finds the
    sample in that slot, marks it here and restarts its workers. A marked sample's level says
    how it is decoded from then on:

    - 0: as configured.
    - 1: crashed once: video and audio both decoded with PyAV (whose FFmpeg build is not
      decord's), so a file only decord chokes on still trains.
    - 2: crashed twice, or PyAV was already the decoder: never decoded again; drawing it counts
      as ``crashed`` and another sample is drawn, like any bad file.

    Shared memory (``multiprocessing.RawArray``) created with the dataset, so workers of any
    start method see it; ``slots`` bounds how many workers are tracked (ids past it decode
    unguarded, so their crashes end the run as they would without the guard).
    """

    SKIP = 2

    def __init__(self, n: int, slots: int = 256):
        ctx = mp.get_context()
        self.slots = slots
        self._busy = ctx.RawArray("q", 3 * slots)  # per worker id: pid, sample index, level (pid 0 = idle)
        self._level = ctx.RawArray("b", n)

    def level(self, index: int) -> int:
        return int(self._level[index])

    def begin(self, worker: int, index: int, level: int) -> None:
        if 0 <= worker < self.slots:
            self._busy[3 * worker + 1] = index
            self._busy[3 * worker + 2] = level
            self._busy[3 * worker] = os.getpid()

    def end(self, worker: int) -> None:
        if 0 <= worker < self.slots:
            self._busy[3 * worker] = 0

    def busy(self) -> list[tuple[int, int, int, int]]:
        """[(worker id, pid, sample index, level)] of every worker registered as mid-decode now.

        What each worker was decoding when last seen: a worker killed mid-decode (by a signal,
        or by its loader's shutdown after it stopped answering) leaves its slot set.
        """
        out = []
        for w in range(self.slots):
            pid = int(self._busy[3 * w])
            if pid:
                out.append((w, pid, int(self._busy[3 * w + 1]), int(self._busy[3 * w + 2])))
        return out

    def mark_dead(self, pids: set[int]) -> list[tuple[int, int]]:
        """Mark the samples the workers ``pids`` were decoding when they died.

        Returns [(sample index, its new level)] for every dead worker caught mid-decode.
        """
        hit = []
        for w in range(self.slots):
            pid = int(self._busy[3 * w])
            if pid and pid in pids:
                index, level = int(self._busy[3 * w + 1]), int(self._busy[3 * w + 2])
                new = min(self.SKIP, max(level + 1, int(self._level[index]) + 1))
                self._level[index] = new
                self._busy[3 * w] = 0
                hit.append((index, new))
        return hit
