"""Audio: read a track (a video's own or a separate file) as 16 kHz mono, and log-mel features.

``read_audio(path, sr, start, end)`` decodes from the beginning of the file (decord's
AudioReader always loads the whole track) and cuts ``[start, end)`` out with ``slice_wave``;
to read many windows of one file, decode it once (``start=end=None``) and slice it.

A damaged track is an error, never silence: a packet the decoder rejects is ``corrupt_audio``,
and a track that decodes to less than the duration its container declares (up to the window
asked for, less ``SHORT_SLACK_S``) is ``corrupt_audio`` (PyAV: it decoded without error, so a
stream cut short: ``truncated``). A window that ends before the damage reads as it is, with
either backend: PyAV stops decoding at the window's end. decord skips the packets it cannot decode and returns what it
decoded before the first one, so its track is checked against the declared duration too, and its
library's log lines become the error's detail. Only a window that runs past the end of an
intact track (a video a little longer than its audio) is padded with silence.

Legend: S samples, M mel bins (``n_mels``), Tm feature frames.

Feature frame j is centred on ``start + j * hop_seconds`` (``center=True`` padding), which is what
``Batch["audio_hop_seconds"]`` and ``Batch["audio_start"]`` let a model align with
``Batch["video_times"]``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import MediaError, capture_stderr, check_file, iso_bmff_truncated, library_log, media_errors

AUDIO_BACKENDS = ("pyav", "decord")
# decoded audio may end this much before the declared end: encoder padding, priming and
# container rounding are a frame or two (AAC: 1,024 samples, 64 ms at 16 kHz)
SHORT_SLACK_S = 0.2


def declared_duration(container, stream) -> float | None:
    """Seconds of audio the container declares for ``stream``, counted from 0; None if unknown.

    The stream's own duration (MP4, WAV), its ``DURATION`` tag (Matroska), or, for a file with
    no other stream, the container's duration.
    """
    if stream.duration:
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        return start + float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION") or (stream.metadata or {}).get("duration")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1e6
    return None


def _check_length(path: Path, got_s: float, declared: float | None, end: float | None, reason: str,
                  detail: str = "") -> None:
    """Raise ``reason`` when a track decoded to ``got_s`` seconds ends short of what was declared
    (up to ``end`` when only a window was decoded)."""
    if declared is None:
        return
    need = declared if end is None else min(end, declared)
    if got_s < need - SHORT_SLACK_S:
        raise MediaError(path, reason, f"audio decodes to {got_s:.2f} s of the {declared:.2f} s its container "
                         f"declares" + (f" ({detail})" if detail else ""))


def _probe_declared(path: Path) -> float | None:
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            raise MediaError(path, "no_audio", "file has no audio stream")
        return declared_duration(c, c.streams.audio[0])


def _read_decord(path: Path, sample_rate: int, end: float | None = None) -> np.ndarray:
    """The whole track with decord, checked against the declared duration up to ``end``.

    decord logs a packet it cannot decode ("Fail to send packet") to the terminal and returns
    the samples before it: the log is captured and becomes the error's detail instead."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    with capture_stderr() as log:
        try:
            ar = decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
            wave = ar[:].asnumpy()[0].astype(np.float32, copy=False)
        except Exception as err:
            err_text = str(err)
        else:
            err_text = ""
    said = library_log("".join(log))
    if err_text:
        raise _DecordAudioError(library_log(err_text, keep=5) + (f"; log: {said}" if said else ""))
    _check_length(path, len(wave) / sample_rate, _probe_declared(path), end, "corrupt_audio",
                  f"decord: {said}" if said else "")
    return wave


class _DecordAudioError(Exception):
    """decord's AudioReader raised; the message carries its log."""


def _read_pyav(path: Path, sample_rate: int, start: float | None, end: float | None) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            raise MediaError(path, "no_audio", "file has no audio stream")
        stream = c.streams.audio[0]
        declared = declared_duration(c, stream)
        rs = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        t_first = None
        try:
            for frame in c.decode(stream):
                if t_first is None and frame.time is not None:
                    t_first = max(0.0, float(frame.time))
                if end is not None and frame.time is not None and frame.time > end + 0.1:
                    break
                for g in rs.resample(frame):
                    chunks.append(g.to_ndarray().reshape(-1))
            for g in rs.resample(None):
                chunks.append(g.to_ndarray().reshape(-1))
        except av.error.FFmpegError as err:
            detail = " ".join(str(err).split())[:200]
            reason = "truncated" if iso_bmff_truncated(path) else "corrupt_audio"
            got = (t_first or 0.0) + sum(map(len, chunks)) / sample_rate
            raise MediaError(path, reason, f"audio decode failed after {got:.2f} s: {detail}") from None
    wave = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    _check_length(path, (t_first or 0.0) + len(wave) / sample_rate, declared, end, "truncated")
    return wave


def _is_no_audio(err: BaseException) -> bool:
    return "audio stream" in str(err).lower()


def read_audio(path: str | Path, sample_rate: int = 16000, start: float | None = None,
               end: float | None = None, backend: str = "pyav") -> np.ndarray:
    """The audio of ``path`` between ``start`` and ``end`` seconds as (S,) float32 mono.

    ``backend="decord"`` tries decord's AudioReader first; when it raises for a reason other
    than a missing audio track, PyAV reads the file instead. A track decord decodes short of its
    declared duration is read again by PyAV, whose decoder names the damage.

    Raises:
        MediaError: ``no_audio`` when the file has no audio track; ``corrupt_audio`` or
            ``truncated`` for a damaged track (module doc); other reasons as diagnosed.
    """
    if backend not in AUDIO_BACKENDS:
        raise ValueError(f"audio backend must be one of {AUDIO_BACKENDS}, got {backend!r}")
    path = Path(path)
    check_file(path)
    wave, short = None, None
    if backend == "decord":
        try:
            wave = _read_decord(path, sample_rate, end)
        except MediaError as err:
            if err.reason == "no_audio":
                raise
            short = err  # PyAV below names the damage; if it decodes the track whole, this stands
        except _DecordAudioError as err:
            if _is_no_audio(err):
                raise MediaError(path, "no_audio", "file has no audio stream") from None
            # else: fall back to PyAV below
    if wave is None:
        with media_errors(path):
            wave = _read_pyav(path, sample_rate, start, end)
        if short is not None:
            raise short
    return slice_wave(wave, sample_rate, start, end)


def slice_wave(wave: np.ndarray, sample_rate: int, start: float | None = None,
               end: float | None = None) -> np.ndarray:
    """The part of a track decoded from its beginning, ``wave`` (S,), between ``start`` and
    ``end`` seconds: exactly what ``read_audio(path, sample_rate, start, end)`` returns.

    A track that ends before ``end`` is padded with silence up to ``end - start`` seconds, so
    that feature times stay aligned with video frame times: ``read_audio`` has checked the
    track against its declared duration before, so this pads only past the end of an intact
    track. Callers that need many windows of one file (sliding-window captioning) decode it
    once and slice it here.
    """
    a = 0 if start is None else max(0, int(round(start * sample_rate)))
    b = len(wave) if end is None else min(len(wave), int(round(end * sample_rate)))
    if end is not None and b > a:
        wave = wave[a:b]
        n = int(round((end - (start or 0.0)) * sample_rate))
        if len(wave) < n:  # the track ends early: pad with silence so times stay aligned
            wave = np.pad(wave, (0, n - len(wave)))
        return wave
    return wave[a:b]


@lru_cache(maxsize=8)
def _mel(sample_rate: int, n_mels: int, n_fft: int, win: int, hop: int, device: torch.device = torch.device("cpu")):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, win_length=win, hop_length=hop, n_mels=n_mels,
        center=True, power=2.0).to(device)


def log_mel(wave: np.ndarray | torch.Tensor, sample_rate: int = 16000, n_mels: int = 128,
            win_seconds: float = 0.025, hop_seconds: float = 0.010, eps: float = 1e-6) -> torch.Tensor:
    """Log-mel filterbank of mono waves (..., S): (..., M, Tm) float32 with Tm = S // hop + 1,
    computed on the wave's device (a batch of waves on the GPU in one call)."""
    x = torch.as_tensor(wave, dtype=torch.float32)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"wave must be (..., S) with S >= 1 samples, got shape {tuple(x.shape)}")
    win = int(round(win_seconds * sample_rate))
    hop = int(round(hop_seconds * sample_rate))
    # zero-padded FFT: 128 triangular filters need more than 257 bins to all be non-empty
    n_fft = max(1 << (win - 1).bit_length(), 8 * n_mels)
    if x.shape[-1] < n_fft // 2 + 1:  # reflect padding needs a few samples
        x = torch.nn.functional.pad(x, (0, n_fft // 2 + 1 - x.shape[-1]))
    with torch.no_grad():
        spec = _mel(sample_rate, n_mels, n_fft, win, hop, x.device)(x)  # (..., M, Tm)
    return torch.log(spec + eps)
