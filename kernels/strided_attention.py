"""Strided attention (Sparse Transformer's strided heads): two kernels merged by their LSE.

Legend: B batch, H query heads, Hk key/value heads (GQA: H = Hk * G), N tokens, D head dim,
s the stride, P the overlap pairs (below).

`Strided(s)` lets query q attend key k when q - k is a multiple of s. Its keys are spread over
every key block, so through the block-sparse kernels a pattern `rest | Strided(s)` lists every
block pair as partial and costs more than dense attention (BENCHMARKS.md A5: FlexAttention 257
ms where dense takes 202). Yet the strided pairs are axial attention: the positions r, r + s,
r + 2s, ... form line r of the grid (N / s, s), read in place by the axial kernels. So:

    A = rest       through `block_sparse_attention` on its own BlockLayout (a band: a few
                   blocks per row)
    B = Strided(s) through `axial_attention` with geometry (1, ceil(N / s), s); N not a multiple
                   of s is padded with keys that are never attended
    O = A n B      the pairs both attend, listed once per layout (for a band narrower than s:
                   the diagonal; with global tokens also their strided keys)

merged per query row in float32, with m = max(lse_A, lse_B):

    Z   = e^(lse_A - m) + e^(lse_B - m) - sum_O e^(s_qk - m)
    out = (e^(lse_A - m) out_A + e^(lse_B - m) out_B - sum_O e^(s_qk - m) v_k) / Z
    lse = m + log Z

Z >= e^(lse_B - m) because O lies inside A, so the subtraction loses no more than float32
rounding of the terms. The merge is PyTorch on (B, H, N, D) tensors and differentiable; the
kernels' backward takes the LSE gradient the merge produces (d lse / d s = P).

Layers (CONVENTIONS.md item 1):
1. Reference: `strided_attention_ref`, dense masked attention over the whole layout.
2. Kernels: the block-sparse and axial kernels, unchanged.
3. `strided_split` (which layouts take this path, with the rest's layout and the overlap
   pairs, cached on the layout), `_merge`, and the public `strided_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmsparse.attention.backends import check_key_padding_mask

from .axial_attention import axial_attention
from .block_sparse_attention import _check, block_sparse_attention, block_sparse_attention_ref

# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------


def strided_attention_ref(q, k, v, layout, scale=None, key_padding_mask=None):
    """Dense masked attention over the layout's whole pattern, in float64: (out, lse)."""
    return block_sparse_attention_ref(q, k, v, layout, scale, key_padding_mask=key_padding_mask)


# ---------------------------------------------------------------------------------------------
# 3. Decomposition, merge, public op
# ---------------------------------------------------------------------------------------------

_PAIR_CHUNK = 1 << 22  # candidate (query, strided key) pairs evaluated at a time


@dataclass
class StridedSplit:
    """How a `rest | Strided(stride)` layout runs: `rest` (a BlockLayout, or None when the
    pattern is the strided part alone), the stride, and the overlap pairs (oq, ok) int64 (P,)."""

    rest: object
    stride: int
    oq: torch.Tensor
    ok: torch.Tensor


def _overlap(program, n: int, stride: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The strided pairs (q, k), k = q mod stride + j * stride, that `program` also attends."""
    per_q = -(-n // stride)
    rows = max(1, _PAIR_CHUNK // per_q)
    j = torch.arange(per_q, device=device) * stride
    oq, ok = [], []
    for a in range(0, n, rows):
        qi = torch.arange(a, min(n, a + rows), device=device)
        ki = (qi % stride)[:, None] + j[None, :]  # (rows, per_q)
        valid = ki < n
        hit = program.evaluate(qi[:, None], ki.clamp(max=n - 1)) & valid
        r, c = hit.nonzero(as_tuple=True)
        oq.append(qi[r])
        ok.append(ki[r, c])
    return torch.cat(oq), torch.cat(ok)


def strided_split(layout) -> StridedSplit | None:
    """A StridedSplit when `layout`'s pattern is a union with one non-causal `Strided(s)` part
    (s < N) and everything else (or nothing else) as the rest; None otherwise (user layouts,
    causal strided heads, several strides: the block-sparse path runs them). Cached on the
    layout; the first call evaluates the rest's mask on the N * ceil(N / s) strided pairs."""
    from mmsparse.attention.blocklayout import build_layout
    from mmsparse.attention.patterns import Strided, Union

    cached = getattr(layout, "_strided_split", False)
    if cached is not False:
        return cached
    split = None
    pattern, stream = getattr(layout, "pattern", None), getattr(layout, "stream", None)
    parts = pattern.parts if isinstance(pattern, Union) else (pattern,)
    strided = [p for p in parts if type(p) is Strided]
    if stream is not None and strided and all(not p.causal for p in strided) \
            and len({p.stride for p in strided}) == 1 and strided[0].stride < layout.n:
        stride = strided[0].stride
        others = [p for p in parts if type(p) is not Strided]
        if not others:
            split = StridedSplit(None, stride, *(torch.zeros(0, dtype=torch.long, device=layout.device),) * 2)
        else:
            rest_pattern = others[0] if len(others) == 1 else Union(tuple(others))
            rest = build_layout(rest_pattern, stream, layout.block_q, layout.block_k, layout.device)
            split = StridedSplit(rest, stride, *_overlap(rest.program, layout.n, stride, layout.device))
    layout._strided_split = split
    return split


def _lines_part(q, k, v, stride: int, scale: float, kpm):
    """Strided(stride) alone through the axial kernels: (out, lse) for the N tokens."""
    n = q.shape[2]
    n_pad = -(-n // stride) * stride
    if n_pad != n:  # a ragged last row of the (lines, stride) grid: padding keys, never attended
        pad = (0, 0, 0, n_pad - n)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        tail = torch.zeros(q.shape[0], n_pad, dtype=torch.bool, device=q.device)
        tail[:, n:] = True
        if kpm is not None:
            tail[:, :n] = kpm
        kpm = tail
    out, lse = axial_attention(q, k, v, (1, n_pad // stride, stride), scale, key_padding_mask=kpm)
    return out[:, :, :n], lse[:, :, :n]


def _merge(out_a, lse_a, out_b, lse_b, q, k, v, oq, ok, scale: float, kpm):
    """Union of two attention results over key sets A and B whose intersection is the pairs
    (oq, ok): out (B, H, N, D) in q's dtype, lse (B, H, N) float32 (module doc)."""
    g = q.shape[1] // k.shape[1]
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # out does not depend on m
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)  # -inf rows weigh 0
    z = wa + wb
    num = wa[..., None] * out_a.float() + wb[..., None] * out_b.float()
    if oq.numel():
        kk = k[:, :, ok].float().repeat_interleave(g, 1)  # (B, H, P, D)
        e = torch.exp((q[:, :, oq].float() * kk).sum(-1) * scale - m[:, :, oq])  # (B, H, P)
        if kpm is not None:  # neither kernel attended a padding key, so there is nothing to remove
            e = e.masked_fill(kpm[:, None, ok], 0.0)
        z = z.index_add(2, oq, e, alpha=-1.0)
        num = num.index_add(2, oq, e[..., None] * v[:, :, ok].float().repeat_interleave(g, 1), alpha=-1.0)
    live = z > 0
    out = torch.where(live[..., None], num / torch.where(live, z, 1.0)[..., None], 0.0)
    lse = torch.where(live, m + torch.log(torch.where(live, z, 1.0)), -math.inf)
    return out.to(q.dtype), lse


def strided_attention(q, k, v, layout, scale: float | None = None, key_padding_mask=None):
    """Attention over a `rest | Strided(s)` layout: rest block-sparse, strided lines axial,
    merged by LSE (module doc). Arguments and results as `block_sparse_attention`'s.

    Raises:
        ValueError: when `layout` is not such a layout (see `strided_split`), or on bad inputs.
    """
    _check(q, k, v, layout)
    split = strided_split(layout)
    if split is None:
        raise ValueError("strided_attention needs a layout of `rest | Strided(s)` (non-causal, s < N); "
                         f"got pattern {getattr(layout, 'pattern', None)!r}")
    check_key_padding_mask(key_padding_mask, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_b, lse_b = _lines_part(q, k, v, split.stride, scale, key_padding_mask)
    if split.rest is None:
        return out_b, lse_b
    out_a, lse_a = block_sparse_attention(q, k, v, split.rest, scale, key_padding_mask=key_padding_mask)
    return _merge(out_a, lse_a, out_b, lse_b, q, k, v, split.oq, split.ok, scale, key_padding_mask)


__all__ = ["StridedSplit", "strided_attention", "strided_attention_ref", "strided_split"]
