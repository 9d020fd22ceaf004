"""Segment.tile_align: tiles stored in slots padded to a block multiple.

A 14 x 14 patch grid has no tile of a power-of-two token count, so (4, 14, 14) tiles of 784
tokens straddle blocks; padded to 832 positions (13 blocks of 64) each tile's window is whole
blocks again. The padding belongs to no segment, like the gaps between segments."""

from __future__ import annotations

import pytest
import torch

from mmsparse.attention import Global, Segment, StreamLayout, Tiled, build_layout, sparse_attention
from mmsparse.attention.backends.triton_kernels import block_lists
from mmsparse.attention.stream import token_table
from mmsparse.kernels.block_sparse import block_sparse_attention
from mmsparse.models.schedule import Gaps, StreamGlobal, gap_positions


@pytest.mark.parametrize("shape,tile,align", [((5, 6, 9), (2, 3, 4), 8), ((7, 11), (3, 4), 16), ((13,), (5,), 4),
                                              ((4, 4, 8), (4, 4, 8), 128), ((3, 5, 5), (2, 5, 5), 1)])
def test_padded_tile_order_round_trips_and_places_every_tile_on_the_alignment(shape, tile, align):
    seg = Segment("video", shape, offset=3, order=tile, tile_align=align)
    plain = Segment("video", shape, offset=3, order=tile)
    n = seg.numel
    pos = seg.positions()
    assert pos.shape == (n,) and bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) < seg.span
    assert seg.end == 3 + seg.span and seg.span % align == 0 and seg.span >= n
    x = torch.randn(2, n, 3)
    y = seg.to_order(x, fill=7.0)
    assert y.shape == (2, seg.span, 3)
    assert torch.equal(seg.to_raster(y), x)
    assert torch.equal(y[:, pos], plain.to_order(x))  # the real tokens keep the packed order
    pad = torch.ones(seg.span, dtype=torch.bool)
    pad[pos] = False
    assert bool((y[:, pad] == 7.0).all())
    assert torch.equal(seg.coords(), plain.coords())
    # every tile starts on a multiple of the alignment: a tile's first token is where its
    # coordinates are a multiple of the tile on every axis (or at the grid's start)
    coords = seg.coords()
    first = (coords % torch.tensor(tile) == 0).all(1)
    assert bool((pos[first] % align == 0).all())
    o2r = seg.order_to_raster()
    assert o2r.shape == (seg.span,) and bool((o2r[pad] == -1).all()) and torch.equal(o2r[pos].sort().values, torch.arange(n))


def test_token_table_and_gaps_mark_the_tile_padding():
    seg = Segment("video", (4, 3, 3), order=(2, 3, 3), tile_align=8)  # 2 tiles of 18 -> slots of 24
    audio = Segment("audio", (2, 5), order=(2, 5), seconds=0.1)
    layout = StreamLayout.concat(seg, audio, n_global=2)
    assert layout.segments[0].span == 48 and layout.segments[1].offset == 50 and layout.length == 60
    table = token_table(layout)
    assert int((table.segment == 0).sum()) == 36 and int((table.segment == 1).sum()) == 10
    gaps = gap_positions(layout)
    assert int(gaps.sum()) == 12 and not gaps[:2].any()
    assert gaps[2 + 18: 2 + 24].all() and gaps[2 + 42: 2 + 48].all()
    assert bool((table.coords[gaps] == -1).all())


def test_bad_tile_align_raises():
    with pytest.raises(ValueError, match="tile_align"):
        Segment("video", (4, 4), order=(2, 2), tile_align=0)
    with pytest.raises(ValueError, match="tile order"):
        Segment("video", (4, 4), tile_align=8)


def test_aligned_tiles_on_a_14x14_grid_are_whole_blocks():
    """(4, 14, 14) tiles at 64-token blocks: unaligned, every tile straddles blocks; aligned, each
    tile is 12 x 12 full blocks plus its last block row and column (the 16 real tokens beside
    48 padding positions), and the pattern keeps exactly the tiles' pairs."""
    pattern = Tiled((4, 14, 14), radius=0)
    grid, tile = (16, 14, 14), (4, 14, 14)
    packed = StreamLayout((Segment("v", grid, order=tile),))
    aligned = StreamLayout((Segment("v", grid, order=tile, tile_align=64),))
    a = build_layout(pattern | Gaps(), aligned, 64, 64)
    p = build_layout(pattern, packed, 64, 64)
    assert aligned.length == 4 * 832
    assert a.num_full == 4 * 144 and a.num_partial == 4 * 25
    assert a.num_full >= p.num_full and a.num_partial < p.num_partial - 4 * 8
    real = ~gap_positions(aligned)
    assert a.attended_pairs() - int((~real).sum()) == 4 * 784 * 784 == p.attended_pairs()


def _attend(backend, q, k, v, layout):
    if backend == "reference":
        return sparse_attention(q, k, v, layout, backend="reference")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on a CPU
    lists = block_lists(layout.to(dev))
    return block_sparse_attention(q.to(dev), k.to(dev), v.to(dev), lists)[0].cpu()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_on_padded_tiles_equals_attention_on_packed_tiles(backend):
    """The same tokens in packed and in padded tile order give the same outputs and gradients
    at the real tokens; the padding attends itself only and is no real token's key, so every
    gradient at a padding position is zero."""
    torch.manual_seed(0)
    grid, tile = (3, 5, 6), (2, 3, 4)  # odd sizes: edge tiles of 1 x 2 x 2, 2 x 3 x 2, ...
    pattern = Tiled(tile, radius=(0, 1, 0))
    packed_seg = Segment("v", grid, offset=1, order=tile)
    padded_seg = Segment("v", grid, offset=1, order=tile, tile_align=16)
    packed = StreamLayout((packed_seg,), n_global=1)
    padded = StreamLayout((padded_seg,), n_global=1)
    b, h, d = 2, 2, 32
    x = torch.randn(3, b, h, packed_seg.numel, d)
    g = torch.randn(3, b, h, 1, d)
    w = torch.randn(b, h, 1 + packed_seg.numel, d)

    def run(seg, layout, pat):
        q, k, v = (torch.cat([g[i], seg.to_order(x[i], dim=2)], 2).requires_grad_() for i in range(3))
        out = _attend(backend, q, k, v, build_layout(pat, layout, 16, 16))
        real = torch.cat([torch.zeros(1, dtype=torch.long), 1 + seg.positions()])
        (out[:, :, real] * w).sum().backward()
        return out[:, :, real], [t.grad[:, :, real] for t in (q, k, v)], [t.grad for t in (q, k, v)]

    o1, g1, _ = run(packed_seg, packed, pattern | Global(1))
    o2, g2, full = run(padded_seg, padded, pattern | StreamGlobal(1) | Gaps())
    tol = 1e-4 if backend == "reference" else 2e-3
    assert (o1 - o2).abs().max().item() < tol
    for a, c in zip(g1, g2):
        assert (a - c).abs().max().item() < tol
    pads = gap_positions(padded)
    assert pads.sum() > 0
    for t in full:
        assert t[:, :, pads].abs().max().item() == 0.0
