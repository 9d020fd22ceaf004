"""Sparse attention patterns: small frozen dataclasses, composable with `|` and `&`.

Legend: N tokens in the stream, q / k a query / key token, x a grid coordinate, L an axis
length, w a window size, d a dilation, g a dilation group (x % d).

A pattern is pure data. It says which (query, key) token pairs attend; it knows nothing of
blocks or kernels. `lower(stream)` turns it into a `MaskProgram` (see program.py); the block
compiler (blocklayout.py) and every backend work from that program alone.

Grid patterns (`Local`, `Tiled`, `Axial`) act inside each segment of the stream whose number
of axes fits (a tuple window of 3 sizes: the 3D segments; an int: every segment), optionally
only on one `modality`; tokens of different segments never meet through them. Stream patterns
(`Strided`, `Fixed`, `Global`, `Sinks`, `Causal`, `Random`, `BlockSparse`) act on stream
positions. `AVSync` joins tokens of different timed modalities by time.

Window semantics follow NATTEN: along each axis a query at x sees `w` keys of its dilation
group g = x % d; the window is centred on x (w // 2 before it) and, near a border, shifted
so that it keeps its full size: start = clamp(x // d - w // 2, 0, L_g - w), where L_g is the
number of positions of group g. A causal axis sees x and the w - 1 positions before it
(fewer at the start). w * d must not exceed L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch

from .program import POS, MaskProgram
from .stream import StreamLayout, TokenTable, as_stream_layout, token_table

TICKS_PER_SECOND = 10_000  # time attributes are integers in units of 0.1 ms


class Pattern:
    """Base class: union with `|`, intersection with `&`."""

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union(_flatten(Union, self) + _flatten(Union, other))

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection(_flatten(Intersection, self) + _flatten(Intersection, other))

    def clauses(self, ctx: "Lowering") -> list[tuple]:
        raise NotImplementedError

    def lower(self, layout) -> MaskProgram:
        """The token-level mask program of this pattern on `layout` (StreamLayout or grid)."""
        ctx = Lowering(as_stream_layout(layout))
        clauses = self.clauses(ctx)
        return ctx.program(clauses)


def _flatten(kind, p):
    return p.parts if isinstance(p, kind) else (p,)


@dataclass(frozen=True)
class Union(Pattern):
    parts: tuple[Pattern, ...]

    def clauses(self, ctx):
        return [c for p in self.parts for c in p.clauses(ctx)]


@dataclass(frozen=True)
class Intersection(Pattern):
    parts: tuple[Pattern, ...]

    def clauses(self, ctx):
        # (a1 | a2) & (b1 | b2) = a1 b1 | a1 b2 | a2 b1 | a2 b2
        return reduce(
            lambda acc, p: [x + y for x in acc for y in p.clauses(ctx)], self.parts, [()]
        )


# ---------------------------------------------------------------------------------------------
# Lowering context: builds the attribute table, one named attribute at a time.
# ---------------------------------------------------------------------------------------------


class Lowering:
    def __init__(self, stream: StreamLayout):
        self.stream = stream
        self.table: TokenTable = token_table(stream)
        self.n = stream.length
        self._attrs: list[torch.Tensor] = []
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._tables: list[torch.Tensor] = []
        self.attr("pos", lambda: torch.arange(self.n))

    def attr(self, name: str, make) -> int:
        """Index of attribute `name`, computed by `make()` ((N,) int64) the first time."""
        if name not in self._index:
            value = make()
            assert value.shape == (self.n,), (name, value.shape)
            self._index[name] = len(self._attrs)
            self._attrs.append(value.to(torch.int64))
            self._names.append(name)
        return self._index[name]

    def add_table(self, table: torch.Tensor) -> int:
        self._tables.append(table.to(torch.int64))
        return len(self._tables) - 1

    def program(self, clauses) -> MaskProgram:
        return MaskProgram(torch.stack(self._attrs), tuple(clauses), tuple(self._names), tuple(self._tables))

    # common attributes
    def segment(self) -> int:
        return self.attr("segment", lambda: self.table.segment)

    def coord(self, axis: int) -> int:
        return self.attr(f"x{axis}", lambda: self.table.coords[:, axis])

    def segments_for(self, pattern, ndim: int | None, modality: str | None):
        """(index, segment) pairs a grid pattern acts on; ValueError when there is none."""
        found = [
            (i, s)
            for i, s in enumerate(self.stream.segments)
            if (ndim is None or s.ndim == ndim) and (modality is None or s.modality == modality)
        ]
        if not found:
            shapes = [(s.modality, s.shape) for s in self.stream.segments]
            raise ValueError(
                f"pattern {pattern!r} does not fit the layout: it needs a segment with "
                f"{ndim or 'any number of'} axes{f' of modality {modality!r}' if modality else ''}, "
                f"the layout has {shapes or 'no segments'}"
            )
        return found

    def member_mask(self, segs) -> torch.Tensor:
        member = torch.zeros(self.n, dtype=torch.bool)
        for _, s in segs:
            member[s.stream_index()] = True
        return member


def _norm(value, ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, bool)):
        return (int(value),) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"{name} must be an int or {ndim} ints, got {value!r}")
    return value


def _window_ndim(window) -> int | None:
    return None if isinstance(window, int) else len(tuple(window))


# ---------------------------------------------------------------------------------------------
# Grid patterns
# ---------------------------------------------------------------------------------------------


def natten_window(x: torch.Tensor, length: int, window: int, dilation: int, causal: bool):
    """Per-token window [lo, hi) along one axis (NATTEN semantics), and its key stride.

    x (M,) coordinates -> lo, hi (M,); the keys are lo, lo + d, ..., < hi.
    """
    g = x % dilation
    j = x // dilation
    if causal:
        start = torch.clamp(j - window + 1, min=0)
        return start * dilation + g, x + 1
    group_len = torch.div(length - g + dilation - 1, dilation, rounding_mode="floor")
    start = torch.clamp(torch.minimum(j - window // 2, group_len - window), min=0)
    return start * dilation + g, (start + window - 1) * dilation + g + 1


def _window_clause(ctx, pattern, segs, axis_window, key_is_coord: bool) -> tuple:
    """The clause of a per-axis window pattern (Local, Tiled) over segments `segs`:
    same segment, and along each axis the key's value in the query's [lo, hi).

    axis_window(segment, axis, x) -> (key value, lo, hi), each (n,) for the segment's
    coordinates x along `axis`; key_is_coord: the key value is the coordinate itself.
    """
    used = max(s.ndim for _, s in segs)
    key = torch.full((3, ctx.n), -1, dtype=torch.int64)
    lo = torch.zeros(3, ctx.n, dtype=torch.int64)  # tokens outside segs: empty range [0, 0)
    hi = torch.zeros(3, ctx.n, dtype=torch.int64)
    for _, s in segs:
        sl = s.stream_index()  # the real tokens (tile padding stays outside every window)
        lo[s.ndim : used, sl] = -1  # axes this segment lacks (value -1) pass: -1 lies in [-1, 0)
        for a in range(s.ndim):
            key[a, sl], lo[a, sl], hi[a, sl] = axis_window(s, a, ctx.table.coords[sl, a])
    name = repr(pattern)
    preds = [("eq", ctx.segment())]
    for a in range(used):
        k = ctx.coord(a) if key_is_coord else ctx.attr(f"{name}.key{a}", lambda a=a: key[a])
        la = ctx.attr(f"{name}.lo{a}", lambda a=a: lo[a])
        ha = ctx.attr(f"{name}.hi{a}", lambda a=a: hi[a])
        preds.append(("range", k, la, ha))
    return tuple(preds)


@dataclass(frozen=True)
class Local(Pattern):
    """Neighbourhood window on 1D, 2D or 3D grids (NATTEN semantics, module docstring).

    window, dilation: an int (every axis, every segment) or one int per axis.
    causal: a bool or one bool per axis.
    """

    window: int | tuple[int, ...]
    dilation: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False
    modality: str | None = None

    def clauses(self, ctx):
        dil = [1, 1, 1]

        def axis_window(s, a, x):
            w = _norm(self.window, s.ndim, "Local.window")
            d = _norm(self.dilation, s.ndim, "Local.dilation")
            c = _norm(self.causal, s.ndim, "Local.causal")
            if w[a] < 1 or d[a] < 1:
                raise ValueError(f"Local.window and dilation must be >= 1, got {w}, {d}")
            if w[a] * d[a] > s.shape[a]:
                raise ValueError(
                    f"Local.window {w} with dilation {d} is larger than the grid {s.shape} "
                    f"of segment {s.modality!r} on axis {a} (expected window * dilation <= size)"
                )
            if dil[a] not in (1, d[a]):
                raise ValueError("Local.dilation must be the same on every segment it covers")
            dil[a] = d[a]
            return (x, *natten_window(x, s.shape[a], w[a], d[a], c[a]))

        segs = ctx.segments_for(self, _window_ndim(self.window), self.modality)
        clause = _window_clause(ctx, self, segs, axis_window, key_is_coord=True)
        return [clause + tuple(("cong", ctx.coord(a), m) for a, m in enumerate(dil) if m > 1)]


@dataclass(frozen=True)
class Tiled(Pattern):
    """Block-aligned tile windows (Sliding Tile Attention; Swin windows with radius 0).

    The grid is cut into tiles of shape `tile` (starting at -shift, so shifted windows work);
    a query sees every token of the (2 r + 1) tiles around its own tile along each axis, the
    tile window shifted at the borders to keep its size (capped at the number of tiles).
    With the segment stored in tile order of the same tile, every block is full.
    """

    tile: int | tuple[int, ...]
    radius: int | tuple[int, ...] = 1
    shift: int | tuple[int, ...] = 0
    modality: str | None = None

    def clauses(self, ctx):
        def axis_window(s, a, x):
            tile = _norm(self.tile, s.ndim, "Tiled.tile")
            rad = _norm(self.radius, s.ndim, "Tiled.radius")
            shift = _norm(self.shift, s.ndim, "Tiled.shift")
            if tile[a] < 1 or rad[a] < 0 or not 0 <= shift[a] < tile[a]:
                raise ValueError(
                    f"Tiled needs tile >= 1, radius >= 0 and 0 <= shift < tile, got "
                    f"tile={tile}, radius={rad}, shift={shift}"
                )
            t = (x + shift[a]) // tile[a]
            n_tiles = (s.shape[a] - 1 + shift[a]) // tile[a] + 1
            w = min(2 * rad[a] + 1, n_tiles)
            start = torch.clamp(torch.minimum(t - rad[a], torch.tensor(n_tiles - w)), min=0)
            return t, start, start + w

        segs = ctx.segments_for(self, _window_ndim(self.tile), self.modality)
        return [_window_clause(ctx, self, segs, axis_window, key_is_coord=False)]


@dataclass(frozen=True)
class Axial(Pattern):
    """A token attends the tokens of its segment that share all coordinates not in `axes`."""

    axes: int | tuple[int, ...]
    modality: str | None = None

    def clauses(self, ctx):
        axes = (self.axes,) if isinstance(self.axes, int) else tuple(self.axes)
        segs = [
            (i, s)
            for i, s in ctx.segments_for(self, None, self.modality)
            if all(-s.ndim <= a < s.ndim for a in axes)
        ]
        if not segs:
            raise ValueError(f"Axial.axes {axes} fit no segment of the layout")
        ndims = {s.ndim for _, s in segs}
        if len(ndims) > 1 and any(a < 0 for a in axes):
            raise ValueError("Axial.axes must be non-negative when segments of several ranks are covered")
        member = ctx.member_mask(segs)
        preds = [("qflag", ctx.attr(f"{self!r}.member", lambda: member)), ("eq", ctx.segment())]
        kept = {a % max(ndims) for a in axes}
        for a in range(max(ndims)):
            if a not in kept:
                preds.append(("eq", ctx.coord(a)))
        return [tuple(preds)]


# ---------------------------------------------------------------------------------------------
# Stream patterns (positions)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Causal(Pattern):
    """k <= q: intersect with it to make any pattern causal."""

    def clauses(self, ctx):
        return [(("le", POS),)]


@dataclass(frozen=True)
class Dense(Pattern):
    """Every pair attends (the dense baseline in the same machinery)."""

    def clauses(self, ctx):
        return [()]


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer's strided head: q attends k when (q - k) is a multiple of `stride`."""

    stride: int
    causal: bool = False

    def clauses(self, ctx):
        if self.stride < 1:
            raise ValueError(f"Strided.stride must be >= 1, got {self.stride}")
        clause = (("cong", POS, self.stride),)
        return [clause + ((("le", POS),) if self.causal else ())]


@dataclass(frozen=True)
class Fixed(Pattern):
    """Sparse Transformer's fixed head: q attends keys of its own `block` of positions and the
    last `summary` positions of every block."""

    block: int
    summary: int = 1
    causal: bool = False

    def clauses(self, ctx):
        if not 1 <= self.summary <= self.block:
            raise ValueError(f"Fixed needs 1 <= summary <= block, got {self.summary}, {self.block}")
        pos = torch.arange(ctx.n)
        same = ctx.attr(f"block{self.block}", lambda: pos // self.block)
        summ = ctx.attr(
            f"summary{self.block},{self.summary}", lambda: pos % self.block >= self.block - self.summary
        )
        tail = (("le", POS),) if self.causal else ()
        return [(("eq", same),) + tail, (("kflag", summ),) + tail]


def global_flag(ctx, n: int, who: str) -> int:
    """The attribute that flags the stream's first n tokens (its global tokens), for a
    pattern named `who` in the error raised when n does not fit N."""
    if not 0 < n <= ctx.n:
        raise ValueError(f"{who}(n={n}) needs 0 < n <= N={ctx.n}")
    return ctx.attr(f"first{n}", lambda: torch.arange(ctx.n) < n)


@dataclass(frozen=True)
class Global(Pattern):
    """The first `n` positions attend everything and are attended by everything."""

    n: int

    def clauses(self, ctx):
        flag = global_flag(ctx, self.n, "Global")
        return [(("qflag", flag),), (("kflag", flag),)]


@dataclass(frozen=True)
class Sinks(Pattern):
    """Every query attends the first `n` positions (attention sinks); they attend nothing extra."""

    n: int

    def clauses(self, ctx):
        return [(("kflag", global_flag(ctx, self.n, "Sinks")),)]


def _coarse_rows(rows, n_rows: int) -> torch.Tensor:
    width = max([len(r) for r in rows] + [1])
    table = torch.full((n_rows, width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return table


@dataclass(frozen=True)
class Random(Pattern):
    """BigBird's random attention: each group of `block` queries attends `blocks` distinct
    random groups of `block` keys, drawn from a generator seeded with `seed` (the same on every
    device and run)."""

    blocks: int
    seed: int = 0
    block: int = 64

    def groups(self, n: int) -> torch.Tensor:
        """(ceil(n / block), r) int64: the key groups of each query group, sorted."""
        if self.blocks < 1 or self.block < 1:
            raise ValueError(f"Random needs blocks >= 1 and block >= 1, got {self.blocks}, {self.block}")
        groups = math.ceil(n / self.block)
        r = min(self.blocks, groups)
        gen = torch.Generator().manual_seed(self.seed)
        chunks = []
        for start in range(0, groups, 1024):  # chunked: memory O(1024 x groups)
            rows = min(1024, groups - start)
            chunks.append(torch.rand(rows, groups, generator=gen).topk(r, dim=1).indices)
        return torch.cat(chunks).sort(dim=1).values

    def clauses(self, ctx):
        table = ctx.add_table(self.groups(ctx.n))
        return [(("coarse", table, self.block, self.block),)]


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """A user-given block mask: `rows[i]` lists the key blocks attended by query block i,
    with blocks of `block` = (queries, keys) positions. Build it from a (Mq, Mk) boolean tensor
    with `BlockSparse.from_mask(mask, block)`."""

    rows: tuple[tuple[int, ...], ...]
    block: tuple[int, int] = (128, 128)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block: int | tuple[int, int] = 128) -> "BlockSparse":
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"BlockSparse mask must be a 2D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        block = (block, block) if isinstance(block, int) else tuple(block)
        rows = tuple(tuple(torch.nonzero(r).flatten().tolist()) for r in mask.cpu())
        return cls(rows, block)

    def clauses(self, ctx):
        bq, bk = self.block
        mq = math.ceil(ctx.n / bq)
        if len(self.rows) != mq:
            raise ValueError(
                f"BlockSparse has {len(self.rows)} query blocks but N={ctx.n} with block {bq} "
                f"needs {mq}"
            )
        mk = math.ceil(ctx.n / bk)
        if any(k < 0 or k >= mk for r in self.rows for k in r):
            raise ValueError(f"BlockSparse key block index out of range [0, {mk})")
        table = ctx.add_table(_coarse_rows(self.rows, mq))
        return [(("coarse", table, bq, bk),)]


@dataclass(frozen=True)
class AVSync(Pattern):
    """Cross-modal time alignment: a token attends the tokens of *other* timed modalities whose
    time-span centre lies within `window_seconds` / 2 of its own centre. Times are compared
    in integer ticks of 0.1 ms: centre = round((start + (t + 1/2) * seconds) * 10^4)."""

    window_seconds: float

    def clauses(self, ctx):
        timed = [(i, s) for i, s in enumerate(ctx.stream.segments) if s.seconds is not None]
        if len({s.modality for _, s in timed}) < 2:
            raise ValueError("AVSync needs segments of at least two timed modalities (Segment.seconds set)")
        if not self.window_seconds > 0:
            raise ValueError(f"AVSync.window_seconds must be positive, got {self.window_seconds}")
        centre = torch.full((ctx.n,), -1, dtype=torch.int64)
        mod = torch.full((ctx.n,), -1, dtype=torch.int64)
        names = sorted({s.modality for s in ctx.stream.segments})
        for _, s in timed:
            where = s.stream_index()
            step = ctx.table.coords[where, s.time_axis].double()
            centre[where] = torch.round((s.start + (step + 0.5) * s.seconds) * TICKS_PER_SECOND).long()
        for s in ctx.stream.segments:
            mod[s.stream_index()] = names.index(s.modality)
        half = round(self.window_seconds * TICKS_PER_SECOND / 2)
        has_time = centre >= 0
        flag = ctx.attr("timed", lambda: has_time)
        mid = ctx.attr("time", lambda: torch.where(has_time, centre, -1))
        lo = ctx.attr(f"{self!r}.lo", lambda: torch.where(has_time, centre - half, 0))
        hi = ctx.attr(f"{self!r}.hi", lambda: torch.where(has_time, centre + half + 1, 0))
        m = ctx.attr("modality", lambda: mod)
        return [(("qflag", flag), ("kflag", flag), ("ne", m), ("range", mid, lo, hi))]


@dataclass(frozen=True)
class LSH(Pattern):
    """Reformer's LSH attention: content-dependent, so it is not composable with `|` / `&`.

    In each of `rounds` hashing rounds, queries and keys are hashed with the same seeded random
    rotation into `buckets` buckets (angular LSH: argmax over [xR, -xR] of the unit vector),
    sorted by (bucket, position), and cut into chunks of `chunk` tokens; a query chunk attends
    its own key chunk and the one before. Rounds are merged by their log-sum-exp, as Reformer
    does. The BlockLayout holds the chunk band in sorted order; `sparse_attention` hashes,
    sorts, attends and unsorts (mmsparse/attention/lsh.py).
    """

    buckets: int = 32
    rounds: int = 1
    seed: int = 0
    chunk: int = 64

    def clauses(self, ctx):
        if self.buckets < 2 or self.buckets % 2 or self.rounds < 1 or self.chunk < 1:
            raise ValueError(
                f"LSH needs an even buckets >= 2, rounds >= 1 and chunk >= 1, got "
                f"buckets={self.buckets}, rounds={self.rounds}, chunk={self.chunk}"
            )
        chunks = math.ceil(ctx.n / self.chunk)
        rows = [(i - 1, i) if i else (0,) for i in range(chunks)]
        table = ctx.add_table(_coarse_rows(rows, chunks))
        return [(("coarse", table, self.chunk, self.chunk),)]

    def __or__(self, other):
        raise ValueError("LSH is content-dependent and cannot be combined with other patterns")

    __and__ = __ror__ = __rand__ = __or__


# ---------------------------------------------------------------------------------------------
# Presets: the named systems
# ---------------------------------------------------------------------------------------------


def longformer(window: int = 513, n_global: int = 64) -> Pattern:
    """Longformer: sliding window of `window` tokens plus `n_global` global tokens."""
    return Local(window) | Global(n_global)


def bigbird(window: int = 192, n_global: int = 64, random_blocks: int = 3, block: int = 64, seed: int = 0) -> Pattern:
    """BigBird (ITC): sliding window, global tokens and random key blocks."""
    return Local(window) | Global(n_global) | Random(random_blocks, seed, block)


def sparse_transformer(stride: int = 128, mode: str = "strided", causal: bool = False, summary: int = 1) -> Pattern:
    """Sparse Transformer: `strided` (local band of `stride` plus every stride-th key) or
    `fixed` (own block of `stride` plus each block's last `summary` positions)."""
    if mode == "strided":
        local = Local(stride, causal=causal) if not causal else Local(stride, causal=True)
        return local | Strided(stride, causal)
    if mode == "fixed":
        return Fixed(stride, summary, causal)
    raise ValueError(f"sparse_transformer mode must be 'strided' or 'fixed', got {mode!r}")


def timesformer_divided(modality: str | None = None) -> tuple[Pattern, Pattern]:
    """TimeSformer divided space-time attention: (time pattern, space pattern), applied one
    after the other in each block, on (T, H, W) grids."""
    return Axial(0, modality), Axial((1, 2), modality)


def video_swin(window=(8, 7, 7), shifted: bool = False, modality: str | None = None) -> Pattern:
    """Video Swin: non-overlapping 3D windows, shifted by half a window on odd layers."""
    window = tuple(window)
    shift = tuple(w // 2 for w in window) if shifted else 0
    return Tiled(window, radius=0, shift=shift, modality=modality)


def sliding_tile(tile=(4, 4, 8), radius=(1, 1, 1), modality: str | None = None) -> Pattern:
    """Sliding Tile Attention: each tile attends its (2 r + 1)^3 neighbouring tiles."""
    return Tiled(tuple(tile), radius=radius, modality=modality)


def sliding_window_with_sinks(window: int = 1024, sinks: int = 4) -> Pattern:
    """Causal sliding window plus `sinks` attention-sink tokens at the start (StreamingLLM)."""
    return (Local(window, causal=True) | Sinks(sinks)) & Causal()


def reformer(buckets: int = 32, rounds: int = 2, chunk: int = 64, seed: int = 0) -> Pattern:
    """Reformer: multi-round LSH attention over sorted chunks."""
    return LSH(buckets, rounds, seed, chunk)


PRESETS = {
    "reformer": reformer,
    "longformer": longformer,
    "bigbird": bigbird,
    "sparse_transformer": sparse_transformer,
    "video_swin": video_swin,
    "sliding_tile": sliding_tile,
    "sliding_window_with_sinks": sliding_window_with_sinks,
}
