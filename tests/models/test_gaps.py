"""Alignment gaps: with segments aligned to the attention block, the gap positions are kept
from every real token by the patterns (Gaps, StreamGlobal), so the model passes no key-padding
mask for them; the real tokens' encoding is the one the mask gave."""

from __future__ import annotations

import pytest
import torch

from mmsparse.models import create_model
from mmsparse.models.captioner import _rope_on
from mmsparse.models.schedule import StreamGlobal, gap_positions, layer_pattern
from tests.models.outputs import assert_same, run


@pytest.fixture
def aligned(tokenizer):
    torch.manual_seed(0)
    # blocks of 16 and segments aligned to 32: gaps after the global tokens and between segments
    return create_model("captioner_tiny", tokenizer=tokenizer, attn_block=16, segment_align=32).eval()


@pytest.mark.parametrize("schedule", ["tiled", "tiled_axial", "local"])
def test_gaps_need_no_padding_mask(aligned, batch, schedule):
    aligned.cfg.schedule = schedule
    aligned.cfg.pack_gaps = False  # the gaps run through the blocks: their rows can be compared
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


def test_host_masks_tell_whether_clips_are_padded(aligned, batch, monkeypatch):
    """The loader's masks are host tensors: the stream knows whether shorter clips pad it without
    reading the pad mask (a device sync on a GPU), and encode() gives what the device check gives."""
    from dataclasses import replace

    short = dict(batch)
    short["video_mask"] = batch["video_mask"].clone()
    short["video_mask"][0, -4:] = False  # clip 0 ends 4 frames early: its last tubelets are padding
    with torch.no_grad():
        full, padded = aligned.embed(batch), aligned.embed(short)
    assert full.has_padding is False and padded.has_padding is True
    extra = padded.pad_mask & ~gap_positions(padded.layout)
    assert extra[0].any() and not extra[1:].any()

    forward = aligned.embed.forward
    with torch.no_grad():
        got = [aligned.encode(b)[0] for b in (batch, short)]
        monkeypatch.setattr(aligned.embed, "forward", lambda *a, **k: replace(forward(*a, **k), has_padding=None))
        want = [aligned.encode(b)[0] for b in (batch, short)]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert (got[0][0] - got[1][0]).abs().max().item() > 1e-3  # the padding changed clip 0's encoding


@pytest.mark.parametrize("schedule", ["tiled", "tiled_shifted", "tiled_axial", "local"])
def test_tile_padding_leaves_the_model_unchanged(tokenizer, batch, schedule):
    """Video tiles padded to block multiples (`video_tile_align`) change where tokens sit, not
    what they see: encoder memory at the real tokens and the caption logits equal the packed
    model's. (4, 4, 4) video grids in (2, 3, 3) tiles: edge tiles of 12, 6 and 4 tokens. The
    compressed branch is off: it pools runs of stream positions, and padding moves tokens between
    its blocks (so the property holds for the patterns, not for the block means)."""

    models = []
    for align in (1, 32):
        torch.manual_seed(0)
        m = create_model("captioner_tiny", tokenizer=tokenizer, schedule=schedule, video_tile=(2, 3, 3),
                         video_tile_align=align, backend="reference", compress_block=0).eval()
        models.append(m)
    with torch.no_grad():
        outs = [m.encode(batch) for m in models]
        logits = [m(batch) for m in models]
    (mem1, _, lay1), (mem2, _, lay2) = outs
    assert lay2.segments[0].padded and lay2.length > lay1.length
    v1, v2 = lay1.segments[0], lay2.segments[0]
    a = v1.to_raster(mem1[:, v1.offset: v1.end])
    b = v2.to_raster(mem2[:, v2.offset: v2.end])
    assert (a - b).abs().max().item() < 1e-5
    assert (logits[0] - logits[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("fused", ["0", "1"])
@pytest.mark.parametrize("schedule", ["tiled", "tiled_shifted", "local"])
def test_packed_rows_equal_the_blocks_on_every_position(aligned, batch, schedule, fused, monkeypatch):
    """pack_gaps (the default): the blocks run on the real rows and attention alone on every
    stream position (the fused rope kernel with MMSPARSE_FUSED_ROPE=1, under the interpreter
    here; the PyTorch scatter otherwise). The real rows' encoding, the caption logits and every
    weight's gradient are those of the blocks run on every position; the gaps come out zero."""
    monkeypatch.setenv("MMSPARSE_FUSED_ROPE", fused)
    aligned.cfg.schedule = schedule
    aligned.set_backend("reference")
    out = {}
    for pack in (False, True):
        aligned.cfg.pack_gaps = pack
        aligned.zero_grad(set_to_none=True)
        memory, _, layout = aligned.encode(batch)
        logits = aligned(batch)
        real = ~gap_positions(layout)  # what the gaps hold differs (zeros when packed)
        (logits.float().square().mean() + memory[:, real].float().square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in aligned.named_parameters() if p.grad is not None}
        out[pack] = memory.detach(), logits.detach(), grads
    gaps = ~real
    assert gaps.any()
    assert_same(out[True], out[False], positions=real)
    # the packed stream's gaps hold zeros before the final norm (its bias alone there)
    norm_bias = aligned.norm.bias.detach()
    assert torch.allclose(out[True][0][:, gaps], norm_bias.expand_as(out[True][0][:, gaps]), atol=1e-6)


@pytest.mark.parametrize("pack", [False, True])
def test_the_branch_widened_at_the_source_equals_the_widening_copies(aligned, batch, pack, monkeypatch):
    """With the fused rope kernel (MMSPARSE_FUSED_ROPE=1, the interpreter here) q, k, v come out
    at the compressed branch's wide length with the pooled keys in k's and v's tails, and the
    backward adds the means' gradient in the rotation's pass; the PyTorch path widens them by
    concatenation. Same encoding, logits and
    gradients of every weight, on gapped streams, packed or not."""
    from mmsparse.attention.compressed import wide_length
    from mmsparse.kernels.rope import qkv_rope

    aligned.set_backend("reference")
    aligned.cfg.pack_gaps = pack
    assert aligned.cfg.compress_block and all(b.attn.compress for b in aligned.blocks)
    with torch.no_grad():
        layout = aligned.embed(batch).layout
    lay = aligned.layer_layouts(layout)[0]
    assert wide_length(lay, aligned.cfg.compress_block, aligned.cfg.compress_keys) > layout.length
    assert wide_length(None, 128) is None and wide_length(lay, 0) is None
    from mmsparse.models import layers

    widths = []  # the n_out of every qkv_rope call: the wide path must be the one taken
    monkeypatch.setattr(layers, "qkv_rope", lambda *a, **kw: widths.append(kw.get("n_out")) or qkv_rope(*a, **kw))
    out = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("MMSPARSE_FUSED_ROPE", fused)
        out[fused] = run(aligned, batch)
    assert len(widths) == 2 * len(aligned.blocks) and all(w and w > layout.length for w in widths), widths
    assert_same(out["1"], out["0"])


def test_packed_rows_round_trip():
    from mmsparse.models.layers import packed_rows, put_rows, take_rows

    gaps = torch.tensor([False, True, True, False, False, True, False])
    packed = packed_rows(gaps)
    assert packed.index.tolist() == [0, 3, 4, 6] and packed.rows.tolist() == [0, -1, -1, 1, 2, -1, 3]
    x = torch.randn(2, 4, 3, requires_grad=True)
    full = put_rows(x, packed)
    assert full.shape == (2, 7, 3) and (full[:, gaps] == 0).all()
    assert torch.equal(take_rows(full, packed), x)
    g = torch.randn(2, 7, 3)
    (gx,) = torch.autograd.grad(full, x, g)
    assert torch.equal(gx, g[:, ~gaps])
    y = torch.randn(2, 7, 3, requires_grad=True)
    (gy,) = torch.autograd.grad(take_rows(y, packed), y, x.detach())
    assert torch.equal(gy[:, ~gaps], x.detach()) and (gy[:, gaps] == 0).all()
