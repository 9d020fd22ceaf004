"""Dense masks written straight from each pattern's definition, token by token.

Independent of mmsparse's lowering and compiler: plain Python over coordinates. Small N only.
"""

from __future__ import annotations

import math

import torch

from mmsparse.attention import patterns as P
from mmsparse.attention.stream import StreamLayout, as_stream_layout


def _seq(v, n):
    return (v,) * n if isinstance(v, (int, bool)) else tuple(v)


def natten_keys(x: int, length: int, w: int, d: int, causal: bool) -> set[int]:
    group = [p for p in range(length) if p % d == x % d]
    j = group.index(x)
    if causal:
        return set(group[max(0, j - w + 1) : j + 1])
    start = min(max(j - w // 2, 0), len(group) - w)
    return set(group[start : start + w])


def _tokens(stream: StreamLayout):
    """position -> (segment index, coords tuple) for segment tokens."""
    out = {}
    for i, seg in enumerate(stream.segments):
        raster = list(_raster_positions(seg))
        for pos, coord in zip(range(seg.offset, seg.end), raster):
            out[pos] = (i, coord)
    return out


def _raster_positions(seg):
    """coords of the token stored at each position of the segment, by sorting tile keys."""
    coords = [tuple(c) for c in _all_coords(seg.shape)]
    if seg.order == "raster":
        return coords
    tile = seg.order
    ntiles = [math.ceil(s / t) for s, t in zip(seg.shape, tile)]

    def key(c):
        tidx = [ci // ti for ci, ti in zip(c, tile)]
        inner = [ci % ti for ci, ti in zip(c, tile)]
        k = 0
        for a, t in enumerate(tidx):
            k = k * ntiles[a] + t
        for a, t in enumerate(inner):
            k = k * tile[a] + t
        return k

    return sorted(coords, key=key)


def _all_coords(shape):
    if len(shape) == 1:
        return [(i,) for i in range(shape[0])]
    return [(i,) + rest for i in range(shape[0]) for rest in _all_coords(shape[1:])]


def oracle_mask(pattern, layout) -> torch.Tensor:
    stream = as_stream_layout(layout)
    n = stream.length
    toks = _tokens(stream)
    m = torch.zeros(n, n, dtype=torch.bool)

    if isinstance(pattern, P.Union):
        for part in pattern.parts:
            m |= oracle_mask(part, stream)
        return m
    if isinstance(pattern, P.Intersection):
        m[:] = True
        for part in pattern.parts:
            m &= oracle_mask(part, stream)
        return m

    def segs_matching(ndim, modality):
        return {
            i for i, s in enumerate(stream.segments)
            if (ndim is None or s.ndim == ndim) and (modality is None or s.modality == modality)
        }

    if isinstance(pattern, P.Local):
        ndim = None if isinstance(pattern.window, int) else len(pattern.window)
        ok = segs_matching(ndim, pattern.modality)
        for q, (si, cq) in toks.items():
            if si not in ok:
                continue
            seg = stream.segments[si]
            w, d, c = (_seq(v, seg.ndim) for v in (pattern.window, pattern.dilation, pattern.causal))
            allowed = [natten_keys(cq[a], seg.shape[a], w[a], d[a], c[a]) for a in range(seg.ndim)]
            for k, (sk, ck) in toks.items():
                if sk == si and all(ck[a] in allowed[a] for a in range(seg.ndim)):
                    m[q, k] = True
        return m
    if isinstance(pattern, P.Tiled):
        ndim = None if isinstance(pattern.tile, int) else len(pattern.tile)
        ok = segs_matching(ndim, pattern.modality)
        for q, (si, cq) in toks.items():
            if si not in ok:
                continue
            seg = stream.segments[si]
            tile, rad, sh = (_seq(v, seg.ndim) for v in (pattern.tile, pattern.radius, pattern.shift))
            windows = []
            for a in range(seg.ndim):
                ntiles = (seg.shape[a] - 1 + sh[a]) // tile[a] + 1
                w = min(2 * rad[a] + 1, ntiles)
                t = (cq[a] + sh[a]) // tile[a]
                start = min(max(t - rad[a], 0), ntiles - w)
                windows.append(range(start, start + w))
            for k, (sk, ck) in toks.items():
                if sk == si and all((ck[a] + sh[a]) // tile[a] in windows[a] for a in range(seg.ndim)):
                    m[q, k] = True
        return m
    if isinstance(pattern, P.Axial):
        axes = _seq(pattern.axes, 1) if isinstance(pattern.axes, int) else pattern.axes
        for q, (si, cq) in toks.items():
            seg = stream.segments[si]
            if pattern.modality not in (None, seg.modality) or any(not -seg.ndim <= a < seg.ndim for a in axes):
                continue
            kept = {a % seg.ndim for a in axes}
            for k, (sk, ck) in toks.items():
                if sk == si and all(cq[a] == ck[a] for a in range(seg.ndim) if a not in kept):
                    m[q, k] = True
        return m

    qi = torch.arange(n)[:, None]
    ki = torch.arange(n)[None, :]
    if isinstance(pattern, P.Dense):
        return torch.ones(n, n, dtype=torch.bool)
    if isinstance(pattern, P.Causal):
        return ki <= qi
    if isinstance(pattern, P.Strided):
        out = (qi - ki) % pattern.stride == 0
        return out & (ki <= qi) if pattern.causal else out
    if isinstance(pattern, P.Fixed):
        out = (qi // pattern.block == ki // pattern.block) | (ki % pattern.block >= pattern.block - pattern.summary)
        return out & (ki <= qi) if pattern.causal else out
    if isinstance(pattern, P.Global):
        return (qi < pattern.n) | (ki < pattern.n)
    if isinstance(pattern, P.Sinks):
        return (ki < pattern.n).expand(n, n).clone()
    if isinstance(pattern, P.BlockSparse):
        bq, bk = pattern.block
        for i, row in enumerate(pattern.rows):
            for j in row:
                m[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk] = True
        return m
    if isinstance(pattern, P.Random):
        groups = pattern.groups(n)
        g = pattern.block
        for i, row in enumerate(groups.tolist()):
            for j in row:
                m[i * g : (i + 1) * g, j * g : (j + 1) * g] = True
        return m
    if isinstance(pattern, P.AVSync):
        ticks = P.TICKS_PER_SECOND
        half = round(pattern.window_seconds * ticks / 2)
        info = {}
        for q, (si, cq) in toks.items():
            seg = stream.segments[si]
            if seg.seconds is not None:
                info[q] = (seg.modality, round((seg.start + (cq[seg.time_axis] + 0.5) * seg.seconds) * ticks))
        for q, (mq, tq) in info.items():
            for k, (mk, tk) in info.items():
                if mq != mk and abs(tq - tk) <= half:
                    m[q, k] = True
        return m
    raise NotImplementedError(type(pattern).__name__)
