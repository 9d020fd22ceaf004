from __future__ import annotations

import pytest
import torch

from mmsparse.attention import Segment, StreamLayout, TokenStream
from mmsparse.attention.stream import as_stream_layout, token_table


@pytest.mark.parametrize("shape,tile", [((5, 6, 9), (2, 3, 4)), ((7, 11), (3, 4)), ((13,), (5,)), ((4, 4, 8), (4, 4, 8))])
def test_tile_order_permutations_are_exact_inverses(shape, tile):
    seg = Segment("video", shape, order=tile)
    fwd, inv = seg.raster_to_order(), seg.order_to_raster()
    n = seg.numel
    assert torch.equal(fwd[inv], torch.arange(n)) and torch.equal(inv[fwd], torch.arange(n))
    x = torch.randn(2, n, 3)
    assert torch.equal(seg.to_raster(seg.to_order(x)), x)
    # the first tile's tokens come first, in raster order inside the tile
    coords = seg.coords()
    first = min(tile[0], shape[0]) * (min(tile[1], shape[1]) if len(shape) > 1 else 1)
    if len(shape) == 3:
        first *= min(tile[2], shape[2])
    assert all((coords[:first, a] < tile[a]).all() for a in range(len(shape)))


def test_stream_layout_places_segments_and_global_tokens():
    s = StreamLayout.concat(Segment("video", (2, 3, 4)), Segment("audio", (4, 5), seconds=0.1), n_global=3)
    assert s.length == 3 + 24 + 20 and s.segments[1].offset == 27
    t = token_table(s)
    assert (t.segment[:3] == -1).all() and (t.segment[3:27] == 0).all() and (t.segment[27:] == 1).all()
    assert s.segments[1].time_axis == 1
    assert hash(s) == hash(StreamLayout.concat(Segment("video", (2, 3, 4)), Segment("audio", (4, 5), seconds=0.1), n_global=3))


def test_bad_layouts_raise_value_errors():
    with pytest.raises(ValueError, match="overlapping"):
        StreamLayout((Segment("a", (4,), 0), Segment("b", (4,), 2)))
    with pytest.raises(ValueError, match="global"):
        StreamLayout((Segment("a", (4,), 0),), n_global=2)
    with pytest.raises(ValueError, match="shape"):
        Segment("a", (0, 3))
    with pytest.raises(ValueError, match="order"):
        Segment("a", (4, 4), order=(2, 2, 2))
    with pytest.raises(ValueError, match="time_axis"):
        Segment("image", (4, 4), seconds=0.1)
    with pytest.raises(ValueError, match="grid tuple"):
        as_stream_layout("video")
    with pytest.raises(ValueError, match="layout.length"):
        TokenStream(torch.zeros(1, 5, 2), StreamLayout.from_grid((4,)))
