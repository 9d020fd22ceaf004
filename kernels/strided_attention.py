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
rounding of the terms. The merge is PyTorch on (B, H, N, D) tensors, without autograd.

Backward: no gradient goes through the merge. Each part's backward kernels run with the merged
output and LSE instead of their own: P recomputed from the final LSE and delta = rowsum(dO *
out) from the final output make dS = P (dP - delta + dlse) the union's gradient restricted to
that part's pairs. The sum of both parts counts the overlap pairs twice; `_remove_overlap`
subtracts them once (P pairs, a few (B, H, P, D) float32 tensors).

Layers (CONVENTIONS.md item 1):
1. Reference: `strided_attention_ref`, dense masked attention over the whole layout.
2. Kernels: the block-sparse and axial kernels, unchanged.
3. `strided_split` (which layouts take this path, with the rest's layout and the overlap
   pairs, cached on the layout), `_merge`, `_remove_overlap`, the autograd function and the
   public `strided_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmsparse.attention.backends import check_key_padding_mask

from . import axial_attention as ax
from . import block_sparse_attention as bs
from .block_sparse_attention import _check, block_sparse_attention_ref

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


def _pad_lines(x: torch.Tensor, n_pad: int, value: float = 0.0) -> torch.Tensor:
    """(B, H, N, ...) padded along N to n_pad (a copy only when N < n_pad)."""
    n = x.shape[2]
    if n == n_pad:
        return x
    pad = [0, 0] * (x.dim() - 3) + [0, n_pad - n]
    return F.pad(x, pad, value=value)


def _line_grid(n: int, stride: int) -> tuple[int, tuple[int, int, int]]:
    """(N padded to a multiple of the stride, the axial geometry of the strided lines)."""
    n_pad = -(-n // stride) * stride
    return n_pad, (1, n_pad // stride, stride)


def _line_padding(kpm, b: int, n: int, n_pad: int, device):
    """Key padding of the padded line grid: the user's flags, then the tail of padding keys."""
    if n == n_pad:
        return kpm
    tail = torch.ones(b, n_pad, dtype=torch.bool, device=device)
    tail[:, :n] = False if kpm is None else kpm
    return tail


def _merge(out_a, lse_a, out_b, lse_b, q, k, v, oq, ok, scale: float, kpm):
    """Union of two attention results over key sets A and B whose intersection is the pairs
    (oq, ok): out (B, H, N, D) in q's dtype, lse (B, H, N) float32 (module doc). No autograd."""
    g = q.shape[1] // k.shape[1]
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, 0.0)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)  # -inf rows weigh 0
    z = wa + wb
    num = out_a.float().mul_(wa[..., None]).add_(out_b.float().mul_(wb[..., None]))
    if oq.numel():
        e = _overlap_scores(*_overlap_pairs(q, k, oq, ok), ok, scale, kpm).sub_(m[:, :, oq]).exp_()  # (B, H, P)
        z.index_add_(2, oq, e, alpha=-1.0)
        num.index_add_(2, oq, e[..., None] * v[:, :, ok].float().repeat_interleave(g, 1), alpha=-1.0)
    live = z > 0
    zs = torch.where(live, z, 1.0)
    out = num.div_(zs[..., None]).masked_fill_(~live[..., None], 0.0)
    lse = torch.where(live, m + torch.log(zs), -math.inf)
    return out.to(q.dtype), lse


def _overlap_pairs(q, k, oq, ok) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of the overlap pairs, (B, H, P, D) float32 each (k repeated over its query heads)."""
    return q[:, :, oq].float(), k[:, :, ok].float().repeat_interleave(q.shape[1] // k.shape[1], 1)


def _overlap_scores(qo, ko, ok, scale: float, kpm) -> torch.Tensor:
    """Scores s_qk (B, H, P) float32 of the overlap pairs (`_overlap_pairs`); -inf where the key
    is padding."""
    s = (qo * ko).sum(-1).mul_(scale)
    if kpm is not None:  # neither kernel attended a padding key, so there is nothing to remove
        s.masked_fill_(kpm[:, None, ok], -math.inf)
    return s


class _StridedAttention(torch.autograd.Function):
    """Forward: both kernels' forwards and the merge. Backward: each part's backward kernels
    run with the *merged* output and LSE (P recomputed from the final LSE and delta from the
    final output is the union's gradient restricted to that part's pairs), and the overlap
    pairs, counted by both, are subtracted once. No gradient flows through the merge itself."""

    @staticmethod
    def forward(ctx, q, k, v, split, scale, kpm):
        b, _, n, _ = q.shape
        n_pad, geometry = _line_grid(n, split.stride)
        out_b, lse_b = ax._forward(_pad_lines(q, n_pad), _pad_lines(k, n_pad), _pad_lines(v, n_pad), geometry,
                                   scale, key_padding=_line_padding(kpm, b, n, n_pad, q.device))
        out_b, lse_b = out_b[:, :, :n], ax._token_order(lse_b, *geometry)[:, :, :n]
        if split.rest is None:
            out, lse = out_b, lse_b.contiguous()
        else:
            out_a, lse_a = bs._attention_forward(q, k, v, split.rest, scale, key_padding=kpm)
            out, lse = _merge(out_a, lse_a, out_b, lse_b, q, k, v, split.oq, split.ok, scale, kpm)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.split, ctx.scale, ctx.kpm = split, scale, kpm
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        split, scale, kpm = ctx.split, ctx.scale, ctx.kpm
        b, h, n, _ = q.shape
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = torch.where(torch.isfinite(lse), dlse.float(), 0.0)
        n_pad, geometry = _line_grid(n, split.stride)
        # padded query rows: no output, no gradient, and an LSE of -inf, so their P is 0
        lse_lines = ax._line_order(_pad_lines(lse[..., None], n_pad, -math.inf)[..., 0], *geometry)
        dq, dk, dv = ax._backward(
            _pad_lines(q, n_pad), _pad_lines(k, n_pad), _pad_lines(v, n_pad), _pad_lines(out, n_pad), lse_lines,
            _pad_lines(dout, n_pad), geometry, scale,
            dlse=None if dlse is None else _pad_lines(dlse[..., None], n_pad)[..., 0],
            key_padding=_line_padding(kpm, b, n, n_pad, q.device))
        dq, dk, dv = dq[:, :, :n], dk[:, :, :n], dv[:, :, :n]
        if split.rest is None:
            return dq, dk, dv, None, None, None
        dq_a, dk_a, dv_a = bs._attention_backward(q, k, v, out, lse, dout, split.rest, scale, dlse=dlse,
                                                  key_padding=kpm)
        dq, dk, dv = dq.float().add_(dq_a.float()), dk.float().add_(dk_a.float()), dv.float().add_(dv_a.float())
        if split.oq.numel():
            _remove_overlap(dq, dk, dv, q, k, v, out, lse, dout, dlse, split.oq, split.ok, scale, kpm)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _remove_overlap(dq, dk, dv, q, k, v, out, lse, dout, dlse, oq, ok, scale: float, kpm) -> None:
    """Subtract, in place, the gradient of the overlap pairs (which both parts' backward passes
    counted): dS = P (dO . v - delta + dlse), P = exp(s - lse), delta = rowsum(dO * out)."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    g = h // hk
    lse_q = lse[:, :, oq]
    qo, ko = _overlap_pairs(q, k, oq, ok)
    p = _overlap_scores(qo, ko, ok, scale, kpm).sub_(torch.where(torch.isfinite(lse_q), lse_q, math.inf)).exp_()
    do = dout[:, :, oq].float()
    vk = v[:, :, ok].float().repeat_interleave(g, 1)
    delta = (do * out[:, :, oq].float()).sum(-1)
    ds = (do * vk).sum(-1).sub_(delta)
    if dlse is not None:
        ds.add_(dlse[:, :, oq])
    ds.mul_(p)
    dq.index_add_(2, oq, ds[..., None] * ko, alpha=-scale)
    per_key = lambda x: x.reshape(b, hk, g, -1, d).sum(2)  # the query heads of each key head
    dk.index_add_(2, ok, per_key(ds[..., None] * qo), alpha=-scale)
    dv.index_add_(2, ok, per_key(p[..., None] * do), alpha=-1.0)


def strided_attention(q, k, v, layout, scale: float | None = None, key_padding_mask=None):
    """Attention over a `rest | Strided(s)` layout: rest block-sparse, strided lines axial,
    merged by LSE (module doc). Arguments and results as `block_sparse_attention`'s.

    Raises:
        ValueError: when `layout` is not such a layout (see `strided_split`), or on bad inputs.
    """
    _check(q, k, v, layout)
    reason = ax.unsupported_reason(q)
    if reason:
        raise ValueError(f"strided_attention: {reason}")
    layout = layout.to(q.device)
    split = strided_split(layout)
    if split is None:
        raise ValueError("strided_attention needs a layout of `rest | Strided(s)` (non-causal, s < N); "
                         f"got pattern {getattr(layout, 'pattern', None)!r}")
    check_key_padding_mask(key_padding_mask, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _StridedAttention.apply(q, k, v, split, scale, key_padding_mask)


__all__ = ["StridedSplit", "strided_attention", "strided_attention_ref", "strided_split"]
