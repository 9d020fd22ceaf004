"""ModelConfig.memory_summary: per-modality summary tokens appended to the decoder's memory
(issue 7). Off by default (no new parameters, the same outputs); on: shapes, padding ignored,
KV-cache generation, the grouped-layout path, save / load."""

from __future__ import annotations

import json

import pytest
import torch

from mmsparse.models import ModelConfig, VideoCaptioner, create_model



def _take(batch, idx):
    """The samples `idx` of a Batch dict (as in test_times.py)."""
    n = len(batch["id"])
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
            out[k] = v[idx]
        elif k in ("id", "caption", "captions"):
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


def _model(tokenizer, memory_summary, **kw):
    torch.manual_seed(0)
    return create_model("captioner_tiny", tokenizer=tokenizer, memory_summary=memory_summary, **kw).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(batch).float()


def test_off_by_default_and_unchanged(tiny, tokenizer, batch):
    assert ModelConfig().memory_summary is None and tiny.cfg.memory_summary is None
    assert tiny.summary_embed is None
    assert not any("summary" in k for k in tiny.state_dict())
    with torch.no_grad():
        memory, pad, layout = tiny.encode(batch)
        assert tiny.decoder_memory(memory, pad, layout) == (memory, pad)
        ids = tiny.tokenize(batch)[:, :-1]
        assert torch.equal(tiny(batch), tiny.decoder(ids, memory, pad))
    # the option adds one parameter and draws no random numbers: every other weight is the same
    on = _model(tokenizer, "max")
    extra = set(on.state_dict()) - set(tiny.state_dict())
    assert extra == {"summary_embed"} and set(tiny.state_dict()) <= set(on.state_dict())
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in tiny.state_dict().items())
    assert on.summary_embed.abs().sum().item() == 0  # zero-initialised


def test_bad_value_raises():
    with pytest.raises(ValueError, match="memory_summary"):
        ModelConfig(memory_summary="mean")


@pytest.mark.parametrize("mode, per_modality", [("max", 1), ("max_mean", 2)])
def test_shapes_and_values(tokenizer, batch, mode, per_modality):
    model = _model(tokenizer, mode)
    with torch.no_grad():
        memory, pad, layout = model.encode(batch)
        mem, mpad = model.decoder_memory(memory, pad, layout)
    mods = [m for m in model.cfg.modalities if any(s.modality == m for s in layout.segments)]
    assert mods == ["video", "audio"]
    b, n, e = memory.shape
    s = len(mods) * per_modality
    assert mem.shape == (b, n + s, e) and mpad.shape == (b, n + s)
    assert torch.equal(mem[:, :n], memory) and torch.equal(mpad[:, :n], pad)
    assert not mpad[:, n:].any()
    audio = next(seg for seg in layout.segments if seg.modality == "audio")
    real = ~pad[:, audio.offset:audio.end, None]
    seg = memory[:, audio.offset:audio.end]
    want_max = seg.masked_fill(~real, -torch.inf).amax(1)
    assert torch.allclose(mem[:, n + per_modality], want_max)  # audio's max (embedding is zero)
    if mode == "max_mean":
        assert torch.allclose(mem[:, n + 3], (seg * real).sum(1) / real.sum(1), atol=1e-6)
    assert _logits(model, batch).shape == (b, model.tokenize(batch).shape[1] - 1, model.cfg.vocab_size)


@pytest.mark.parametrize("mode", ["max", "max_mean"])
def test_padding_is_ignored(tokenizer, batch, mode):
    """A shorter clip (its last frames and audio padding) and a clip with all its audio padded:
    whatever the padded inputs hold, the summaries and the logits are the same."""
    model = _model(tokenizer, mode, schedule="local")
    model.set_backend("reference")
    short = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    kt, st = model.embed.embeds["video"].tubelet[0], model.embed.embeds["audio"].stride[1]
    t, m = short["video_mask"].shape[1] // (2 * kt) * kt, short["audio_mask"].shape[1] // (2 * st) * st
    short["video_mask"][1, t:] = False
    short["audio_mask"][1, m:] = False
    short["audio_mask"][2, :] = False  # no audio at all

    def run(fill: float):
        b = dict(short)
        b["video"], b["audio"] = short["video"].clone(), short["audio"].clone()
        b["video"][1, t:] = fill
        b["audio"][1, :, m:] = fill
        b["audio"][2] = fill
        with torch.no_grad():
            memory, pad, layout = model.encode(b)
            mem, mpad = model.decoder_memory(memory, pad, layout)
            return mem, mpad, memory.shape[1], model(b).float()

    mem_a, mpad, n, logits_a = run(0.0)
    mem_b, _, _, logits_b = run(7.5)
    per = 1 if mode == "max" else 2
    # video (real for every clip), then audio: the clip without audio gets padded audio summaries
    assert not mpad[:, n:n + per].any()
    assert mpad[2, n + per:].all() and not mpad[[0, 1, 3], n + per:].any()
    assert (mem_a[:, n:][~mpad[:, n:]] - mem_b[:, n:][~mpad[:, n:]]).abs().max().item() < 1e-5
    assert (logits_a - logits_b).abs().max().item() < 1e-4
    # the padded encoder tokens do change, and an unmasked max would see them: the test can fail
    assert (mem_a[:, :n][mpad[:, :n]] - mem_b[:, :n][mpad[:, :n]]).abs().max().item() > 1e-3
    assert not torch.equal(mem_a[1, :n].amax(0), mem_b[1, :n].amax(0))


@pytest.mark.parametrize("cross", ["all", "pooled"])
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("mode", ["max", "max_mean"])
def test_kv_cache_generation_equals_no_cache(tokenizer, batch, beam, cross, mode):
    model = _model(tokenizer, mode, cross=cross, n_pool=8)
    with torch.no_grad():  # a non-zero summary embedding, so that it is really read
        model.summary_embed.normal_(0, 0.5)
    with_cache = model.generate_ids(batch, beam=beam, max_len=12, use_cache=True)
    without = model.generate_ids(batch, beam=beam, max_len=12, use_cache=False)
    assert with_cache == without
    assert any(len(r) > 0 for r in with_cache)


def test_summary_changes_the_output(tokenizer, batch):
    model = _model(tokenizer, "max_mean")
    before = _logits(model, batch)
    with torch.no_grad():
        model.summary_embed.normal_(0, 0.5)
    assert not torch.allclose(before, _logits(model, batch))
    off = _model(tokenizer, None)
    assert not torch.allclose(before, _logits(off, batch))


def test_grouped_layouts(tokenizer, batch):
    """Samples at different frame spacings (encode()'s grouped path): each sample's logits are
    those it gets alone."""
    model = _model(tokenizer, "max_mean")
    model.set_backend("reference")
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    vt = b["video_times"]
    b["video_times"][1::2] = vt[1::2, :1] + (vt[1::2] - vt[1::2, :1]) * 3
    assert len(model.embed(b).groups()) == 2
    with torch.no_grad():
        ids = model.tokenize(b)[:, :-1]
        whole = model(b, ids)
        for i in (0, 1):
            alone = model(_take(b, [i]), ids[i:i + 1])
            assert (whole[i] - alone[0]).abs().max().item() < 1e-4, i


def test_save_load_round_trip(tokenizer, batch, tmp_path):
    model = _model(tokenizer, "max_mean")
    with torch.no_grad():
        model.summary_embed.normal_(0, 0.5)
    d = model.save_pretrained(tmp_path / "m")
    assert json.loads((d / "config.json").read_text())["config"]["memory_summary"] == "max_mean"
    loaded = VideoCaptioner.from_pretrained(d).eval()
    assert loaded.cfg == model.cfg and torch.equal(loaded.summary_embed, model.summary_embed)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    assert loaded.generate(batch, beam=2, max_len=8) == model.generate(batch, beam=2, max_len=8)


def test_models_saved_before_the_option_still_load(tiny, batch, tmp_path):
    d = tiny.save_pretrained(tmp_path / "old")
    meta = json.loads((d / "config.json").read_text())
    del meta["config"]["memory_summary"]  # a config.json written before the field existed
    (d / "config.json").write_text(json.dumps(meta))
    loaded = VideoCaptioner.from_pretrained(d).eval()
    assert loaded.cfg.memory_summary is None and loaded.summary_embed is None
    assert torch.equal(_logits(loaded, batch), _logits(tiny, batch))
