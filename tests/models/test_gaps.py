"""Alignment gaps: with segments aligned to the attention block, the gap positions are kept
from every real token by the patterns (Gaps, StreamGlobal), so the model passes no key-padding
mask for them; the real tokens' encoding is the one the mask gave."""

from __future__ import annotations

import pytest
import torch

from mmsparse.models import create_model
from mmsparse.models.captioner import _rope_on
from mmsparse.models.schedule import StreamGlobal, gap_positions, layer_pattern


@pytest.fixture
def aligned(tokenizer):
    torch.manual_seed(0)
    # blocks of 16 and segments aligned to 32: gaps after the global tokens and between segments
    return create_model("captioner_tiny", tokenizer=tokenizer, attn_block=16, segment_align=32).eval()


@pytest.mark.parametrize("schedule", ["tiled", "tiled_axial", "local"])
def test_gaps_need_no_padding_mask(aligned, batch, schedule):
    aligned.cfg.schedule = schedule
    aligned.set_backend("reference")
    with torch.no_grad():
        stream = aligned.embed(batch)
        gaps = gap_positions(stream.layout)
        assert gaps.any(), "the fixture must have alignment gaps"
        # no shorter clip in this batch: the stream's padding is exactly its gaps
        assert torch.equal(stream.pad_mask, gaps.expand_as(stream.pad_mask))
        assert any(isinstance(p, StreamGlobal) for p in _parts(layer_pattern(aligned.cfg, 0, stream.layout)))
        rope = _rope_on(stream.layout, aligned.cfg.embed_dim // aligned.cfg.num_heads, aligned.cfg.rope_theta,
                        aligned.device)
        masked = aligned._blocks(stream.tokens, stream.layout, rope, stream.pad_mask)  # the former path
        unmasked = aligned._blocks(stream.tokens, stream.layout, rope, None)
        memory, pad, _ = aligned.encode(batch)  # takes the unmasked path
    real = ~gaps
    assert (masked[:, real] - unmasked[:, real]).abs().max().item() < 1e-5
    assert (aligned.norm(unmasked) - memory).abs().max().item() < 1e-6
    # the gap rows themselves differ (they attend one another now): the comparison can fail
    assert (masked[:, gaps] - unmasked[:, gaps]).abs().max().item() > 1e-3


def test_global_tokens_do_not_reach_the_gaps(aligned, batch):
    from mmsparse.attention import build_layout

    with torch.no_grad():
        stream = aligned.embed(batch)
    layout = build_layout(layer_pattern(aligned.cfg, 0, stream.layout), stream.layout, 16, 16)
    mask = layout.dense_mask()
    gaps = gap_positions(stream.layout)
    g = stream.layout.n_global
    assert mask[:g][:, ~gaps].all() and not mask[:g][:, gaps].any()  # globals: every real key
    assert mask[:, :g].all()  # everything attends the globals
    assert not mask[~gaps][:, gaps].any()  # no real query reaches a gap


def _parts(pattern):
    parts = getattr(pattern, "parts", None)
    return [pattern] if parts is None else [q for p in parts for q in _parts(p)]
