"""Audio: read a track (a video's own or a separate file) as 16 kHz mono, and log-mel features.

``read_audio(path, sr, start, end)`` decodes from the beginning of the file (decord's
AudioReader always loads the whole track) and cuts ``[start, end)`` out with ``slice_wave``;
to read many windows of one file, decode it once (``start=end=None``) and slice it.

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

from .errors import MediaError, check_file, diagnose

AUDIO_BACKENDS = ("decord", "pyav")


def _read_decord(path: Path, sample_rate: int) -> np.ndarray:
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    ar = decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
    return ar[:].asnumpy()[0].astype(np.float32, copy=False)


def _read_pyav(path: Path, sample_rate: int, start: float | None, end: float | None) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            raise MediaError(path, "no_audio", "file has no audio stream")
        stream = c.streams.audio[0]
        rs = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in c.decode(stream):
            if end is not None and frame.time is not None and frame.time > end + 0.1:
                break
            for g in rs.resample(frame):
                chunks.append(g.to_ndarray().reshape(-1))
        for g in rs.resample(None):
            chunks.append(g.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


def _is_no_audio(err: BaseException) -> bool:
    return "audio stream" in str(err).lower()


def read_audio(path: str | Path, sample_rate: int = 16000, start: float | None = None,
               end: float | None = None, backend: str = "pyav") -> np.ndarray:
    """The audio of ``path`` between ``start`` and ``end`` seconds as (S,) float32 mono.

    decord's AudioReader is tried first (with ``backend="decord"``); when it fails for a reason
    other than a missing audio track, PyAV reads the file instead.

    Raises:
        MediaError: ``no_audio`` when the file has no audio track; other reasons as diagnosed.
    """
    if backend not in AUDIO_BACKENDS:
        raise ValueError(f"audio backend must be one of {AUDIO_BACKENDS}, got {backend!r}")
    path = Path(path)
    check_file(path)
    wave = None
    if backend == "decord":
        try:
            wave = _read_decord(path, sample_rate)
        except Exception as err:
            if _is_no_audio(err):
                raise MediaError(path, "no_audio", "file has no audio stream") from None
            wave = None  # fall back to PyAV below
    if wave is None:
        try:
            wave = _read_pyav(path, sample_rate, start, end)
        except MediaError:
            raise
        except Exception as err:
            raise diagnose(path, err) from err
    return slice_wave(wave, sample_rate, start, end)


def slice_wave(wave: np.ndarray, sample_rate: int, start: float | None = None,
               end: float | None = None) -> np.ndarray:
    """The part of a track decoded from its beginning, ``wave`` (S,), between ``start`` and
    ``end`` seconds: exactly what ``read_audio(path, sample_rate, start, end)`` returns.

    A track that ends before ``end`` is padded with silence up to ``end - start`` seconds, so
    that feature times stay aligned with video frame times. Callers that need many windows of
    one file (sliding-window captioning) decode it once and slice it here.
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
