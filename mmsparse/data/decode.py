"""Video decoding: frame-index sampling and two backends (PyAV by default, decord).

Legend: T sampled frames, H x W frame size (as displayed), 3 RGB channels, N frames in the file.

- ``sample_indices`` picks which of the N frames to decode (by count, by fps, by stride).
- ``open_video(path, backend)`` returns a reader with ``num_frames``, ``fps``, ``height``,
  ``width`` and ``read(indices, size) -> (frames (T, H, W, 3) uint8, times (T,) seconds)``.

Every backend gives the same frames for the same request (``tests/data/test_backends.py``):

- frame i is the i-th frame in presentation-timestamp order (a timestamp gap or a variable
  frame rate shifts no index; ``num_frames`` counts the frames the stream holds);
- its time is its presentation timestamp less the stream's start time;
- the stream's display rotation (a display matrix, 90-degree steps) is applied, so a rotated
  file comes out as it is shown, ``height`` x ``width`` included;
- YUV is converted to RGB by FFmpeg's default conversion (BT.601), identical to the bit
  between PyAV and decord for even frame sizes; odd sizes differ by ~1 on average (the two
  FFmpeg versions upsample chroma differently);
- ``size`` resizes with an antialiased bilinear filter: PyAV in the frame's own YUV format with
  FFmpeg's scaler before converting to RGB (FFmpeg's scaler writing RGB at a new size is 2x
  slower), decord in RGB with torch's uint8 kernel (``resize_frames``). The two differ by 0.05
  on average on a natural clip (256 x 340 -> 224 x 298), more at sharp synthetic edges.

Frames are decoded in chunks of ``chunk`` indices, each scaled to ``size`` as it is decoded, so
a clip of thousands of frames costs memory for its output at the target size plus one chunk.

- ``with_fallback(decode, path, backend, fallback)`` runs a decode with one backend and, when
  that backend's decoder rejects the file (reasons ``FALLBACK_REASONS``), once more with the
  other: decord 0.6.0's bundled FFmpeg has no AV1 decoder, for one, and PyAV's has.
- ``call_with_timeout`` runs a decode in a helper thread and abandons it when it hangs.
"""

from __future__ import annotations

import math
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MediaError, capture_stderr, check_file, library_log, media_errors, restore_stderr

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


def rotate_frames(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, a multiple of 90) to (T, H, W, 3)."""
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(frames, k, axes=(1, 2))) if k else frames


class DecordVideo:
    """decord.VideoReader behind the common interface (decord's own FFmpeg, CPU context).

    decord indexes frames in presentation order, applies the stream's rotation and converts to
    RGB with FFmpeg's default (BT.601) conversion, as ``PyAVVideo`` does. Frames are always
    decoded at their native size and resized by torch (``resize_frames``): decord's own scaler
    (``width``/``height``) fails its RGB copy at some output widths (8, 12, 16, 24, 48, 72 for a
    100 x 66 source: "size must exactly match") and returns wrong shapes for rotated files.
    """

    def __init__(self, path: str | Path, num_threads: int = 1):
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        self.path = Path(path)
        self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        try:
            self.height, self.width = self._vr.get_batch([0]).asnumpy().shape[1:3] if self.num_frames else (0, 0)
        except decord.DECORDError as err:
            # decord 0.6.0 fails its RGB copy at some native widths too (8, 12, 16, 24, 48, 72):
            # let FFmpeg scale to a width that works; ``read`` resizes back to the native size.
            if "size must exactly match" not in str(err):
                raise
            import av

            with av.open(str(path)) as c:
                cc = c.streams.video[0].codec_context
                self.height, self.width = cc.height, cc.width
            self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads,
                                          width=-(-self.width // 64) * 64, height=self.height)
        self._vr.seek(0)

    def read(self, indices, size=None, chunk=64):
        indices = np.asarray(indices, np.int64)
        _check_indices(self.path, indices, self.num_frames)
        out_hw = tuple(size or (self.height, self.width))
        out = np.empty((len(indices), *out_hw, 3), np.uint8)
        for a in range(0, len(indices), chunk):
            idx = indices[a:a + chunk].tolist()
            out[a:a + len(idx)] = resize_frames(quiet(lambda: self._vr.get_batch(idx).asnumpy()), out_hw)
        times = self._vr.get_frame_timestamp(indices.tolist())[:, 0] if len(indices) else np.zeros(0)
        return out, np.asarray(times, np.float64)


def _check_indices(path, indices: np.ndarray, n: int) -> None:
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        bad = int(indices.min() if indices.min() < 0 else indices.max())
        raise MediaError(path, "too_short", f"frame {bad} asked of a clip of {n} frames")


class PyAVVideo:
    """PyAV (FFmpeg bindings) behind the common interface.

    Frame i is the i-th frame in presentation order: opening the file reads (demuxes, without
    decoding) every video packet's timestamp, so a timestamp gap (an AVI with a dropped frame)
    or a variable frame rate shifts no index, and ``num_frames`` counts the frames there are,
    not the container's guess. A decoded frame finds its index by its timestamp. The stream's
    display rotation (``VideoFrame.rotation``) is applied, so ``height`` x ``width`` is the size
    shown; both, and the RGB conversion (FFmpeg's default, as decord's), are what decord gives.

    Sorted index runs are decoded in one forward pass from the key frame before the first; a
    gap wider than ``seek_gap`` frames seeks instead of decoding through.
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
        self._tb = float(self._s.time_base)
        self._t0 = self._s.start_time or 0
        pts = _frame_table(self.path, self._c, self._s)
        self._pts = pts  # (N,) presentation timestamps in stream time base, sorted
        self._index = {int(t): i for i, t in enumerate(pts)}
        self.num_frames = int(len(pts))
        rate = self._s.average_rate or self._s.guessed_rate
        if rate:
            self.fps = float(rate)
        elif self.num_frames > 1:
            self.fps = (self.num_frames - 1) / max(1e-9, float(pts[-1] - pts[0]) * self._tb)
        else:
            raise MediaError(path, "corrupt", "video stream has no frame rate")
        # same thread budget as decord's; set after the demux pass, before the decoder opens
        self._s.codec_context.thread_count = self._threads
        self._s.thread_type = "AUTO"
        self.seek_gap = seek_gap
        self._rotation: int | None = None
        self._resume: tuple | None = None  # (decoding generator, index, frame) left by the rotation probe
        self._scalers: tuple | None = None  # (scale in the source format, convert to RGB), made on first use

    # the rotation is known once a frame is decoded (FFmpeg hands the display matrix to frames)
    @property
    def rotation(self) -> int:
        """Display rotation in degrees counter-clockwise (0, 90, 180, 270)."""
        if self._rotation is None:
            self._rotation = 0
            decoding = self._decode_from(0)
            for idx, frame in decoding:
                self._rotation = _frame_rotation(frame)
                self._resume = (decoding, idx, frame)  # the next read goes on from here
                break
        return self._rotation

    @property
    def height(self) -> int:
        cc = self._s.codec_context
        return cc.width if self.rotation % 180 else cc.height

    @property
    def width(self) -> int:
        cc = self._s.codec_context
        return cc.height if self.rotation % 180 else cc.width

    def _rgb(self, frame, size: tuple[int, int] | None) -> np.ndarray:
        """One decoded frame as (h, w, 3) uint8 RGB, rotated for display, scaled to ``size``
        (the displayed size; FFmpeg's bilinear scaler in the source's YUV, before rotating).

        The scalers get the decoder's thread budget (PyAV's default, 0, is one thread per CPU:
        a 16-worker loader would run ~270 scaling threads) and are kept for the reader's life
        (one FFmpeg context each, not one per frame).
        """
        rot = self._rotation or 0
        if size is None:
            arr = frame.to_ndarray(format="rgb24", threads=self._threads)
        else:
            h, w = (size[1], size[0]) if rot % 180 else (int(size[0]), int(size[1]))  # the size before rotating
            if self._scalers is None:
                from av.video.reformatter import VideoReformatter

                self._scalers = (VideoReformatter(), VideoReformatter())
            scale, rgb = self._scalers
            small = scale.reformat(frame, w, h, frame.format.name, interpolation="BILINEAR", threads=self._threads)
            arr = rgb.reformat(small, format="rgb24", threads=self._threads).to_ndarray()
        return rotate_frames(arr[None], rot)[0] if rot else arr

    def _frame_index(self, frame) -> int:
        t = frame.pts if frame.pts is not None else frame.dts
        if t is None:
            return -1
        i = self._index.get(int(t))
        if i is None:  # a timestamp the demuxer did not report: the nearest frame at or after it
            i = int(np.searchsorted(self._pts, int(t)))
        return i

    def _decode_from(self, first: int):
        """(index, frame) pairs in presentation order from the key frame before frame ``first``,
        or from the frame the rotation probe decoded, when ``first`` is at most ``seek_gap``
        frames past it (saving a seek and the key frame's second decode)."""
        resume, self._resume = self._resume, None
        if resume is not None:
            decoding, idx, frame = resume
            if idx <= first <= idx + self.seek_gap:
                yield idx, frame
                yield from decoding
                return
        target = int(self._pts[first]) if self.num_frames else self._t0
        self._c.seek(target, stream=self._s, backward=True, any_frame=False)
        for frame in self._c.decode(self._s):
            yield self._frame_index(frame), frame

    def read(self, indices, size=None, chunk=64):
        indices = np.asarray(indices, np.int64)
        _check_indices(self.path, indices, self.num_frames)
        out = None  # allocated at the first frame, which tells the rotation (and so the shape)
        times = np.zeros(len(indices), np.float64)
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]

        k = 0
        while k < len(wanted):
            exhausted = True
            for idx, frame in self._decode_from(int(wanted[k])):
                if self._rotation is None:
                    self._rotation = _frame_rotation(frame)
                if idx < wanted[k]:
                    continue
                if out is None:
                    out = np.empty((len(indices), *(size or (self.height, self.width)), 3), np.uint8)
                # a requested frame the decoder never put out (a damaged packet) takes the next one
                arr = self._rgb(frame, size)
                while k < len(wanted) and wanted[k] <= idx:
                    out[order[k]] = arr
                    times[order[k]] = float(self._pts[min(idx, self.num_frames - 1)] - self._t0) * self._tb
                    k += 1
                if k >= len(wanted) or wanted[k] - idx > self.seek_gap:
                    exhausted = False
                    break
            if exhausted and k < len(wanted):
                raise MediaError(self.path, "truncated",
                                 f"stream ended before frame {int(wanted[k])} of {self.num_frames}")
        if out is None:
            out = np.empty((0, *(size or (self.height, self.width)), 3), np.uint8)
        return out, times

    def close(self):
        self._c.close()

    def __del__(self):
        try:
            self._c.close()
        except Exception:
            pass


_TABLES: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (path, size, mtime) -> pts, most recent last
_TABLES_KEEP = 256
_TABLES_LOCK = threading.Lock()


def _frame_table(path: Path, container, stream) -> np.ndarray:
    """The presentation timestamps (N,) int64, sorted, of every frame of ``stream``.

    Read by demuxing the whole stream (no decoding: ~1 ms for 128 frames of 256 x 340 H.264
    here), and kept for the process's most recent ``_TABLES_KEEP`` files, so a worker that opens
    one file again (another window, another epoch) reads it once.

    Raises:
        MediaError: ``truncated`` when an MP4's sample table declares more frames than the file
            holds; ``corrupt`` when its packets carry no timestamps.
    """
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    with _TABLES_LOCK:  # an abandoned decode (call_with_timeout) may still run beside a new one
        if key is not None and key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key]
    packets = [(p.pts if p.pts is not None else p.dts, p.size) for p in container.demux(stream)]
    stamps = [t for t, size in packets if size]  # empty packets fill timestamp gaps (AVI)
    pts = np.unique(np.asarray([t for t in stamps if t is not None], np.int64))
    if stamps and not len(pts):
        raise MediaError(path, "corrupt", "video packets carry no timestamps")
    # an MP4 / MOV sample table names every packet; an AVI's frame count includes its timestamp gaps
    declared = stream.frames if "mp4" in container.format.name.split(",") else 0
    if declared and len(packets) < declared:  # the index names packets the file no longer holds
        raise MediaError(path, "truncated", f"the container declares {declared} video frames, "
                         f"the file holds {len(packets)}")
    if key is not None and stat.S_ISREG(st.st_mode):
        with _TABLES_LOCK:
            _TABLES[key] = pts
            while len(_TABLES) > _TABLES_KEEP:
                _TABLES.popitem(last=False)
    return pts


def _frame_rotation(frame) -> int:
    """A frame's display rotation rounded to a multiple of 90 degrees, in [0, 360)."""
    try:
        r = float(frame.rotation or 0)
    except Exception:  # a display matrix PyAV cannot read: shown as stored
        return 0
    return int(round(r / 90.0)) * 90 % 360


class LibraryError(RuntimeError):
    """A decoder library's exception with the lines it logged while failing (``quiet``)."""


def quiet(fn: Callable[[], R]) -> R:
    """Run ``fn`` with the process's stderr captured: what a C/C++ decoder library prints there
    (decord's C++ check failures, its bundled FFmpeg's log) never reaches the terminal; when
    ``fn`` fails, those lines join its error (``LibraryError``) as the reason."""
    failure = None
    with capture_stderr() as log:
        try:
            return fn()
        except MediaError:
            raise
        except Exception as err:
            failure = err
    said = library_log("".join(log))
    msg = library_log(str(failure), keep=5) or type(failure).__name__
    raise LibraryError(msg + (f"; log: {said}" if said and said not in msg else "")) from failure


def open_video(path: str | Path, backend: str = "pyav", num_threads: int = 1) -> VideoReader:
    """Open ``path`` with ``backend`` (``pyav`` or ``decord``); failures become MediaError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_file(path)
    with media_errors(path):  # decord raises RuntimeError / DECORDError, PyAV av.error.*
        return quiet(lambda: DecordVideo(path, num_threads)) if backend == "decord" else PyAVVideo(path, num_threads)


def read_frames(path: str | Path, indices, *, backend: str = "pyav", size: tuple[int, int] | None = None,
                chunk: int = 64, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``indices`` of ``path``: frames (T, H, W, 3) uint8 and their times (T,) in seconds."""
    reader = open_video(path, backend, num_threads)
    with media_errors(path):
        return reader.read(np.asarray(indices, np.int64), size=size, chunk=chunk)


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
        restore_stderr()  # the abandoned decode may hang inside a capture (``quiet``)
        raise MediaError(path, "timeout", f"decode did not finish in {timeout:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
