"""Closed-form FlexAttention mask_mods of mmsparse's patterns: the Flex anchor a careful user writes.

Legend: N tokens, q / k a query / key stream position (FlexAttention's q_idx / kv_idx), x a grid
coordinate, L an axis length, w a window size, d a dilation, t a tile size, r a tile radius.

mmsparse's flex backend hands FlexAttention a BlockMask built from the layout, whose mask_mod
evaluates the layout's mask program: per-token attribute tensors captured by the closure and
read on every pair of a partial block. A mask_mod in closed form is integer arithmetic on
q_idx and kv_idx alone (stream position -> grid coordinates by integer division, then the
pattern's rule), which FlexAttention's code generator turns into a few register operations;
its BlockMask comes from `create_block_mask`. These are the anchors the benchmark compares
against, so each rule is mmsparse's own, exactly (patterns.py): a window start clamped at
the borders so that every query keeps a full window, tiles shifted at the borders the same
way, stream order raster or tile order (edge tiles smaller when the grid is not a multiple of
the tile).

One builder per pattern, taking the pattern's parameters plus the token grid and its stored
order; `closed_form(pattern, stream)` picks them for a pattern on a one-segment stream (unions
and intersections included) and returns None where there is no closed form (random blocks,
user block lists, content-dependent or multi-modal patterns).

    python bench/flex_closed.py     # each closed form against the layout's mask on small grids
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, or_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmsparse.attention import patterns as P  # noqa: E402
from mmsparse.attention.stream import StreamLayout, as_stream_layout  # noqa: E402

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_axis(value, ndim: int, name: str) -> tuple:
    if isinstance(value, (int, bool)):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{name} must be an int or {ndim} values, got {value!r}")
    return value


def grid_coords(idx: torch.Tensor, grid: tuple[int, ...], order="raster") -> list[torch.Tensor]:
    """Stream positions idx (any shape) -> one coordinate tensor per grid axis.

    order: "raster", or a tile shape: tiles in raster order, tokens in raster order inside
    their tile, the last tile along an axis smaller when t does not divide L (mmsparse's tile
    order, stream.py). Every tile slab before the query's is full, so each axis's tile index
    is one division; sizes are Python ints wherever the tile divides the axis.
    """
    if order == "raster":
        out = []
        for size in reversed(grid):
            out.append(idx % size)
            idx = idx // size
        return out[::-1]
    tile = _per_axis(order, len(grid), "order")
    rest, tiles, extent = idx, [], []
    for a, (size, t) in enumerate(zip(grid, tile)):
        slab = math.prod(extent) * t * math.prod(grid[a + 1:])  # tokens per tile step along axis a
        ta = rest // slab
        rest = rest - ta * slab
        tiles.append(ta)
        extent.append(t if size % t == 0 else torch.clamp(size - ta * t, max=t))  # this tile's size
    inner = []
    for e in reversed(extent):  # raster index inside a tile of shape `extent`
        inner.append(rest % e)
        rest = rest // e
    return [ta * t + x for ta, t, x in zip(tiles, tile, inner[::-1])]


def _window_axis(xq, xk, length: int, w: int, d: int, causal: bool):
    """Key coordinate xk inside query xq's NATTEN window along one axis (patterns.natten_window)."""
    if d == 1:
        if causal:
            return (xk <= xq) & (xk > xq - w)
        start = torch.clamp(xq - w // 2, 0, length - w)
        return (xk >= start) & (xk < start + w)
    gq, jq, jk = xq % d, xq // d, xk // d
    same_group = xk % d == gq
    if causal:
        return same_group & (jk <= jq) & (jk > jq - w)
    group_len = (length - gq + d - 1) // d
    start = torch.clamp(torch.minimum(jq - w // 2, group_len - w), min=0)
    return same_group & (jk >= start) & (jk < start + w)


def local_mask_mod(grid, window, dilation=1, causal=False, order="raster") -> MaskMod:
    """Local(window, dilation, causal) on one segment of shape `grid` stored in `order`."""
    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    w = _per_axis(window, len(grid), "window")
    d = _per_axis(dilation, len(grid), "dilation")
    c = _per_axis(causal, len(grid), "causal")
    for a, size in enumerate(grid):
        if w[a] < 1 or d[a] < 1 or w[a] * d[a] > size:
            raise ValueError(f"window {w} with dilation {d} does not fit the grid {grid} "
                             f"(expected 1 <= window * dilation <= size)")

    def mask_mod(b, h, q_idx, kv_idx):
        xq, xk = grid_coords(q_idx, grid, order), grid_coords(kv_idx, grid, order)
        ok = _window_axis(xq[0], xk[0], grid[0], w[0], d[0], c[0])
        for a in range(1, len(grid)):
            ok = ok & _window_axis(xq[a], xk[a], grid[a], w[a], d[a], c[a])
        return ok

    return mask_mod


def tiled_mask_mod(grid, tile, radius=1, shift=0, order="raster") -> MaskMod:
    """Tiled(tile, radius, shift): the (2 r + 1) tiles around the query's own tile per axis,
    shifted at the borders to keep their number (capped at the number of tiles)."""
    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    t = _per_axis(tile, len(grid), "tile")
    r = _per_axis(radius, len(grid), "radius")
    s = _per_axis(shift, len(grid), "shift")
    if any(t[a] < 1 or r[a] < 0 or not 0 <= s[a] < t[a] for a in range(len(grid))):
        raise ValueError(f"Tiled needs tile >= 1, radius >= 0 and 0 <= shift < tile, got {t}, {r}, {s}")
    n_tiles = [(grid[a] - 1 + s[a]) // t[a] + 1 for a in range(len(grid))]
    span = [min(2 * r[a] + 1, n_tiles[a]) for a in range(len(grid))]

    def axis_ok(a, xq, xk):
        tq, tk = (xq + s[a]) // t[a], (xk + s[a]) // t[a]
        start = torch.clamp(tq - r[a], 0, n_tiles[a] - span[a])
        return (tk >= start) & (tk < start + span[a])

    def mask_mod(b, h, q_idx, kv_idx):
        xq, xk = grid_coords(q_idx, grid, order), grid_coords(kv_idx, grid, order)
        ok = axis_ok(0, xq[0], xk[0])
        for a in range(1, len(grid)):
            ok = ok & axis_ok(a, xq[a], xk[a])
        return ok

    return mask_mod


def axial_mask_mod(grid, axes, order="raster") -> MaskMod:
    """Axial(axes): same coordinates on every axis not in `axes`."""
    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if not all(-len(grid) <= a < len(grid) for a in axes):
        raise ValueError(f"Axial.axes {axes} do not fit the grid {grid}")
    fixed = [a for a in range(len(grid)) if a not in {x % len(grid) for x in axes}]

    def mask_mod(b, h, q_idx, kv_idx):
        if not fixed:  # every axis attended: the whole segment
            return q_idx >= 0
        xq, xk = grid_coords(q_idx, grid, order), grid_coords(kv_idx, grid, order)
        ok = xq[fixed[0]] == xk[fixed[0]]
        for a in fixed[1:]:
            ok = ok & (xq[a] == xk[a])
        return ok

    return mask_mod


def strided_mask_mod(stride: int, causal: bool = False) -> MaskMod:
    """Strided(stride, causal): q - k a multiple of `stride` (compared as residues: no negative
    remainder)."""
    if stride < 1:
        raise ValueError(f"Strided.stride must be >= 1, got {stride}")

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx % stride == kv_idx % stride
        return ok & (kv_idx <= q_idx) if causal else ok

    return mask_mod


def fixed_mask_mod(block: int, summary: int = 1, causal: bool = False) -> MaskMod:
    """Fixed(block, summary, causal): own block of positions, or the last `summary` of any block."""
    if not 1 <= summary <= block:
        raise ValueError(f"Fixed needs 1 <= summary <= block, got {summary}, {block}")

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (q_idx // block == kv_idx // block) | (kv_idx % block >= block - summary)
        return ok & (kv_idx <= q_idx) if causal else ok

    return mask_mod


def global_mask_mod(n: int) -> MaskMod:
    """Global(n): the first n positions attend and are attended by everything."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx < n) | (kv_idx < n)

    return mask_mod


def sinks_mask_mod(n: int) -> MaskMod:
    """Sinks(n): every query attends the first n positions."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < n

    return mask_mod


def causal_mask_mod() -> MaskMod:
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return mask_mod


def dense_mask_mod() -> MaskMod:
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= 0  # true everywhere, as a tensor of the index shape

    return mask_mod


def closed_form(pattern: P.Pattern, stream) -> MaskMod | None:
    """The closed-form mask_mod of `pattern` on `stream` (a StreamLayout or a grid tuple), or
    None where there is none: a part without one (Random, BlockSparse, AVSync, LSH), or a
    stream that is not one unpadded segment covering all N positions."""
    stream = as_stream_layout(stream)
    if len(stream.segments) != 1:
        return None
    seg = stream.segments[0]
    if seg.offset != 0 or seg.padded or stream.length != seg.numel:
        return None
    return _closed(pattern, seg)


def _closed(p, seg) -> MaskMod | None:
    if isinstance(p, (P.Union, P.Intersection)):
        parts = [_closed(x, seg) for x in p.parts]
        if any(x is None for x in parts):
            return None
        return (or_masks if isinstance(p, P.Union) else and_masks)(*parts)
    if getattr(p, "modality", None) not in (None, seg.modality):
        return None
    if isinstance(p, P.Local):
        if not isinstance(p.window, int) and len(tuple(p.window)) != seg.ndim:
            return None
        return local_mask_mod(seg.shape, p.window, p.dilation, p.causal, seg.order)
    if isinstance(p, P.Tiled):
        if not isinstance(p.tile, int) and len(tuple(p.tile)) != seg.ndim:
            return None
        return tiled_mask_mod(seg.shape, p.tile, p.radius, p.shift, seg.order)
    if isinstance(p, P.Axial):
        return axial_mask_mod(seg.shape, p.axes, seg.order)
    simple = {
        P.Strided: lambda: strided_mask_mod(p.stride, p.causal),
        P.Fixed: lambda: fixed_mask_mod(p.block, p.summary, p.causal),
        P.Global: lambda: global_mask_mod(p.n),
        P.Sinks: lambda: sinks_mask_mod(p.n),
        P.Causal: causal_mask_mod,
        P.Dense: dense_mask_mod,
    }
    make = simple.get(type(p))
    return make() if make else None


def closed_block_mask(pattern: P.Pattern, stream, block: int = 128, device="cpu") -> BlockMask | None:
    """The BlockMask of `pattern`'s closed form (None where there is none), from
    `create_block_mask`; compiled on CUDA, where the eager build would hold an N x N mask."""
    stream = as_stream_layout(stream)
    mask_mod = closed_form(pattern, stream)
    if mask_mod is None:
        return None
    n = stream.length
    compile_ = torch.device(device).type == "cuda"
    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=block, _compile=compile_)


def block_mask_pairs(block_mask: BlockMask, mask_mod: MaskMod, n: int, chunk: int | None = None) -> tuple[int, int]:
    """(attended, computed) query-key pairs of a BlockMask of N x N tokens (its first batch and
    head): full blocks count whole, partial blocks by mask_mod on each pair (`chunk` blocks at a
    time, default 2^24 pairs; broadcast index tensors), blocks clipped to N."""
    bq, bk = block_mask.BLOCK_SIZE
    chunk = chunk or max(1, (1 << 24) // (bq * bk))
    dev = block_mask.kv_indices.device

    def listed(num, idx):  # (query block, key block) of each listed pair
        num, idx = num[0, 0].long(), idx[0, 0].long()
        rows, slots = torch.nonzero(torch.arange(idx.shape[-1], device=dev) < num[:, None], as_tuple=True)
        return rows, idx[rows, slots]

    def sizes(qb, kb):
        return (n - qb * bq).clamp(max=bq) * (n - kb * bk).clamp(max=bk)

    computed = attended = 0
    if block_mask.full_kv_num_blocks is not None:
        qb, kb = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        attended = computed = int(sizes(qb, kb).sum())
    qb, kb = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    computed += int(sizes(qb, kb).sum())
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    for s in range(0, qb.numel(), chunk):
        qi = (qb[s:s + chunk, None] * bq + torch.arange(bq, device=dev))[:, :, None]  # (G, bq, 1)
        ki = (kb[s:s + chunk, None] * bk + torch.arange(bk, device=dev))[:, None, :]  # (G, 1, bk)
        valid = (qi < n) & (ki < n)
        attended += int((mask_mod(zero, zero, qi.clamp(max=n - 1), ki.clamp(max=n - 1)) & valid).sum())
    return attended, computed


def evaluate(mask_mod: MaskMod, n: int) -> torch.Tensor:
    """(N, N) bool: mask_mod on every (query, key) pair, broadcast (no vmap)."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    return mask_mod(zero, zero, q, k).expand(n, n)


def main() -> int:
    from mmsparse.attention import build_layout

    cases = [
        ("Local (3,3,5) raster", P.Local((3, 3, 5)), StreamLayout.from_grid((3, 5, 7))),
        ("Local (3,3,5) tile (2,2,4)", P.Local((3, 3, 5)), StreamLayout.from_grid((3, 5, 7), order=(2, 2, 4))),
        ("Tiled (1,2,2) r=1 tile order", P.Tiled((1, 2, 2), 1), StreamLayout.from_grid((3, 5, 7), order=(1, 2, 2))),
        ("Axial 1", P.Axial(1), StreamLayout.from_grid((3, 5, 7))),
        ("Longformer (15, 3)", P.longformer(15, 3), StreamLayout.from_grid((97,))),
        ("Sparse Transformer strided 8", P.sparse_transformer(8), StreamLayout.from_grid((90,))),
    ]
    for name, pattern, stream in cases:
        want = build_layout(pattern, stream, 16, 16).dense_mask()
        got = evaluate(closed_form(pattern, stream), stream.length)
        print(f"{name:32s} N={stream.length:4d}  pairs {int(want.sum()):6d}  "
              f"{'agrees' if torch.equal(got, want) else 'DIFFERS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
