"""Token counts, tile order, times and rotary positions of the multimodal tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.attention import Global, Tiled, build_layout
from mmsparse.encoders import MultimodalTokenizer, apply_rope, rope_cos_sin, stream_coords


def _big_batch():
    # 64 frames of 224x224, 10.24 s of log-mel (1,024 frames of 10 ms), one 224x224 image
    return {
        "video": torch.zeros(1, 64, 3, 224, 224), "video_times": torch.arange(64, dtype=torch.float64)[None] / 8,
        "audio": torch.zeros(1, 128, 1024), "audio_start": torch.zeros(1, dtype=torch.float64),
        "audio_hop_seconds": 0.01, "image": torch.zeros(1, 3, 224, 224),
    }


@pytest.fixture(scope="module")
def big_stream():
    torch.manual_seed(0)
    tok = MultimodalTokenizer(8, n_global=8, align=128)
    with torch.no_grad():
        return tok(_big_batch())


def test_token_counts_follow_the_grids(big_stream):
    segs = {s.modality: s for s in big_stream.layout.segments}
    assert segs["video"].shape == (32, 14, 14)       # 64 / 2, 224 / 16, 224 / 16
    assert segs["audio"].shape == (12, 101)          # AST: (128 - 16) / 10 + 1, (1024 - 16) / 10 + 1
    assert segs["image"].shape == (14, 14)
    assert big_stream.layout.n_global == 8
    # every segment starts on a 128-token block; the gaps are padding
    assert all(s.offset % 128 == 0 for s in segs.values())
    # ... and the stream ends on one: trailing gap tokens after the last segment
    assert big_stream.layout.length == -(-segs["image"].end // 128) * 128 > segs["image"].end
    assert big_stream.pad_mask[0, segs["image"].end:].all()
    n_real = 8 + 6272 + 1212 + 196
    assert int((~big_stream.pad_mask).sum()) == n_real
    assert big_stream.tokens.shape == (1, big_stream.layout.length, 8)


def test_unaligned_stream_is_contiguous():
    tok = MultimodalTokenizer(8, n_global=3, align=1)
    with torch.no_grad():
        s = tok(_big_batch())
    assert s.layout.length == 3 + 6272 + 1212 + 196
    assert not bool(s.pad_mask.any())


def _axis_pairs(length: int, tile: int, radius: int) -> int:
    """Sum over positions x of the number of positions in x's tile window (Tiled semantics)."""
    n_tiles = math.ceil(length / tile)
    w = min(2 * radius + 1, n_tiles)
    total = 0
    for x in range(length):
        t = x // tile
        start = max(0, min(t - radius, n_tiles - w))
        total += min(length, (start + w) * tile) - start * tile
    return total


def test_layout_density_matches_the_pattern(big_stream):
    layout = big_stream.layout
    n, g = layout.length, layout.n_global
    pattern = (Tiled((4, 4, 8), 1, modality="video") | Tiled((4, 32), 1, modality="audio")
               | Tiled((8, 8), 1, modality="image") | Global(g))
    bl = build_layout(pattern, layout, 128, 128)
    # Tiled windows are products over axes, so each segment's pair count factorises
    video = _axis_pairs(32, 4, 1) * _axis_pairs(14, 4, 1) * _axis_pairs(14, 8, 1)
    audio = _axis_pairs(12, 4, 1) * _axis_pairs(101, 32, 1)
    image = _axis_pairs(14, 8, 1) ** 2
    expected = video + audio + image + 2 * g * n - g * g
    assert bl.attended_pairs() == expected
    assert bl.density() == pytest.approx(expected / n**2)
    assert 0.05 < bl.density() < 0.35  # sparse, not dense


def test_tokens_are_stored_in_tile_order():
    torch.manual_seed(0)
    tok = MultimodalTokenizer(4, modalities=("video",), tubelet=(2, 8, 8), video_order=(2, 2, 2))
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        s = tok({"video": video})
        raster, grid = tok.embeds["video"](video)
    seg = s.layout.segments[0]
    assert seg.order == (2, 2, 2) and grid == (2, 4, 4)
    expect = seg.to_order(raster + tok.modality_embed.weight[tok.modality_embed.index["video"]], dim=1)
    torch.testing.assert_close(s.tokens, expect)
    # inside the first (2, 2, 2) tile, raster order: (0, 0, 0), (0, 0, 1), (0, 1, 0), ...
    assert seg.coords()[2].tolist() == [0, 1, 0]


def test_segment_times_come_from_the_batch():
    tok = MultimodalTokenizer(4, modalities=("video", "audio"), tubelet=(2, 8, 8), audio_patch=16, audio_stride=16)
    batch = {"video": torch.zeros(1, 8, 3, 16, 16), "video_times": 1.0 + torch.arange(8, dtype=torch.float64)[None] / 4,
             "audio": torch.zeros(1, 128, 200), "audio_start": torch.tensor([1.0], dtype=torch.float64),
             "audio_hop_seconds": 0.01}
    with torch.no_grad():
        s = tok(batch)
    v, a = s.layout.segments
    assert v.seconds == pytest.approx(0.5) and v.start == 0.0
    assert a.seconds == pytest.approx(0.16)
    # audio patch u covers frames [16 u, 16 u + 16), centred at (16 u + 7.5) * 10 ms after the video start
    assert a.start + 0.5 * a.seconds == pytest.approx(0.075)


def test_padding_frames_make_padding_tokens():
    tok = MultimodalTokenizer(4, modalities=("video",), tubelet=(2, 8, 8))
    mask = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    with torch.no_grad():
        s = tok({"video": torch.zeros(2, 8, 3, 16, 16), "video_mask": mask})
    coords = s.layout.segments[0].coords()
    assert not s.pad_mask[0].any()
    assert torch.equal(s.pad_mask[1], coords[:, 0] >= 2)


def test_rope_is_relative_in_3d():
    torch.manual_seed(0)
    d = 48
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    def dot(x, y):
        cq, sq = rope_cos_sin(torch.tensor([x]), d)
        ck, sk = rope_cos_sin(torch.tensor([y]), d)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())
    a = dot([3, 5, 7], [1, 2, 3])
    b = dot([13, 8, 17], [11, 5, 13])   # same offset (2, 3, 4)
    c = dot([3, 5, 7], [1, 2, 4])
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert abs(a - c) > 1e-3
    cos, sin = rope_cos_sin(torch.tensor([[4, 9, 2]]), d)
    x = torch.randn(1, 2, 1, d)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_stream_coords_zero_outside_segments(big_stream):
    c = stream_coords(big_stream.layout)
    assert c.shape == (big_stream.layout.length, 3)
    assert int(c[:8].abs().sum()) == 0 and int(c.min()) == 0


@pytest.mark.parametrize("bad, match", [
    ({"video": torch.zeros(1, 4, 3, 30, 32)}, "30x32"),
    ({"video": torch.zeros(1, 4, 1, 32, 32)}, "C=3"),
    ({"audio": torch.zeros(1, 64, 100)}, "M=128"),
])
def test_bad_shapes_raise(bad, match):
    tok = MultimodalTokenizer(4, tubelet=(2, 8, 8), audio_patch=16, audio_stride=16)
    with pytest.raises(ValueError, match=match):
        tok(bad)
