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
