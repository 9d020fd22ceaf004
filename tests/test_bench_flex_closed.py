"""bench/flex_closed.py: each closed-form mask_mod equals mmsparse's own layout mask, pair by pair,
and FlexAttention on its BlockMask gives the reference backend's output.

The grids are small and odd-sized and every window touches the borders, so a wrong clamp,
dilation-group or tile-order rule changes the mask (the mutation test below shows one does).
torch FlexAttention has no backward on the CPU: forward and log-sum-exp only here.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention, AuxRequest

from bench import flex_closed as fc
from mmsparse.attention import (
    Axial, BlockSparse, Causal, Dense, Global, Local, Segment, StreamLayout, Strided, Tiled, bigbird,
    build_layout, longformer, sliding_window_with_sinks, sparse_attention, sparse_transformer, video_swin,
)

G = (3, 5, 7)
CASES = [
    ("local_raster", Local((3, 3, 5)), StreamLayout.from_grid(G)),
    ("local_even_window", Local((2, 4, 6)), StreamLayout.from_grid(G)),
    ("local_tile_order", Local((3, 3, 5)), StreamLayout.from_grid(G, order=(2, 2, 4))),
    ("local_dilated", Local((3, 3, 3), dilation=(1, 2, 2)), StreamLayout.from_grid((3, 6, 7))),
    ("local_causal_t", Local((2, 3, 5), causal=(True, False, False)), StreamLayout.from_grid(G)),
    ("local_dilated_causal", Local(4, dilation=3, causal=True), StreamLayout.from_grid((41,))),
    ("tiled_tile_order", Tiled((1, 2, 2), 1), StreamLayout.from_grid(G, order=(1, 2, 2))),
    ("tiled_uneven_raster", Tiled((2, 2, 3), (0, 1, 1)), StreamLayout.from_grid((5, 7, 9))),
    ("swin_shifted", video_swin((2, 2, 4), shifted=True), StreamLayout.from_grid(G)),
    ("axial_t", Axial(0), StreamLayout.from_grid(G, order=(2, 2, 4))),
    ("axial_hw", Axial((1, 2)), StreamLayout.from_grid(G)),
    ("longformer", longformer(15, 3), StreamLayout.from_grid((97,))),
    ("strided", sparse_transformer(8), StreamLayout.from_grid((90,))),
    ("strided_causal", Strided(7, causal=True) | Global(2), StreamLayout.from_grid((61,))),
    ("fixed_causal", sparse_transformer(8, mode="fixed", causal=True, summary=2), StreamLayout.from_grid((90,))),
    ("sinks_causal", sliding_window_with_sinks(12, 2), StreamLayout.from_grid((77,))),
    ("window_and_causal", Local((3, 3, 5)) & Causal(), StreamLayout.from_grid(G)),
    ("dense", Dense(), StreamLayout.from_grid(G)),
]
IDS = [c[0] for c in CASES]


def layout_mask(pattern, stream) -> torch.Tensor:
    return build_layout(pattern, stream, 16, 16).dense_mask()


@pytest.mark.parametrize("name, pattern, stream", CASES, ids=IDS)
def test_closed_form_equals_the_layout_mask(name, pattern, stream):
    want = layout_mask(pattern, stream)
    mask_mod = fc.closed_form(pattern, stream)
    assert mask_mod is not None
    n = stream.length
    assert torch.equal(fc.evaluate(mask_mod, n), want), name
    # the same mask_mod under vmap, as create_block_mask and flex evaluate it
    assert torch.equal(create_mask(mask_mod, 1, 1, n, n, device="cpu")[0, 0], want), name
    # every case but dense is sparse, so an always-true mask_mod would fail
    assert name == "dense" or not want.all()


@pytest.mark.parametrize("name, pattern, stream", CASES, ids=IDS)
def test_flex_on_the_closed_block_mask_matches_the_reference(name, pattern, stream):
    torch.manual_seed(0)
    block_mask = fc.closed_block_mask(pattern, stream, block=16)
    layout = build_layout(pattern, stream, 16, 16)
    q, k, v = (torch.randn(1, 2, stream.length, 16) for _ in range(3))
    with torch.no_grad():
        ref, ref_lse = sparse_attention(q, k, v, layout, backend="reference", return_lse=True)
        out, aux = flex_attention(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
    assert (out - ref).abs().max() < 1e-5 and (aux.lse - ref_lse).abs().max() < 1e-5
    # the pair count the benchmark checks before timing: exact, in no more blocks than the layout's
    attended, computed = fc.block_mask_pairs(block_mask, fc.closed_form(pattern, stream), stream.length, chunk=3)
    assert attended == layout.attended_pairs() and attended <= computed <= layout.computed_pairs()


def test_a_window_without_the_border_clamp_is_caught(monkeypatch):
    """Windows truncated at the borders (no shift) instead of NATTEN's clamped start: the
    comparison above fails on the raster case, so it can tell the two rules apart."""
    _, pattern, stream = CASES[0]
    want = layout_mask(pattern, stream)

    def truncated(xq, xk, length, w, d, causal):
        return (xk >= xq - w // 2) & (xk < xq - w // 2 + w)

    monkeypatch.setattr(fc, "_window_axis", truncated)
    assert not torch.equal(fc.evaluate(fc.closed_form(pattern, stream), stream.length), want)


def test_tile_order_coordinates_match_the_stream():
    """grid_coords inverts mmsparse's tile order, edge tiles smaller than the tile included."""
    for grid, order in [((3, 5, 7), (2, 2, 4)), ((4, 6, 8), (2, 3, 4)), ((5, 9), (2, 4)), ((11,), (4,))]:
        seg = StreamLayout.from_grid(grid, order=order).segments[0]
        got = torch.stack(fc.grid_coords(torch.arange(seg.numel), grid, order), -1)
        assert torch.equal(got, seg.coords()), (grid, order)


def test_patterns_without_a_closed_form_get_none():
    assert fc.closed_form(bigbird(9, 2, 2, 8), (101,)) is None
    assert fc.closed_form(BlockSparse(((0,), (1,)), (8, 8)), (16,)) is None
    two = StreamLayout.concat(Segment("video", (2, 3, 4)), Segment("audio", (2, 5)))
    assert fc.closed_form(Local((1, 3, 3)), two) is None
    assert fc.closed_form(Local((3, 3, 3)), StreamLayout.from_grid(G, n_global=2)) is None
    assert fc.closed_form(Local((3, 3), modality="video"), StreamLayout.from_grid((4, 5))) is None
    assert fc.closed_block_mask(bigbird(9, 2, 2, 8), (101,)) is None


def test_builders_refuse_what_the_patterns_refuse():
    with pytest.raises(ValueError, match="does not fit"):
        fc.local_mask_mod((3, 5, 7), (5, 3, 3))
    with pytest.raises(ValueError, match="shift < tile"):
        fc.tiled_mask_mod((3, 5, 7), 2, shift=2)
    with pytest.raises(ValueError, match="stride"):
        fc.strided_mask_mod(0)
