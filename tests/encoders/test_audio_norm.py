"""``AUDIO_NORM`` embeds the log-mel with silence at 0, so an audio token is the sound in it.

Raw log-mel silence is log(1e-6) = -13.8 in every bin: every silent patch became one large offset
shared by all audio tokens, and the long-clip captioners (a 1-second tone in a long silent clip)
ignored the audio entirely.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmsparse.data.audio import log_mel
from mmsparse.data.synth import TONES
from mmsparse.encoders.patch import AUDIO_NORM, SpectrogramEmbed

SR = 16000


def _tone_in_silence(seconds: float = 8.0, at: float = 3.0, freq: float = TONES["high"]) -> np.ndarray:
    wave = np.zeros(int(seconds * SR), np.float32)
    t = np.arange(SR) / SR
    wave[int(at * SR):int(at * SR) + SR] = 0.3 * np.sin(2 * np.pi * freq * t)
    return wave


def test_silence_is_the_shift():
    # the shift is exactly the data's log-mel of silence (log_mel's eps)
    silence = log_mel(np.zeros(SR, np.float32), hop_seconds=0.04, win_seconds=0.04)
    assert float(silence.min()) == float(silence.max()) == float(torch.tensor(AUDIO_NORM[0], dtype=torch.float32))
    assert AUDIO_NORM[0] == math.log(1e-6) and AUDIO_NORM[1] > 0


def test_silent_tokens_are_the_bias_and_the_tone_stands_out():
    torch.manual_seed(0)
    emb = SpectrogramEmbed(16, 16, 128, 32, norm=AUDIO_NORM)
    feat = log_mel(_tone_in_silence(), hop_seconds=0.04, win_seconds=0.04)[None]  # (1, 128, 201)
    with torch.no_grad():
        tokens, (f, u) = emb(feat)
    tokens = tokens[0].view(f, u, -1)
    dev = (tokens - emb.proj.bias).norm(dim=-1)  # (f, u): how far each token is from silence
    loud = dev > 1e-4
    # silent patches embed to the bias alone (input 0), whatever the batch; the tone's patches
    # (1 s at 0.64 s per patch: 2 or 3 time columns, a few mel rows) are the only other tokens
    assert loud.any() and loud.sum() <= 3 * f
    cols = loud.any(0).nonzero().flatten().tolist()
    assert cols and min(cols) * 0.64 <= 3.0 + 0.1 and (max(cols) + 1) * 0.64 >= 4.0 - 0.1
    # and they are large against the token scale (the raw embedding buried them in the offset)
    assert float(dev[loud].max()) > 10 * float(emb.proj.bias.detach().norm())


def test_raw_log_mel_is_one_large_shared_offset():
    """What the normalisation removes: raw (norm=None, the default) silent tokens are
    far from 0 and all alike, so the tone is a small change on a large shared vector."""
    torch.manual_seed(0)
    raw, normed = SpectrogramEmbed(16, 16, 128, 32), SpectrogramEmbed(16, 16, 128, 32, norm=AUDIO_NORM)
    normed.load_state_dict(raw.state_dict())
    feat = log_mel(_tone_in_silence(), hop_seconds=0.04, win_seconds=0.04)[None]
    with torch.no_grad():
        t_raw, _ = raw(feat)
        t_norm, _ = normed(feat)
    assert float(t_raw[0, 0].norm()) > 20 * float(t_norm[0, 0].norm())  # token 0: silence
    torch.testing.assert_close(normed(feat[:, :, :32])[0], raw((feat[:, :, :32] - AUDIO_NORM[0]) / AUDIO_NORM[1])[0])


def test_longclip_recipes_normalise_the_audio():
    from mmsparse.train.config import load_config

    for p in ("local", "local_global", "local_axial", "dense"):
        ov = load_config(f"longclip_{p}").model.overrides
        assert tuple(ov["audio_norm"]) == pytest.approx(AUDIO_NORM, abs=1e-12), p


def _hiss_and_tone(noise: float, seconds: float = 8.0, at: float = 3.0, seed: int = 0) -> np.ndarray:
    wave = _tone_in_silence(seconds, at)
    return wave + np.random.default_rng(seed).normal(0, noise, wave.shape).astype(np.float32)


@pytest.mark.parametrize("q", [0.1, 0.5])
def test_band_floor_is_the_quantile_over_the_real_frames(q):
    from mmsparse.encoders.patch import band_floor

    g = torch.Generator().manual_seed(3)
    audio = torch.randn(3, 5, 37, generator=g)
    mask = torch.ones(3, 37, dtype=torch.bool)
    mask[1, 20:] = False  # a shorter clip, padded with values that must not count
    mask[2] = False       # no audio at all
    audio[1, :, 20:] = -100.0
    got = band_floor(audio, q, mask)
    assert got.shape == (3, 5, 1) and got.dtype == torch.float32
    for b, n in ((0, 37), (1, 20)):
        want = torch.quantile(audio[b, :, :n], q, dim=-1, interpolation="lower")
        assert torch.equal(got[b, :, 0], want)
    assert torch.equal(got[2], torch.zeros(5, 1))
    assert torch.equal(band_floor(audio[:1], q), band_floor(audio[:1], q, mask[:1]))
    assert torch.equal(band_floor(audio.half(), q, mask), band_floor(audio.half().float(), q, mask))


def test_floor_puts_any_hiss_at_zero_where_a_constant_shift_does_not():
    """A constant shift is right for one noise level; the per-clip floor (``floor=q``) puts the
    background near 0 at every level and keeps the tone well above it."""
    at, hop = 3.0, 0.04
    for noise in (0.003, 0.03):
        feat = torch.as_tensor(log_mel(_hiss_and_tone(noise), hop_seconds=hop, win_seconds=hop))[None]
        quiet = torch.cat([feat[..., :int((at - 0.2) / hop)], feat[..., int((at + 1.2) / hop):]], -1)
        tone = feat[..., int((at + 0.1) / hop):int((at + 0.9) / hop)]
        emb = SpectrogramEmbed(16, 16, 128, 8, norm=AUDIO_NORM, floor=0.1)
        from mmsparse.encoders.patch import band_floor

        floor = band_floor(feat, 0.1)
        assert ((quiet - floor) / AUDIO_NORM[1]).median().abs() < 0.2
        assert ((tone - floor) / AUDIO_NORM[1]).amax() > 2.0
        # the digital-silence shift leaves the hiss as a large offset, louder with the noise
        assert ((quiet - AUDIO_NORM[0]) / AUDIO_NORM[1]).median() > 1.0
        with torch.no_grad():  # the embedding reads the floor: a louder hiss moves no silent token far
            tokens, _ = emb(feat)
        assert torch.isfinite(tokens).all()


def test_floor_embedding_ignores_padding_and_is_named_when_bad():
    torch.manual_seed(0)
    emb = SpectrogramEmbed(16, 16, 32, 8, floor=0.1)
    feat = torch.randn(1, 32, 64)
    padded = torch.cat([feat, torch.zeros(1, 32, 32)], -1)  # collate pads with zeros
    mask = torch.zeros(1, 96, dtype=torch.bool)
    mask[:, :64] = True
    with torch.no_grad():  # tokens as (f, u) grids: the real clip's columns come first
        a, (f, u) = emb(feat)
        b, (_, ub) = emb(padded, mask)
        c, _ = emb(padded)  # without the mask the zeros count in the floor
    a, b, c = a.view(f, u, -1), b.view(f, ub, -1)[:, :u], c.view(f, ub, -1)[:, :u]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="floor must be a quantile in \\(0, 1\\)"):
            SpectrogramEmbed(16, 16, 32, 8, floor=bad)
