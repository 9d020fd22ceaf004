"""Map-style dataset over a manifest: decode, sample, features, transforms, failure handling.

Legend: T frames, C = 3 channels, H x W frame size, M mel bins, Tm audio feature frames.

``MediaDataset[i]`` returns one sample dict (see ``mmsparse.data`` for the batch built from it):

- ``id`` str, ``caption`` str (first reference), ``captions`` list[str]
- ``video`` (T, C, H, W) and ``video_times`` (T,) float64 seconds in the file,
- ``audio`` (M, Tm) float32 log-mel and ``audio_start`` float seconds (frame j is centred on
  ``audio_start + j * hop_seconds``),
- ``image`` (C, H, W),
- ``pixel_norm`` ((C,) mean, (C,) std) when video or image pixels are uint8,

each present only when the sample has that modality and the config loads it. Pixels are
float32 normalised, or uint8 with ``pixel_norm`` for the model to normalise
(``DataConfig.pixel_dtype``; see ``mmsparse.data`` for the contract).

Failures (see ``errors.REASONS``) are counted in shared memory across workers, logged with the
path and reason, and another sample is drawn in place of the bad one; ``strict=True`` raises
the MediaError instead, and past ``max_bad_fraction`` (after ``min_attempts`` loads) a
TooManyBadSamples error carries the summary. Every decode runs under ``decode_timeout``.

Video fallback: when the ``backend``'s decoder rejects a file (``corrupt`` or ``truncated``),
the ``video_fallback`` backend decodes the sample once more from scratch (its own frame count,
so its own indices); success is counted as ``fallback`` (path and the primary's error), not as
a failure, and the sample is what the fallback backend alone would give. Only when both fail
is the sample bad (or, strict, raised), with the primary's reason and both errors in the detail.
Both attempts share one ``decode_timeout``.

Crashes: a decoder that kills its worker process (a segfault in C code) cannot raise. Each
decode is registered in ``self.crashes`` (``errors.CrashGuard``) so that ``MediaLoader`` can
name the sample a dead worker was decoding, after which the sample is decoded with PyAV, and
skipped as ``crashed`` if that dies too. Run with ``num_workers >= 1`` for this protection: a
crash in the main process ends it.

Determinism: the clip offset, the replacement draw and the transform's random parameters all
derive from (seed, epoch, index), so the same sample comes out whatever the worker count.
Readers are opened inside ``__getitem__`` (in the worker that runs it), never pickled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from annotated_types import Ge, Gt, Interval
from torch.utils.data import Dataset, get_worker_info

from . import audio as audio_mod
from .decode import call_with_timeout, open_video, resolve_fallback, sample_indices, short_side_size, with_fallback
from .errors import CrashGuard, FailureStats, MediaError, TooManyBadSamples, check_file, media_errors
from .manifest import Sample, load_manifest
from .transforms import PIXEL_DTYPES, TransformConfig, apply_clip, apply_image, build_transform, pixel_norm


# Bounds of DataConfig's fields (checked when a training config is loaded, mmsparse.train.config)
Backend = Literal["pyav", "decord"]
Count = Annotated[int, Ge(1)]
NonNegative = Annotated[int, Ge(0)]
Positive = Annotated[float, Gt(0)]


@dataclass
class DataConfig:
    """How samples are read. Sampling: ``mode`` in count / fps / stride (see ``sample_indices``).

    The ``Literal`` and ``Annotated`` bounds are what a training config checks when it is loaded
    (``mmsparse.train.config``); ``__post_init__`` checks the rest for direct use."""

    backend: Backend = "pyav"          # video: pyav | decord (same frames for the same request)
    # tried when backend's decoder fails: pyav | decord | None; auto: the other backend
    video_fallback: Literal["auto", "pyav", "decord"] | None = "auto"
    audio_backend: Backend = "pyav"    # pyav | decord (PyAV fallback)
    mode: Literal["count", "fps", "stride"] = "count"
    num_frames: Count | None = 16
    target_fps: Positive | None = None
    stride: Count = 1
    min_frames: Count | None = None    # fewer sampled frames -> too_short; None: num_frames (count) or 1
    short_side: Count | None = None    # decode-time resize of the shorter side
    crop: tuple[Count, Count] | None = None
    flip: bool = True
    normalize: bool = True
    # video and image pixels: uint8 (normalised by the model on its device), float32 (normalised
    # here); auto: uint8 when train
    pixel_dtype: Literal["auto", "uint8", "float32"] = "auto"
    train: bool = False
    load_video: bool = True
    load_audio: bool = True
    load_image: bool = True
    require_audio: bool = False        # a video without an audio track is a failure (no_audio)
    image_as_video: bool = False       # an image becomes a one-frame clip under "video"
    sample_rate: Count = 16000
    n_mels: Count = 128
    win_seconds: Positive = 0.025
    hop_seconds: Positive = 0.010
    max_audio_seconds: Positive = 10.0  # audio-only samples without an ``end``
    chunk: Count = 64                  # frames decoded at full size at a time
    decode_threads: NonNegative = 1    # codec (and scaler) threads per video reader; 0: auto, the
                                       # CPUs a loader's workers leave idle (`auto_decode_threads`);
                                       # 1 stays the default: on the 16-core GPU host 8 PyAV workers
                                       # gave 256 clips/s with 1 and 226 with auto's 2 (bench/NOTES.md d3)
    decode_timeout: Positive | None = 60.0
    strict: bool = False
    max_bad_fraction: Annotated[float, Interval(ge=0, le=1)] = 0.1
    min_attempts: NonNegative = 20
    max_retries: NonNegative = 10
    seed: int = 0

    def __post_init__(self):
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be 0 (auto) or a positive count, got {self.decode_threads}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.crop is not None:
            self.crop = tuple(self.crop)  # type: ignore[assignment]
        resolve_fallback(self.backend, self.video_fallback)  # unknown names fail here, not in a worker
        if self.pixel_dtype not in ("auto", *PIXEL_DTYPES):
            raise ValueError(f"pixel_dtype must be one of {('auto', *PIXEL_DTYPES)}, got {self.pixel_dtype!r}")

    @property
    def pixel_dtype_resolved(self) -> str:
        """``uint8`` or ``float32``. auto: uint8 for training, where the loader's CPU time is the
        bottleneck (a quarter of the bytes, no float work per pixel), float32 otherwise, so
        evaluation, captioning and code that reads samples keep their float frames."""
        if self.pixel_dtype != "auto":
            return self.pixel_dtype
        return "uint8" if self.train else "float32"


MAX_AUTO_DECODE_THREADS = 4  # FFmpeg's frame threads gain little past a few on one clip


def cgroup_cpu_limit(cpu_max: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` text (``"quota period"``; ``"max ..."``: none)."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup's CPU quota (a
    container limited to 4 CPUs of a 64-core host sees 64 in its mask)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit(Path("/sys/fs/cgroup/cpu.max").read_text())
    except OSError:
        limit = None
    return max(1, min(n, math.ceil(limit))) if limit else n


def local_processes() -> int:
    """Training processes on this host (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE), 1 alone."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


def auto_decode_threads(num_workers: int, cpus: int | None = None, processes: int | None = None) -> int:
    """Decode threads per reader when ``DataConfig.decode_threads`` is 0: the usable CPUs shared
    out among the decoding processes of this host (each training process's workers, or the
    process itself when it has none), at least 1 and at most MAX_AUTO_DECODE_THREADS. On the
    16-core GPU host one process with 8 workers gets 2 threads a reader."""
    cpus = usable_cpus() if cpus is None else cpus
    processes = local_processes() if processes is None else processes
    return max(1, min(MAX_AUTO_DECODE_THREADS, cpus // (max(1, num_workers) * processes)))


@dataclass
class _Raw:
    """Decoded but untransformed sample (produced under the decode timeout)."""

    video: np.ndarray | None = None     # (T, H, W, 3) uint8
    video_times: np.ndarray | None = None
    audio: np.ndarray | None = None     # (S,) float32
    audio_start: float = 0.0
    image: torch.Tensor | None = None   # (3, H, W) uint8
    extra: dict[str, Any] = field(default_factory=dict)


class MediaDataset(Dataset):
    """Samples of a manifest (a path or a list of ``Sample``) under a ``DataConfig``."""

    def __init__(self, manifest: str | Path | list[Sample], config: DataConfig | None = None,
                 stats: FailureStats | None = None):
        self.samples = load_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
        if not self.samples:
            raise ValueError("manifest has no samples")
        self.cfg = config or DataConfig()
        self.stats = stats or FailureStats()
        self.crashes = CrashGuard(len(self.samples))
        self.epoch = 0
        c = self.cfg
        # threads per video reader; make_loader re-resolves auto for its number of workers
        self.decode_threads = c.decode_threads or auto_decode_threads(0)
        # after a crash: PyAV for video and audio, unless that is what crashed already
        self._after_crash_level = CrashGuard.SKIP if (c.backend, c.audio_backend) == ("pyav", "pyav") else 1
        dtype = c.pixel_dtype_resolved
        video_tf = TransformConfig(None, c.crop, c.train, c.flip, normalize=c.normalize, dtype=dtype)
        self._video_tf = build_transform(video_tf)
        self._image_tf = build_transform(TransformConfig(c.short_side, c.crop, c.train, c.flip,
                                                         normalize=c.normalize, dtype=dtype))
        # what the model applies to uint8 pixels (video and image share mean / std)
        self.pixel_norm = pixel_norm(video_tf) if dtype == "uint8" else None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """New random clip offsets / crops per epoch (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    # ----------------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Any]:
        c = self.cfg
        i = int(index)
        info = get_worker_info()
        worker = info.id if info is not None else -1  # the main process is not guarded: its crash ends it
        for attempt in range(c.max_retries + 1):
            if attempt:
                draw = np.random.default_rng([c.seed, self.epoch, int(index), attempt, 1])
                i = int(draw.integers(len(self.samples)))
            sample = self.samples[i]
            seed = [c.seed, self.epoch, i]
            self.stats.attempt()
            level = self.crashes.level(i)
            if level:
                level = max(level, self._after_crash_level)
            try:
                if level >= CrashGuard.SKIP:
                    raise MediaError(sample.primary_path, "crashed", "a decoder crashed on this file before; "
                                     "not decoded again")
                self.crashes.begin(worker, i, level)  # until the sample is done: decoders' C++ and
                try:                                  # destructors, transforms and features
                    raw = call_with_timeout(lambda: self._decode(sample, seed, level), c.decode_timeout,
                                            sample.primary_path)
                    return self._finish(sample, raw, seed)
                finally:
                    self.crashes.end(worker)
            except MediaError as err:
                if c.strict:
                    raise
                self.stats.record(err)
                bound = self.bad_fraction_error()
                if bound is not None:
                    raise bound from None
        raise TooManyBadSamples(f"no loadable sample after {c.max_retries + 1} draws starting at index "
                                f"{index}: {self.stats.summary()}")

    def bad_fraction_error(self) -> TooManyBadSamples | None:
        """The error to stop with when the failed fraction of loads has passed the configured
        bound (after ``min_attempts`` loads), else None."""
        c, st = self.cfg, self.stats
        if st.attempts >= c.min_attempts and st.fraction() > c.max_bad_fraction:
            return TooManyBadSamples(f"bad-sample fraction {st.fraction():.1%} passed the bound "
                                     f"{c.max_bad_fraction:.1%}: {st.summary()}")
        return None

    def _decode_video(self, s: Sample, backend: str, seed: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        """Frames (T, H, W, 3) uint8, their times (T,) and the fps of ``s.video`` read with ``backend``."""
        c = self.cfg
        rng = np.random.default_rng(seed) if c.train else None  # fresh per backend: a fallback samples alike
        reader = open_video(s.video, backend, self.decode_threads)
        with media_errors(s.video):
            first = int(math.floor(s.start * reader.fps)) if s.start is not None else 0
            last = int(math.ceil(s.end * reader.fps)) if s.end is not None else None
            idx = sample_indices(reader.num_frames, reader.fps, mode=c.mode, num_frames=c.num_frames,
                                 target_fps=c.target_fps, stride=c.stride, start_frame=first,
                                 end_frame=last, rng=rng)
            need = c.min_frames if c.min_frames is not None else (
                c.num_frames if c.mode == "count" and c.num_frames else 1)
            if len(idx) < need:
                raise MediaError(s.video, "too_short", f"{len(idx)} frames in the window, {need} needed "
                                 f"(clip has {reader.num_frames} at {reader.fps:g} fps)")
            size = short_side_size((reader.height, reader.width), c.short_side)
            frames, times = reader.read(idx, size=size, chunk=c.chunk)
        return frames, times, reader.fps

    def _decode(self, s: Sample, seed: list[int], level: int = 0) -> _Raw:
        """Decode ``s``; ``level`` 1 (it crashed a worker before) uses PyAV for video and audio."""
        c = self.cfg
        raw = _Raw()
        backend, fallback, audio_backend = (c.backend, c.video_fallback, c.audio_backend) if level == 0 else (
            "pyav", None, "pyav")
        if s.video is not None and c.load_video:
            (raw.video, raw.video_times, fps), used, primary_err = with_fallback(
                lambda b: self._decode_video(s, b, seed), s.video, backend, fallback)
            if primary_err is not None:
                self.stats.fallback(primary_err, used)
            if level:
                self.stats.fallback(MediaError(s.video, "crashed", "a decoder crashed on this file before"), "pyav")
            if c.load_audio:
                src = s.audio or s.video
                t0 = float(raw.video_times[0])
                t1 = float(raw.video_times[-1]) + 1.0 / fps
                try:
                    raw.audio = audio_mod.read_audio(src, c.sample_rate, t0, t1, audio_backend)
                    raw.audio_start = t0
                except MediaError as err:
                    if err.reason != "no_audio" or c.require_audio or s.audio is not None:
                        raise
        elif s.audio is not None and c.load_audio:
            start = s.start or 0.0
            end = s.end if s.end is not None else None
            wave = audio_mod.read_audio(s.audio, c.sample_rate, start, end, audio_backend)
            raw.audio = wave[: int(c.max_audio_seconds * c.sample_rate)] if end is None else wave
            raw.audio_start = start
        if s.image is not None and c.load_image:
            raw.image = read_image(s.image)
        if raw.video is None and raw.audio is None and raw.image is None:
            raise ValueError(f"sample {s.id!r} (manifest line {s.line}) has no modality this config loads")
        return raw

    def _finish(self, s: Sample, raw: _Raw, seed: list[int]) -> dict[str, Any]:
        c = self.cfg
        out: dict[str, Any] = {"id": s.id, "caption": s.caption, "captions": list(s.captions)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
            if raw.video is not None:
                frames = torch.from_numpy(raw.video).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)
                out["video"] = apply_clip(self._video_tf, frames)
                out["video_times"] = torch.from_numpy(np.asarray(raw.video_times, np.float64))
            if raw.image is not None:
                img = apply_image(self._image_tf, raw.image)
                if c.image_as_video and "video" not in out:
                    out["video"] = img[None]  # (1, C, H, W)
                    out["video_times"] = torch.zeros(1, dtype=torch.float64)
                else:
                    out["image"] = img
            if self.pixel_norm is not None and ("video" in out or "image" in out):
                out["pixel_norm"] = self.pixel_norm
        if raw.audio is not None:
            out["audio"] = audio_mod.log_mel(raw.audio, c.sample_rate, c.n_mels, c.win_seconds, c.hop_seconds)
            out["audio_start"] = raw.audio_start
        out["audio_hop_seconds"] = c.hop_seconds
        return out


def read_image(path: str | Path) -> torch.Tensor:
    """Decode a PNG / JPEG / ... to (3, H, W) uint8 RGB with torchvision.io."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    check_file(path)
    with media_errors(path):
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
