"""Video decoding: frame-index sampling and two backends (decord by default, PyAV).

Legend: T sampled frames, H x W frame size, 3 RGB channels, N frames in the file.

- ``sample_indices`` picks which of the N frames to decode (by count, by fps, by stride).
- ``open_video(path, backend)`` returns a reader with ``num_frames``, ``fps`` and
  ``read(indices, size) -> (frames (T, H, W, 3) uint8, times (T,) seconds)``. Frames are
  decoded in chunks of ``chunk`` indices, each chunk scaled to ``size`` as it is decoded, so a
  clip of thousands of frames costs memory for its output at the target size plus one chunk.
  PyAV scales with FFmpeg's bicubic scaler in the frame's own pixel format (YUV) and converts
  the result to RGB unscaled: FFmpeg's scaler writing RGB at a new size takes a slow generic
  path, 2x slower per frame at 256 x 340 -> 224 x 298 and 1.6x at 720p -> 224 on one core
  here. decord has no YUV output: a source up to 2.5x the output's pixels is decoded at its
  native size and resized by torch's uint8 antialiased bilinear kernel, a larger one by
  decord's own scaler (``width``/``height``), whichever measured faster (``DecordVideo._reader``).
- ``with_fallback(decode, path, backend, fallback)`` runs a decode with one backend and, when
  that backend's decoder rejects the file (reasons ``FALLBACK_REASONS``), once more with the
  other: decord 0.6.0's bundled FFmpeg has no AV1 decoder, for one, and PyAV's has.
- ``call_with_timeout`` runs a decode in a helper thread and abandons it when it hangs.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MediaError, check_file, diagnose

BACKENDS = ("decord", "pyav")
# decoder errors that another backend may not share; missing / empty / unreadable files fail in
# check_file before any decoder runs, too_short and timeout are not the decoder's verdict
FALLBACK_REASONS = ("corrupt", "truncated")
SAMPLING = ("count", "fps", "stride")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# which frames


def sample_indices(n_frames: int, fps: float, *, mode: str = "count", num_frames: int | None = 16,
                   target_fps: float | None = None, stride: int = 1, start_frame: int = 0,
                   end_frame: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices (T,) int64 to decode from the window [start_frame, end_frame) of a clip.

    Modes:
        ``count``: ``num_frames`` frames spread uniformly over the window: the centres of T equal
            segments, or (``rng`` given, training) one random offset shared by all segments.
        ``fps``: frames at ``target_fps`` (nearest source frame); ``num_frames`` of them (all
            that fit when None) starting at the window start, or at a random start with ``rng``.
        ``stride``: every ``stride``-th frame; ``num_frames`` of them (all when None), random
            start with ``rng``.

    A window shorter than asked yields fewer frames (the caller decides whether that is an
    error); a window of zero frames yields an empty array.
    """
    if mode not in SAMPLING:
        raise ValueError(f"mode must be one of {SAMPLING}, got {mode!r}")
    end = n_frames if end_frame is None else min(end_frame, n_frames)
    start = max(0, start_frame)
    length = end - start
    if length <= 0:
        return np.zeros(0, np.int64)
    if mode == "count":
        if num_frames is None or num_frames <= 0:
            raise ValueError(f"mode 'count' needs num_frames > 0, got {num_frames}")
        if length <= num_frames:
            return np.arange(start, end, dtype=np.int64)
        u = rng.random() if rng is not None else 0.5
        pos = (np.arange(num_frames) + u) * (length / num_frames)
        return start + np.minimum(np.floor(pos).astype(np.int64), length - 1)
    if mode == "fps":
        if not target_fps or target_fps <= 0:
            raise ValueError(f"mode 'fps' needs target_fps > 0, got {target_fps}")
        step = fps / target_fps  # source frames per sampled frame
        avail = int(math.floor((length - 1) / step)) + 1
        t = avail if num_frames is None else min(num_frames, avail)
        slack = (length - 1) - (t - 1) * step
        off = rng.random() * slack if (rng is not None and slack > 0) else 0.0
        idx = np.floor(off + np.arange(t) * step + 0.5).astype(np.int64)
        return start + np.minimum(idx, length - 1)
    if stride < 1:
        raise ValueError(f"mode 'stride' needs stride >= 1, got {stride}")
    avail = (length - 1) // stride + 1
    t = avail if num_frames is None else min(num_frames, avail)
    slack = (length - 1) - (t - 1) * stride
    off = int(rng.integers(0, slack + 1)) if (rng is not None and slack > 0) else 0
    return start + off + np.arange(t, dtype=np.int64) * stride


def resize_frames(frames: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 to (T, h, w, 3) uint8 with antialiased bilinear filtering.

    Runs torch's uint8 channels-last kernel on the frames as they lie (a (T, 3, H, W) view of
    the channels-last array): 17 ms for 64 frames 256 x 340 -> 224 x 298 on one core here,
    where a float32 round trip took 50x that; the two differ by at most 1 in a pixel."""
    if size is None or tuple(frames.shape[1:3]) == tuple(size):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) view
    x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def short_side_size(hw: tuple[int, int], short_side: int | None) -> tuple[int, int] | None:
    """(h, w) with the shorter side scaled to ``short_side``, keeping the aspect ratio."""
    if short_side is None:
        return None
    h, w = hw
    s = short_side / min(h, w)
    return (max(1, round(h * s)), max(1, round(w * s)))


# --------------------------------------------------------------------------------------------
# readers


class VideoReader(Protocol):
    path: Path
    num_frames: int
    fps: float
    height: int
    width: int

    def read(self, indices: np.ndarray, size: tuple[int, int] | None = None,
             chunk: int = 64) -> tuple[np.ndarray, np.ndarray]: ...


class DecordVideo:
    """decord.VideoReader behind the common interface (decord's own FFmpeg, CPU context)."""

    NATIVE_AREA = 2.5  # source / output pixels up to which torch resizes native frames (_reader)

    def __init__(self, path: str | Path, num_threads: int = 1):
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        self.path = Path(path)
        self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        self._native: tuple[int, int] | None = None
        try:
            self.height, self.width = self._vr.get_batch([0]).asnumpy().shape[1:3] if self.num_frames else (0, 0)
        except decord.DECORDError as err:
            # decord 0.6.0 fails its RGB copy for some narrow widths (16, 48, ...): let FFmpeg
            # scale to a width that works and resize back to the native size afterwards.
            if "size must exactly match" not in str(err):
                raise
            import av

            with av.open(str(path)) as c:
                cc = c.streams.video[0].codec_context
                self.height, self.width = cc.height, cc.width
            self._native = (self.height, self.width)
            self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads,
                                          width=-(-self.width // 64) * 64, height=self.height)
        self._vr.seek(0)
        self._threads = num_threads
        self._sized: dict = {}

    def _reader(self, size):
        """The reader for output ``size`` and the size torch still has to resize its frames to.

        decord's own scaler (``width``/``height``: FFmpeg's swscale writing RGB at the new size)
        costs more per frame than converting at the native size and resizing with torch's uint8
        kernel, unless the source is much larger than the output: 64 of 128 frames to short
        side 224, one core, medians of 9 (2026-12-03): 240 x 320 72 ms scaler / 36 ms torch,
        360 x 480 62 / 61, 480 x 640 91 / 100, 720 x 1280 154 / 322. So sources of at most
        ``NATIVE_AREA`` times the output's pixels are decoded natively and resized by torch."""
        import decord

        if size is None or tuple(size) == (self.height, self.width) or self._native is not None:
            return self._vr, (size or self._native)  # torch resizes what decord returns
        if self.height * self.width <= self.NATIVE_AREA * size[0] * size[1]:
            return self._vr, tuple(size)
        key = tuple(size)
        if key not in self._sized:
            self._sized[key] = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=self._threads,
                                                  width=key[1], height=key[0])
        return self._sized[key], None

    def read(self, indices, size=None, chunk=64):
        indices = np.asarray(indices, np.int64)
        out_hw = size or (self.height, self.width)
        out = np.empty((len(indices), *out_hw, 3), np.uint8)
        vr, torch_size = self._reader(size)
        for a in range(0, len(indices), chunk):
            idx = indices[a:a + chunk].tolist()
            out[a:a + len(idx)] = resize_frames(vr.get_batch(idx).asnumpy(), torch_size)
        times = self._vr.get_frame_timestamp(indices.tolist())[:, 0] if len(indices) else np.zeros(0)
        return out, np.asarray(times, np.float64)


class PyAVVideo:
    """PyAV (FFmpeg bindings) behind the common interface.

    A frame's index is its presentation time times the stream's average rate, so seeking to a
    key frame and decoding forward lands on exact indices. Sorted index runs are decoded in one
    forward pass; a gap wider than ``seek_gap`` frames seeks instead of decoding through.
    """

    def __init__(self, path: str | Path, num_threads: int = 1, seek_gap: int = 64):
        import av

        self.path = Path(path)
        self._c = av.open(str(path))
        if not self._c.streams.video:
            self._c.close()
            raise MediaError(path, "corrupt", "no video stream")
        self._s = self._c.streams.video[0]
        self._threads = max(1, int(num_threads))
        self._s.codec_context.thread_count = num_threads  # same thread budget as decord's
        self._s.thread_type = "AUTO"
        rate = self._s.average_rate or self._s.guessed_rate
        if not rate:
            raise MediaError(path, "corrupt", "video stream has no frame rate")
        self.fps = float(rate)
        self._tb = float(self._s.time_base)
        self._t0 = self._s.start_time or 0
        n = self._s.frames
        if not n:
            dur = (self._s.duration * self._tb) if self._s.duration else (self._c.duration or 0) / 1e6
            n = int(round(dur * self.fps))
        self.num_frames = int(n)
        self.height, self.width = self._s.codec_context.height, self._s.codec_context.width
        self.seek_gap = seek_gap
        self._scalers: tuple | None = None  # (scale in the source format, convert to RGB), made on first use

    def _rgb(self, frame, size: tuple[int, int] | None) -> np.ndarray:
        """One decoded frame as (h, w, 3) uint8 RGB, scaled to ``size`` (bicubic, like decord).

        The scalers get the decoder's thread budget (PyAV's default, 0, is one thread per CPU:
        a 16-worker loader would run ~270 scaling threads) and are kept for the reader's life
        (one FFmpeg context each, not one per frame).
        """
        if size is None:
            return frame.to_ndarray(format="rgb24", threads=self._threads)
        if self._scalers is None:
            from av.video.reformatter import VideoReformatter

            self._scalers = (VideoReformatter(), VideoReformatter())
        scale, rgb = self._scalers
        small = scale.reformat(frame, size[1], size[0], frame.format.name, interpolation="BICUBIC",
                               threads=self._threads)
        return rgb.reformat(small, format="rgb24", threads=self._threads).to_ndarray()

    def _index(self, frame) -> int:
        return int(round((frame.pts - self._t0) * self._tb * self.fps))

    def _decode_from(self, first: int):
        if first > 0:
            pts = int(first / self.fps / self._tb) + self._t0
            self._c.seek(pts, stream=self._s, backward=True, any_frame=False)
        else:
            self._c.seek(self._t0, stream=self._s, backward=True, any_frame=False)
        for frame in self._c.decode(self._s):
            yield self._index(frame), frame

    def read(self, indices, size=None, chunk=64):
        indices = np.asarray(indices, np.int64)
        out_hw = size or (self.height, self.width)
        out = np.empty((len(indices), *out_hw, 3), np.uint8)
        times = np.zeros(len(indices), np.float64)
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        pending: list[tuple[int, np.ndarray]] = []  # (output slot, native frame) awaiting resize

        def flush():
            if pending:
                slots = [s for s, _ in pending]
                out[slots] = np.stack([f for _, f in pending])
                pending.clear()

        k = 0
        while k < len(wanted):
            exhausted = True
            for idx, frame in self._decode_from(int(wanted[k])):
                if idx < wanted[k]:
                    continue
                # a requested index absent from the stream (variable frame rate) takes the next frame
                arr = self._rgb(frame, size)
                while k < len(wanted) and wanted[k] <= idx:
                    pending.append((int(order[k]), arr))
                    times[order[k]] = float(frame.pts - self._t0) * self._tb
                    k += 1
                    if len(pending) >= chunk:
                        flush()
                if k >= len(wanted) or wanted[k] - idx > self.seek_gap:
                    exhausted = False
                    break
            if exhausted and k < len(wanted):
                raise MediaError(self.path, "truncated",
                                 f"stream ended before frame {int(wanted[k])} of {self.num_frames}")
        flush()
        return out, times

    def close(self):
        self._c.close()

    def __del__(self):
        try:
            self._c.close()
        except Exception:
            pass


def open_video(path: str | Path, backend: str = "pyav", num_threads: int = 1) -> VideoReader:
    """Open ``path`` with ``backend`` (``decord`` or ``pyav``); failures become MediaError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_file(path)
    try:
        return DecordVideo(path, num_threads) if backend == "decord" else PyAVVideo(path, num_threads)
    except MediaError:
        raise
    except Exception as err:  # decord raises RuntimeError / DECORDError, PyAV av.error.*
        raise diagnose(path, err) from err


def read_frames(path: str | Path, indices, *, backend: str = "pyav", size: tuple[int, int] | None = None,
                chunk: int = 64, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``indices`` of ``path``: frames (T, H, W, 3) uint8 and their times (T,) in seconds."""
    reader = open_video(path, backend, num_threads)
    try:
        return reader.read(np.asarray(indices, np.int64), size=size, chunk=chunk)
    except MediaError:
        raise
    except Exception as err:
        raise diagnose(path, err) from err


def resolve_fallback(backend: str, fallback: str | None = "auto") -> str | None:
    """The backend to try when ``backend`` fails: ``auto`` is decord after pyav (a decoder
    built from another FFmpeg) and pyav after any other."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fallback == "auto":
        return "decord" if backend == "pyav" else "pyav"
    if fallback is None:
        return None
    if fallback not in BACKENDS:
        raise ValueError(f"video fallback must be one of {BACKENDS}, 'auto' or None, got {fallback!r}")
    if fallback == backend:
        raise ValueError(f"video fallback {fallback!r} is the primary backend itself; use None for no fallback")
    return fallback


def with_fallback(decode: Callable[[str], R], path: str | Path, backend: str = "pyav",
                  fallback: str | None = "auto") -> tuple[R, str, MediaError | None]:
    """Run ``decode(backend)``; when its decoder rejects the file, run ``decode(fallback)`` once.

    ``fallback`` as in ``resolve_fallback``. Only MediaErrors with a reason in
    ``FALLBACK_REASONS`` move on to the fallback; any other error is raised as it is.

    Returns:
        (result, the backend that produced it, the primary's MediaError or None when the primary
        succeeded).

    Raises:
        MediaError: when both fail: the primary's reason, a detail naming both backends' errors.
    """
    second = resolve_fallback(backend, fallback)
    try:
        return decode(backend), backend, None
    except MediaError as err:
        if second is None or err.reason not in FALLBACK_REASONS:
            raise
        first = err
    try:
        return decode(second), second, first
    except MediaError as err:
        raise MediaError(path, first.reason, f"{backend}: {first.detail}; {second}: {err.reason}"
                         + (f" ({err.detail})" if err.detail else "")) from err


# --------------------------------------------------------------------------------------------
# timeouts


def call_with_timeout(fn: Callable[[], R], timeout: float | None, path: str | Path = "") -> R:
    """Run ``fn`` and return its result, or raise MediaError(reason="timeout") after ``timeout`` s.

    The call runs in a daemon thread; a decoder stuck in C code cannot be interrupted, so the
    thread is abandoned (it ends on its own if the decoder ever returns). ``None`` or ``<= 0``
    runs ``fn`` inline.
    """
    if not timeout or timeout <= 0:
        return fn()
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    th = threading.Thread(target=target, name=f"decode:{Path(str(path)).name}", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise MediaError(path, "timeout", f"decode did not finish in {timeout:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
