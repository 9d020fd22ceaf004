"""Token streams: where each modality's tokens sit inside one long sequence.

Legend: N tokens in the stream, B batch, C channels, A grid axes of a segment (1 to 3).

A `Segment` is one modality's grid of tokens (video (T, H, W), audio (F, T), image (H, W),
text (L,)) placed at `offset` in the stream, in raster order or in tile order. Tile order
stores the grid tile after tile (tiles in raster order, tokens inside a tile in raster
order), so a 3D neighbourhood becomes a few whole blocks of consecutive tokens. Tiles at the
far edge of a grid that is not a multiple of the tile are simply smaller.

A tile whose token count is not a multiple of the attention block still straddles blocks: a
224 x 224 frame is a 14 x 14 patch grid, and no tile of 64 or 128 tokens divides it. With
`tile_align > 1` every tile starts at a multiple of `tile_align` inside the segment: its slot
is padded up to that multiple, and the padding positions belong to no segment (as the
alignment gaps between segments do). A segment then spans `span >= numel` positions; a
Tiled window over such tiles is made of whole blocks again, at the price of the padding
tokens (784 -> 832 positions for a (4, 14, 14) tile at 64-token blocks).

`StreamLayout` is the hashable description of the whole stream (the cache key of block
layouts): `n_global` global tokens first, then the segments. `TokenStream` pairs it with the
token tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

# Default time axis per modality: video (T, H, W) runs along axis 0, audio patches (F, T)
# along the last axis.
_DEFAULT_TIME_AXIS = {"video": 0, "audio": -1}


def _as_tuple(value, ndim: int, name: str) -> tuple[int, ...]:
    """Normalise an int or per-axis sequence of ints to a tuple of length `ndim`."""
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    return value


@dataclass(frozen=True)
class Segment:
    """One modality's tokens inside the stream.

    Args:
        modality: "video", "audio", "image", "text" or any other name.
        shape: the token grid, e.g. (T, H, W) for video, (F, T) for audio patches.
        offset: stream position of the segment's first token.
        order: "raster" or a tile shape (one int per grid axis).
        seconds: duration of one step along the time axis (None: the segment has no time).
        start: time of the first step, in seconds.
        time_axis: which grid axis is time (default: 0 for video, last for audio).
        tile_align: each tile of a tile order starts at a multiple of this inside the segment
            (module docstring); 1: tiles packed back to back.
    """

    modality: str
    shape: tuple[int, ...]
    offset: int = 0
    order: str | tuple[int, ...] = "raster"
    seconds: float | None = None
    start: float = 0.0
    time_axis: int | None = None
    tile_align: int = 1

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if not 1 <= len(shape) <= 3 or min(shape) < 1:
            raise ValueError(f"Segment.shape must have 1 to 3 positive sizes, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if self.order != "raster":
            tile = _as_tuple(self.order, len(shape), "Segment.order")
            if min(tile) < 1:
                raise ValueError(f"Segment.order tile sizes must be positive, got {tile!r}")
            object.__setattr__(self, "order", tile)
        if self.offset < 0:
            raise ValueError(f"Segment.offset must be >= 0, got {self.offset}")
        if not isinstance(self.tile_align, int) or self.tile_align < 1:
            raise ValueError(f"Segment.tile_align must be a positive int, got {self.tile_align!r}")
        if self.tile_align > 1 and self.order == "raster":
            raise ValueError("Segment.tile_align > 1 needs a tile order (Segment.order a tile shape), "
                             "got order='raster'")
        if self.seconds is not None:
            if not self.seconds > 0:
                raise ValueError(f"Segment.seconds must be positive, got {self.seconds}")
            axis = self.time_axis
            if axis is None:
                axis = _DEFAULT_TIME_AXIS.get(self.modality)
            if axis is None:
                raise ValueError(
                    f"Segment.time_axis is required for timed modality {self.modality!r}"
                )
            if not -len(shape) <= axis < len(shape):
                raise ValueError(f"Segment.time_axis {axis} is out of range for shape {shape}")
            object.__setattr__(self, "time_axis", axis % len(shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def span(self) -> int:
        """Stream positions the segment covers: numel plus the padding of its tile slots."""
        return _slots(self.shape, self.order, self.tile_align)[3]

    @property
    def padded(self) -> bool:
        """Whether tile slots hold padding positions (span > numel)."""
        return self.span > self.numel

    @property
    def end(self) -> int:
        return self.offset + self.span

    def raster_to_order(self) -> torch.Tensor:
        """perm (numel,): stored position (within the segment) of each raster-ordered token."""
        return _slots(self.shape, self.order, self.tile_align)[0]

    def order_to_raster(self) -> torch.Tensor:
        """(span,): raster index of the token stored at each position; -1 at tile padding."""
        return _slots(self.shape, self.order, self.tile_align)[1]

    def positions(self) -> torch.Tensor:
        """(numel,) increasing: the stored positions (within the segment) of its real tokens."""
        return _slots(self.shape, self.order, self.tile_align)[2]

    def stream_index(self) -> slice | torch.Tensor:
        """Where the segment's real tokens sit in the stream, in stored order: a slice when the
        segment has no padding, else a (numel,) index tensor."""
        if not self.padded:
            return slice(self.offset, self.end)
        return self.offset + self.positions()

    def coords(self) -> torch.Tensor:
        """coords (numel, A) int64: grid coordinates of the real tokens in stored order (the
        tokens at `positions()`)."""
        raster = self.order_to_raster()
        return unravel(raster[raster >= 0] if self.padded else raster, self.shape)

    def to_order(self, x: torch.Tensor, dim: int = 1, fill=0) -> torch.Tensor:
        """Reorder raster tokens (along `dim`, length numel) into this segment's order (length
        span); tile padding positions hold `fill`."""
        if self.order == "raster":
            return x
        if self.padded:  # the padding positions gather an appended row of `fill`
            x = torch.cat([x, torch.full_like(x.narrow(dim, 0, 1), fill)], dim)
        return x.index_select(dim, _perm_on(self.shape, self.order, self.tile_align, x.device, 0))

    def to_raster(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of `to_order` (length span -> numel raster tokens)."""
        if self.order == "raster":
            return x
        return x.index_select(dim, _perm_on(self.shape, self.order, self.tile_align, x.device, 1))


def unravel(index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """index (M,) raster indices -> coords (M, len(shape))."""
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index = index // size
    return torch.stack(out[::-1], dim=-1)


@lru_cache(maxsize=64)
def _perm_on(shape, order, tile_align: int, device: torch.device, which: int) -> torch.Tensor:
    """Gather indices on `device`, kept (a copy from pageable host memory to a GPU waits for
    the GPU's queue: a host-device synchronisation each step, four per batch).
    which 0: the raster index of each stored position (span,), numel at tile padding (the row
    `to_order` appends); 1: the stored position of each raster token (numel,)."""
    r2o, o2r, _, _ = _slots(shape, order, tile_align)
    index = torch.where(o2r >= 0, o2r, math.prod(shape)) if which == 0 else r2o
    return index.to(device)


@lru_cache(maxsize=64)
def _slots(shape: tuple[int, ...], order, tile_align: int):
    """(raster_to_stored (numel,), stored_to_raster (span,) with -1 at padding, positions
    (numel,), span) of a grid in `order` whose tiles start at multiples of `tile_align`."""
    r2o, o2r = _perms(shape, order)
    n = math.prod(shape)
    if tile_align == 1 or order == "raster":
        return r2o, o2r, torch.arange(n), n
    coords = unravel(o2r, shape)  # (n, A) in stored order: tiles are contiguous runs
    tile_id = torch.zeros(n, dtype=torch.int64)
    for a, (s, t) in enumerate(zip(shape, order)):
        tile_id = tile_id * math.ceil(s / t) + coords[:, a] // t
    count = torch.bincount(tile_id)  # tokens per tile (every tile of the grid holds some)
    slot = (count + tile_align - 1) // tile_align * tile_align
    tile_start = torch.cumsum(slot, 0) - slot
    first = torch.cumsum(count, 0) - count  # stored index of each tile's first token
    positions = tile_start[tile_id] + torch.arange(n) - first[tile_id]
    span = int(slot.sum())
    stored_to_raster = torch.full((span,), -1, dtype=torch.int64)
    stored_to_raster[positions] = o2r
    return positions[r2o], stored_to_raster, positions, span


@lru_cache(maxsize=64)
def _perms(shape: tuple[int, ...], order) -> tuple[torch.Tensor, torch.Tensor]:
    n = math.prod(shape)
    raster = torch.arange(n)
    if order == "raster":
        return raster, raster
    coords = unravel(raster, shape)  # (n, A)
    tile = torch.tensor(order)
    tiles_per_axis = [math.ceil(s / t) for s, t in zip(shape, order)]
    tile_idx = coords // tile  # (n, A)
    inner = coords % tile
    # Sort key: tile in raster order of tiles, then token in raster order inside its tile.
    key = torch.zeros(n, dtype=torch.int64)
    for a in range(len(shape)):
        key = key * tiles_per_axis[a] + tile_idx[:, a]
    for a in range(len(shape)):
        key = key * order[a] + inner[:, a]
    order_to_raster = torch.argsort(key)
    raster_to_order = torch.empty_like(order_to_raster)
    raster_to_order[order_to_raster] = raster
    return raster_to_order, order_to_raster


@dataclass(frozen=True)
class StreamLayout:
    """The whole stream: `n_global` global tokens at positions [0, n_global), then segments.

    Segments must not overlap; positions not covered by a segment (other than the global
    tokens) are allowed and belong to no grid (padding or text without a grid).
    """

    segments: tuple[Segment, ...]
    n_global: int = 0
    length: int | None = None

    def __post_init__(self):
        segs = tuple(self.segments)
        object.__setattr__(self, "segments", segs)
        if self.n_global < 0:
            raise ValueError(f"StreamLayout.n_global must be >= 0, got {self.n_global}")
        end = max([s.end for s in segs] + [self.n_global])
        length = end if self.length is None else int(self.length)
        if length < end:
            raise ValueError(f"StreamLayout.length {length} is shorter than its segments ({end})")
        object.__setattr__(self, "length", length)
        spans = sorted((s.offset, s.end, i) for i, s in enumerate(segs))
        prev_end = self.n_global
        for start, stop, i in spans:
            if start < prev_end:
                raise ValueError(
                    f"StreamLayout.segments[{i}] starts at {start}, overlapping a previous "
                    f"segment or the {self.n_global} global tokens (expected offset >= {prev_end})"
                )
            prev_end = stop

    @classmethod
    def from_grid(cls, grid, order="raster", n_global: int = 0) -> "StreamLayout":
        """One segment of shape `grid` after `n_global` global tokens."""
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        seg = Segment("tokens", grid, offset=n_global, order=order)
        return cls((seg,), n_global=n_global)

    @classmethod
    def concat(cls, *segments: Segment, n_global: int = 0) -> "StreamLayout":
        """Place segments one after another (their offsets are recomputed)."""
        placed, offset = [], n_global
        for seg in segments:
            placed.append(
                Segment(seg.modality, seg.shape, offset, seg.order, seg.seconds, seg.start, seg.time_axis,
                        seg.tile_align)
            )
            offset += seg.span
        return cls(tuple(placed), n_global=n_global)

    def tokens(self) -> "TokenTable":
        return token_table(self)


def as_stream_layout(layout) -> StreamLayout:
    """Accept a StreamLayout, or a bare grid tuple (one raster segment, no global tokens)."""
    if isinstance(layout, StreamLayout):
        return layout
    if isinstance(layout, int) or (
        isinstance(layout, (tuple, list)) and all(isinstance(s, int) for s in layout)
    ):
        return StreamLayout.from_grid(layout)
    raise ValueError(
        f"layout must be a StreamLayout or a grid tuple such as (T, H, W), got {layout!r}"
    )


@dataclass(frozen=True)
class TokenTable:
    """Per-token facts of a stream, all (N,) int64 on the CPU.

    segment: index of the token's segment, -1 outside any segment (global tokens, padding).
    coords: (N, 3) grid coordinates (unused axes and non-segment tokens: -1).
    """

    segment: torch.Tensor
    coords: torch.Tensor


@lru_cache(maxsize=32)
def token_table(layout: StreamLayout) -> TokenTable:
    n = layout.length
    segment = torch.full((n,), -1, dtype=torch.int64)
    coords = torch.full((n, 3), -1, dtype=torch.int64)
    for i, seg in enumerate(layout.segments):
        where = seg.stream_index()
        segment[where] = i
        coords[where, : seg.ndim] = seg.coords()
    return TokenTable(segment, coords)


def gap_positions(stream: StreamLayout) -> torch.Tensor:
    """(N,) bool on the host: the stream's alignment gaps (positions of no segment past the
    global tokens: between segments, at the end, and the padding of aligned tile slots)."""
    gap = token_table(stream).segment < 0
    gap[: stream.n_global] = False
    return gap


@dataclass
class TokenStream:
    """tokens (B, N, C) laid out as `layout`; pad_mask (B, N) True where a token is padding.

    sample_layouts: one StreamLayout per sample when the samples' layouts differ (same
    segments and grids, different times: clips of one batch sampled at different frame
    spacings); None when `layout` serves every sample. `groups()` splits the batch by layout.
    has_padding: whether pad_mask marks padding of shorter clips (beyond alignment gaps), when
    that is known on the host (None: read pad_mask to find out, a device sync on a GPU).
    """

    tokens: torch.Tensor
    layout: StreamLayout
    pad_mask: torch.Tensor | None = field(default=None)
    sample_layouts: tuple[StreamLayout, ...] | None = field(default=None)
    has_padding: bool | None = field(default=None)

    def groups(self) -> list[tuple[StreamLayout, torch.Tensor | None]]:
        """[(layout, sample indices (k,) int64 on the tokens' device)]; [(layout, None)] when
        one layout serves the whole batch."""
        if self.sample_layouts is None or len(set(self.sample_layouts)) == 1:
            return [(self.layout if self.sample_layouts is None else self.sample_layouts[0], None)]
        where: dict[StreamLayout, list[int]] = {}
        for b, lay in enumerate(self.sample_layouts):
            where.setdefault(lay, []).append(b)
        return [(lay, torch.tensor(idx, dtype=torch.long, device=self.tokens.device)) for lay, idx in where.items()]

    def __post_init__(self):
        if self.tokens.dim() != 3:
            raise ValueError(f"TokenStream.tokens must be (B, N, C), got {tuple(self.tokens.shape)}")
        if self.tokens.shape[1] != self.layout.length:
            raise ValueError(
                f"TokenStream.tokens has N={self.tokens.shape[1]} but layout.length={self.layout.length}"
            )
        if self.pad_mask is not None and self.pad_mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"TokenStream.pad_mask must be (B, N)={tuple(self.tokens.shape[:2])}, "
                f"got {tuple(self.pad_mask.shape)}"
            )
        if self.sample_layouts is not None:
            if len(self.sample_layouts) != self.tokens.shape[0]:
                raise ValueError(f"TokenStream.sample_layouts has {len(self.sample_layouts)} layouts for a batch "
                                 f"of {self.tokens.shape[0]}")
            if any(lay.length != self.layout.length for lay in self.sample_layouts):
                raise ValueError("TokenStream.sample_layouts must all have the stream's length")
