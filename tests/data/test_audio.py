
import av
import numpy as np
import pytest
import soundfile as sf
import torch

from mmsparse.data.audio import log_mel, read_audio, slice_wave
from mmsparse.data.errors import MediaError

SR = 16000


def _mel_bin(freq: float, n_mels: int = 128, sr: int = SR) -> int:
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # HTK scale, torchaudio's default
    return int(round(mel(freq) / mel(sr / 2) * (n_mels + 1))) - 1


def _onsets(feat: torch.Tensor, hop: float = 0.01) -> tuple[float, float]:
    energy = feat.exp().sum(0)
    on = torch.nonzero(energy > energy.max() * 0.1).flatten()
    return on[0].item() * hop, on[-1].item() * hop


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_tone_times_and_pitch_from_video_track(synth_manifest, synth_records, spec, backend):
    for rec in synth_records[:2]:
        wave = read_audio(synth_manifest.parent / rec["video"], backend=backend)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(len(wave) / SR - spec.frames / spec.fps) < 0.1
        feat = log_mel(wave)
        assert feat.shape == (128, len(wave) // 160 + 1)
        tone = rec["events"][1]
        a, b = _onsets(feat)
        assert abs(a - tone["start"]) < 0.03 and abs(b - tone["end"]) < 0.03
        mid = int((tone["start"] + tone["end"]) / 2 / 0.01)
        assert abs(int(feat[:, mid].argmax()) - _mel_bin(tone["freq"])) <= 2


def test_window_keeps_time_alignment(synth_manifest, synth_records):
    rec = synth_records[0]
    tone = rec["events"][1]
    start = max(0.0, tone["start"] - 0.5)
    for backend in ["decord", "pyav"]:
        wave = read_audio(synth_manifest.parent / rec["video"], start=start, end=start + 1.0, backend=backend)
        assert len(wave) == SR
        a, _ = _onsets(log_mel(wave))
        assert abs(a - (tone["start"] - start)) < 0.03



@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_window_read_is_a_slice_of_the_whole_track(synth_manifest, synth_records, spec, backend):
    """read_audio of [start, end) equals slice_wave of the whole decoded track, sample for sample,
    so a caller may decode a file once and cut its windows (including one past the track's end,
    padded with silence)."""
    path = synth_manifest.parent / synth_records[0]["video"]
    whole = read_audio(path, backend=backend)
    dur = spec.frames / spec.fps
    for start, end in [(0.0, 1.0), (0.37, 1.21), (1.0625, 2.5), (dur - 0.4, dur + 0.6)]:
        part = read_audio(path, start=start, end=end, backend=backend)
        cut = slice_wave(whole, SR, start, end)
        assert len(part) == int(round((end - start) * SR))
        np.testing.assert_array_equal(part, cut)
    assert np.array_equal(slice_wave(whole, SR, 0.5, None), whole[SR // 2:])

def test_separate_wav_resampled_to_16k(tmp_path):
    sr = 44100
    t = np.arange(sr * 2) / sr
    x = np.where(t >= 1.0, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0)
    stereo = np.stack([x, x], 1).astype(np.float32)
    sf.write(tmp_path / "a.wav", stereo, sr)
    for backend in ["decord", "pyav"]:
        wave = read_audio(tmp_path / "a.wav", backend=backend)
        assert abs(len(wave) - 2 * SR) < 50
        spec = np.abs(np.fft.rfft(wave[SR + 1000:SR + 9000]))
        assert abs(np.argmax(spec) * SR / 8000 - 440) < 4
        a, _ = _onsets(log_mel(wave))
        assert abs(a - 1.0) < 0.03


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_missing_audio_track(tmp_path, backend):
    p = tmp_path / "silent.mp4"
    with av.open(str(p), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(4):
            f = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            f.pts = i
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    with pytest.raises(MediaError) as err:
        read_audio(p, backend=backend)
    assert err.value.reason == "no_audio" and "silent.mp4" in str(err.value)


def test_log_mel_arguments():
    feat = log_mel(np.zeros(1600, np.float32), n_mels=64, hop_seconds=0.02)
    assert feat.shape == (64, 1600 // 320 + 1) and torch.isfinite(feat).all()
    assert log_mel(np.zeros(10, np.float32)).shape[0] == 128  # very short input is padded, not an error
    batch = np.random.default_rng(0).standard_normal((2, 1600)).astype(np.float32)
    both = log_mel(batch)  # (B, S) -> (B, M, Tm), each row as if alone
    assert both.shape == (2, 128, 1600 // 160 + 1)
    torch.testing.assert_close(both[1], log_mel(batch[1]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"wave must be \(\.\.\., S\) with S >= 1"):
        log_mel(np.zeros((2, 0), np.float32))
    with pytest.raises(ValueError, match="audio backend"):
        read_audio("x.wav", backend="torchaudio")
