"""Every pattern and preset, compiled to a BlockLayout, equals the mask written from its
definition (tests/attention/oracle.py), on awkward sizes and block shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmsparse.attention import (
    AVSync, Axial, BlockSparse, Causal, Dense, Fixed, Global, Local, Random, Segment, Sinks,
    StreamLayout, Strided, Tiled, bigbird, build_layout, longformer, sliding_tile,
    sliding_window_with_sinks, sparse_transformer, timesformer_divided, video_swin,
)

from tests.attention.oracle import oracle_mask

AV = StreamLayout.concat(
    Segment("video", (4, 3, 5), seconds=0.5, order=(2, 2, 3)),
    Segment("audio", (2, 19), seconds=0.1),
    n_global=3,
)
TILED = StreamLayout.from_grid((5, 6, 9), order=(2, 3, 4))

CASES = [
    ("local3d", Local((3, 5, 5)), (3, 7, 9)),
    ("local3d_dilated", Local((2, 3, 3), dilation=(1, 2, 2)), (4, 7, 8)),
    ("local3d_causal_t", Local((3, 3, 3), causal=(True, False, False)), (5, 6, 7)),
    ("local2d_even", Local((4, 3)), (9, 11)),
    ("local1d", Local(17), (97,)),
    ("local_tiled_order", Local((3, 3, 5)), TILED),
    ("tiled", Tiled((2, 3, 4), 1), TILED),
    ("tiled_raster", Tiled((2, 2, 4), (1, 0, 1)), (5, 6, 9)),
    ("axial_t", Axial(0), (5, 6, 7)),
    ("axial_hw", Axial((1, 2)), TILED),
    ("strided", Strided(7), (130,)),
    ("strided_causal", Strided(5, causal=True), (101,)),
    ("fixed", Fixed(16, 3), (121,)),
    ("global_local", Global(5) | Local(9), (133,)),
    ("sinks", Sinks(4) | Local(7, causal=True), (90,)),
    ("random", Random(2, seed=3, block=8), (100,)),
    ("blocksparse", BlockSparse(((0, 2), (1,), (), (3, 0)), (25, 25)), (100,)),
    ("avsync", AVSync(0.6), AV),
    ("av_local_global", Local((3, 3, 3), modality="video") | Local((1, 5), modality="audio") | Global(3), AV),
    ("intersection", Local(31) & Causal(), (77,)),
    ("dense", Dense(), (50,)),
    ("longformer", longformer(21, 4), (150,)),
    ("bigbird", bigbird(15, 3, 2, 8, seed=1), (150,)),
    ("sparse_transformer", sparse_transformer(12), (150,)),
    ("sparse_transformer_fixed", sparse_transformer(12, "fixed", causal=True, summary=2), (150,)),
    ("timesformer_time", timesformer_divided()[0], (4, 5, 6)),
    ("timesformer_space", timesformer_divided()[1], (4, 5, 6)),
    ("video_swin", video_swin((2, 3, 3)), (4, 6, 7)),
    ("video_swin_shifted", video_swin((2, 3, 3), shifted=True), (4, 6, 7)),
    ("sliding_tile", sliding_tile((2, 2, 4), (1, 1, 1)), StreamLayout.from_grid((6, 4, 8), order=(2, 2, 4))),
    ("sliding_window_with_sinks", sliding_window_with_sinks(16, 3), (111,)),
]

BLOCKS = [(16, 16), (32, 16), (8, 24)]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name,pattern,layout", CASES, ids=[c[0] for c in CASES])
def test_layout_matches_definition(name, pattern, layout, block):
    expected = oracle_mask(pattern, layout)
    bl = build_layout(pattern, layout, block_q=block[0], block_k=block[1])
    got = bl.dense_mask()
    assert got.shape == expected.shape
    diff = (got != expected).nonzero()
    assert diff.numel() == 0, f"{name}: {diff.shape[0]} pairs differ, first {diff[:5].tolist()}"
    assert bl.attended_pairs() == int(expected.sum())
    # no listed block may be empty for the grid patterns, whose block tests are exact
    if not name.startswith(("random", "strided", "fixed", "sparse_transformer", "bigbird", "avsync", "local3d_dilated")):
        for qi, ki, valid in bl.iter_partial_blocks(chunk=1 << 20):
            nonempty = (bl.program.evaluate(qi, ki) & valid).flatten(1).any(1)
            assert nonempty.all(), f"{name}: {int((~nonempty).sum())} listed partial blocks are empty"


def test_transposed_lists_match():
    bl = build_layout(bigbird(15, 3, 2, 8), (150,), block_q=16, block_k=32)

    def pairs(ptr, idx, transpose=False):
        out = set()
        for r in range(ptr.numel() - 1):
            for c in idx[ptr[r] : ptr[r + 1]].tolist():
                out.add((c, r) if transpose else (r, c))
        return out

    assert pairs(bl.q_full_ptr, bl.q_full_idx) == pairs(bl.k_full_ptr, bl.k_full_idx, True)
    assert pairs(bl.q_part_ptr, bl.q_part_idx) == pairs(bl.k_part_ptr, bl.k_part_idx, True)
    assert bl.q_full_idx.dtype == torch.int32


@pytest.mark.parametrize(
    "pattern,layout",
    [
        (longformer(21, 4), (150,)),
        (bigbird(15, 3, 2, 8), (150,)),
        (sparse_transformer(12), (150,)),
        (sparse_transformer(12, "fixed", causal=True), (150,)),
        (sliding_window_with_sinks(16, 3), (111,)),
        (video_swin((2, 3, 3), shifted=True), (4, 6, 7)),
        (sliding_tile((2, 2, 4)), (6, 4, 8)),
        (timesformer_divided()[0], (4, 5, 6)),
        (Local((3, 3, 3), modality="video") | AVSync(0.3) | Global(3), AV),
    ],
)
def test_every_row_attends_a_key(pattern, layout):
    mask = build_layout(pattern, layout, 16, 16).dense_mask()
    assert mask.any(1).all()


def test_random_is_deterministic_per_seed():
    a = Random(3, seed=7, block=8).groups(200)
    assert torch.equal(a, Random(3, seed=7, block=8).groups(200))
    assert not torch.equal(a, Random(3, seed=8, block=8).groups(200))
    assert a.shape == (25, 3)
    assert all(len(set(r)) == 3 for r in a.tolist())


def test_tiled_in_tile_order_has_only_full_blocks():
    stream = StreamLayout.from_grid((8, 8, 16), order=(4, 4, 8))
    bl = build_layout(Tiled((4, 4, 8), 1), stream)
    assert bl.num_partial == 0 and bl.num_full > 0
    assert bl.utilization() == 1.0


def test_layout_is_cached():
    assert build_layout(Local(5), (64,), 16, 16) is build_layout(Local(5), (64,), 16, 16)


def test_union_and_intersection_flatten():
    p = Local(3) | Global(1) | Strided(4)
    assert len(p.parts) == 3
    q = Local(3) & Causal() & Dense()
    assert len(q.parts) == 3


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    data=st.data(),
)
def test_local_property(shape, data):
    window = tuple(data.draw(st.integers(1, s)) for s in shape)
    dilation = tuple(data.draw(st.integers(1, max(1, s // w))) for s, w in zip(shape, window))
    causal = tuple(data.draw(st.booleans()) for _ in shape)
    block = data.draw(st.sampled_from([4, 8, 16, 13]))
    pattern = Local(window, dilation, causal)
    got = build_layout(pattern, tuple(shape), block, block).dense_mask()
    assert torch.equal(got, oracle_mask(pattern, tuple(shape)))


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), data=st.data())
def test_tiled_order_property(shape, data):
    tile = tuple(data.draw(st.integers(1, s)) for s in shape)
    radius = tuple(data.draw(st.integers(0, 2)) for _ in shape)
    stream = StreamLayout.from_grid(tuple(shape), order=tile)
    for pattern in (Tiled(tile, radius), Local(tuple(max(1, s // 2) for s in shape)), Axial(len(shape) - 1)):
        got = build_layout(pattern, stream, 8, 8).dense_mask()
        assert torch.equal(got, oracle_mask(pattern, stream)), pattern
