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
rounding of the terms. One kernel (`_merge_fwd_kernel`) reads both parts' outputs and LSEs (B's
in line order, where its kernel wrote it) and removes the diagonal pairs (i, i) when the rest
attends every token's own key (any band does: `StridedSplit.diag`); the overlap pairs off the
diagonal (global tokens' strided keys, ~2 g N / s) are taken out afterwards in PyTorch on
their rows only (`_remove_pairs`).

Backward: no gradient goes through the merge. Each part's backward kernels run with the merged
output and LSE instead of their own: P recomputed from the final LSE and delta = rowsum(dO *
out) from the final output make dS = P (dP - delta + dlse) the union's gradient restricted to
that part's pairs. The sum of both parts counts the overlap pairs twice: `_merge_bwd_kernel`
adds the parts' dq, dk, dv and subtracts the diagonal pairs' share in the same pass;
`_remove_overlap` subtracts the other pairs (float32, a few (B, H, P, D) tensors).

Layers (CONVENTIONS.md item 1):
1. Reference: `strided_attention_ref`, dense masked attention over the whole layout.
2. Kernels: the merge forward and backward (the attention itself: the block-sparse and axial
   kernels, unchanged).
3. `StridedSplit` (the rest's block lists, the stride and the overlap pairs; which layouts
   take this path is decided by mmsparse.attention, which builds it), `merge`, `_sum_grads`,
   `_remove_pairs`, `_remove_overlap`, the op in the shared autograd shell and the public
   `strided_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .axial_attention import axial_backward, axial_forward, line_order, token_order
from .block_sparse import BlockLists, block_sparse_attention_ref, check_block_inputs
from .block_sparse.backward import attention_backward
from .block_sparse.forward import attention_forward
from .common import check_kernel_inputs, dims, last_contiguous, padding_flags, run_attention

# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------


def strided_attention_ref(q, k, v, mask, scale=None, key_padding_mask=None):
    """Dense masked attention with the whole pattern's (N, N) mask, in float64: (out, lse)."""
    return block_sparse_attention_ref(q, k, v, mask, scale, key_padding_mask=key_padding_mask)


# ---------------------------------------------------------------------------------------------
# 2. Kernels: the merge of the two parts (the attention itself runs in the block-sparse and
#    axial kernels, unchanged)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _merge_fwd_kernel(
    OA, LSEA, OB, LSEB, Q, K, V, OUT, LSE, KPM,
    s_oa_b, s_oa_h, s_oa_n, s_ob_b, s_ob_h, s_ob_n, s_q_b, s_q_h, s_q_n, s_k_b, s_k_h, s_k_n,
    s_v_b, s_v_h, s_v_n, s_o_b, s_o_h, s_o_n, s_kpm,
    N, L, S, H, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    DIAG: tl.constexpr, HAS_KPM: tl.constexpr,
):
    """One (row block, batch x head): out, lse of A and B merged by their LSE, minus the
    diagonal pair (i, i) when DIAG. LSEA and LSE (B, H, N) token order; LSEB (B, H, L * S) in
    line order (token t = l S + r sits at r L + l)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    live_r = rows < N
    tile = live_r[:, None] & (cols[None, :] < HEAD_DIM)
    lse_a = tl.load(LSEA + bh * N + rows, mask=live_r, other=float("-inf"))
    lse_b = tl.load(LSEB + bh * (L * S) + (rows % S) * L + rows // S, mask=live_r, other=float("-inf"))
    m = tl.maximum(lse_a, lse_b)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa, wb = tl.exp(lse_a - m), tl.exp(lse_b - m)
    oa = tl.load(OA + b * s_oa_b + h * s_oa_h + rows[:, None] * s_oa_n + cols[None, :], mask=tile, other=0.0)
    ob = tl.load(OB + b * s_ob_b + h * s_ob_h + rows[:, None] * s_ob_n + cols[None, :], mask=tile, other=0.0)
    num = wa[:, None] * oa.to(tl.float32) + wb[:, None] * ob.to(tl.float32)
    z = wa + wb
    if DIAG:
        qi = tl.load(Q + b * s_q_b + h * s_q_h + rows[:, None] * s_q_n + cols[None, :], mask=tile, other=0.0)
        ki = tl.load(K + b * s_k_b + hk * s_k_h + rows[:, None] * s_k_n + cols[None, :], mask=tile, other=0.0)
        vi = tl.load(V + b * s_v_b + hk * s_v_h + rows[:, None] * s_v_n + cols[None, :], mask=tile, other=0.0)
        e = tl.exp(tl.sum(qi.to(tl.float32) * ki.to(tl.float32), 1) * scale - m)
        if HAS_KPM:  # a padding key was attended by neither part: nothing to remove
            e = tl.where(tl.load(KPM + b * s_kpm + rows, mask=live_r, other=0) != 0, 0.0, e)
        e = tl.where(live_r, e, 0.0)
        num -= e[:, None] * vi.to(tl.float32)
        z -= e
    live = z > 0
    zs = tl.where(live, z, 1.0)
    out = tl.where(live[:, None], num / zs[:, None], 0.0)
    tl.store(OUT + b * s_o_b + h * s_o_h + rows[:, None] * s_o_n + cols[None, :],
             out.to(OUT.dtype.element_ty), mask=tile)
    tl.store(LSE + bh * N + rows, tl.where(live, m + tl.log(zs), float("-inf")), mask=live_r)


@triton.jit
def _merge_bwd_kernel(
    DQA, DKA, DVA, DQB, DKB, DVB, Q, K, V, OUT, DO, LSE, DLSE, KPM, DQ, DK, DV,
    s_dqa_b, s_dqa_h, s_dqa_n, s_dka_b, s_dka_h, s_dka_n, s_dva_b, s_dva_h, s_dva_n,
    s_dqb_b, s_dqb_h, s_dqb_n, s_dkb_b, s_dkb_h, s_dkb_n, s_dvb_b, s_dvb_h, s_dvb_n,
    s_q_b, s_q_h, s_q_n, s_k_b, s_k_h, s_k_n, s_v_b, s_v_h, s_v_n, s_o_b, s_o_h, s_o_n,
    s_do_b, s_do_h, s_do_n, s_dq_b, s_dq_h, s_dq_n, s_dk_b, s_dk_h, s_dk_n, s_dv_b, s_dv_h, s_dv_n, s_kpm,
    N, HK, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    DIAG: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """One (row block, batch x key head): dq of its GROUP query heads and dk, dv = part A's +
    part B's, minus the diagonal pair's share when DIAG: dS = P (dO . v - delta + dlse),
    P = exp(s - lse), delta = rowsum(dO * out); dq -= scale dS k, dk -= scale sum_g dS q,
    dv -= sum_g P dO. LSE, DLSE (B, H, N) float32."""
    pid_m, bhk = tl.program_id(0), tl.program_id(1)
    b, hk = bhk // HK, bhk % HK
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    live_r = rows < N
    tile = live_r[:, None] & (cols[None, :] < HEAD_DIM)
    r2, c2 = rows[:, None], cols[None, :]
    dk = tl.load(DKA + b * s_dka_b + hk * s_dka_h + r2 * s_dka_n + c2, mask=tile, other=0.0).to(tl.float32)
    dk += tl.load(DKB + b * s_dkb_b + hk * s_dkb_h + r2 * s_dkb_n + c2, mask=tile, other=0.0).to(tl.float32)
    dv = tl.load(DVA + b * s_dva_b + hk * s_dva_h + r2 * s_dva_n + c2, mask=tile, other=0.0).to(tl.float32)
    dv += tl.load(DVB + b * s_dvb_b + hk * s_dvb_h + r2 * s_dvb_n + c2, mask=tile, other=0.0).to(tl.float32)
    if DIAG:
        ki = tl.load(K + b * s_k_b + hk * s_k_h + r2 * s_k_n + c2, mask=tile, other=0.0).to(tl.float32)
        vi = tl.load(V + b * s_v_b + hk * s_v_h + r2 * s_v_n + c2, mask=tile, other=0.0).to(tl.float32)
        pad = rows < 0
        if HAS_KPM:
            pad = tl.load(KPM + b * s_kpm + rows, mask=live_r, other=0) != 0
    for g in range(GROUP):
        h = hk * GROUP + g
        dq = tl.load(DQA + b * s_dqa_b + h * s_dqa_h + r2 * s_dqa_n + c2, mask=tile, other=0.0).to(tl.float32)
        dq += tl.load(DQB + b * s_dqb_b + h * s_dqb_h + r2 * s_dqb_n + c2, mask=tile, other=0.0).to(tl.float32)
        if DIAG:
            qi = tl.load(Q + b * s_q_b + h * s_q_h + r2 * s_q_n + c2, mask=tile, other=0.0).to(tl.float32)
            oi = tl.load(OUT + b * s_o_b + h * s_o_h + r2 * s_o_n + c2, mask=tile, other=0.0).to(tl.float32)
            doi = tl.load(DO + b * s_do_b + h * s_do_h + r2 * s_do_n + c2, mask=tile, other=0.0).to(tl.float32)
            lse = tl.load(LSE + (b * HK * GROUP + h) * N + rows, mask=live_r, other=float("-inf"))
            p = tl.exp(tl.sum(qi * ki, 1) * scale - tl.where(lse == float("-inf"), float("inf"), lse))
            p = tl.where(pad | ~live_r, 0.0, p)
            ds = tl.sum(doi * vi, 1) - tl.sum(doi * oi, 1)
            if HAS_DLSE:
                ds += tl.load(DLSE + (b * HK * GROUP + h) * N + rows, mask=live_r, other=0.0)
            ds = p * ds
            dq -= scale * ds[:, None] * ki
            dk -= scale * ds[:, None] * qi
            dv -= p[:, None] * doi
        tl.store(DQ + b * s_dq_b + h * s_dq_h + r2 * s_dq_n + c2, dq.to(DQ.dtype.element_ty), mask=tile)
    tl.store(DK + b * s_dk_b + hk * s_dk_h + r2 * s_dk_n + c2, dk.to(DK.dtype.element_ty), mask=tile)
    tl.store(DV + b * s_dv_b + hk * s_dv_h + r2 * s_dv_n + c2, dv.to(DV.dtype.element_ty), mask=tile)


# ---------------------------------------------------------------------------------------------
# 3. Decomposition, merge, public op
# ---------------------------------------------------------------------------------------------

@dataclass
class StridedSplit:
    """How a `rest | Strided(stride)` layout of N tokens runs: `rest` (the rest's BlockLists,
    or None when the pattern is the strided part alone), the stride, the overlap pairs (oq, ok)
    int64 (P,) that the rest also attends,
    `diag` (every token's own pair (i, i) is in the overlap: the merge kernels remove it) and
    the overlap pairs the kernels leave to PyTorch, (xq, xk): all of them when not `diag`,
    else those off the diagonal (global tokens' strided keys)."""

    rest: BlockLists | None
    stride: int
    oq: torch.Tensor
    ok: torch.Tensor
    n: int
    diag: bool = field(init=False)
    xq: torch.Tensor = field(init=False)
    xk: torch.Tensor = field(init=False)

    def __post_init__(self):  # derived from the overlap, once per layout (cached with the split)
        n_diag = int((self.oq == self.ok).sum())
        self.diag = self.rest is not None and n_diag > 0 and n_diag == self.rest.n
        if self.diag:
            off = self.oq != self.ok
            self.xq, self.xk = self.oq[off], self.ok[off]
        else:
            self.xq, self.xk = self.oq, self.ok


def _pad_lines(x: torch.Tensor, n_pad: int, value: float = 0.0) -> torch.Tensor:
    """(B, H, N, ...) padded along N to n_pad (a copy only when N < n_pad)."""
    n = x.shape[2]
    if n == n_pad:
        return x
    pad = [0, 0] * (x.dim() - 3) + [0, n_pad - n]
    return F.pad(x, pad, value=value)


def line_grid(n: int, stride: int) -> tuple[int, tuple[int, int, int]]:
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


def _rows(n: int, d_pad: int) -> int:
    return max(16, min(64, 4096 // d_pad))


def merge(out_a, lse_a, out_b, lse_b_lines, q, k, v, split, scale: float, kpm, n_pad: int):
    """Union of the two parts' results: out (B, H, N, D) in q's dtype, lse (B, H, N) float32
    (module doc). `out_b` has n_pad rows in token order, `lse_b_lines` is in line order.
    The kernel removes the diagonal (when `split.diag`); `_remove_pairs` the other overlap
    pairs. No autograd."""
    b, h, n, _ = q.shape
    d, d_pad = dims(q)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    kpm_flags, stride_kpm, has_kpm = padding_flags(kpm, q)
    rows = _rows(n, d_pad)
    _merge_fwd_kernel[(triton.cdiv(n, rows), b * h)](
        out_a, lse_a, out_b, lse_b_lines, q, k, v, out, lse, kpm_flags,
        *out_a.stride()[:3], *out_b.stride()[:3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *out.stride()[:3], stride_kpm, n, n_pad // split.stride, split.stride, h, scale,
        GROUP=h // k.shape[1], HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=rows, DIAG=split.diag, HAS_KPM=has_kpm,
    )
    if split.xq.numel():
        out, lse = _remove_pairs(out, lse, q, k, v, split.xq, split.xk, scale, kpm)
    return out, lse


def _pair_scores(q, k, pq, pk, scale: float, kpm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k of the pairs (pq, pk), (B, H, P, D) float32 each (k repeated over its query
    heads), and their scores (B, H, P) float32, -inf where the key is padding (neither part
    attended it, so there is nothing to remove)."""
    qo = q[:, :, pq].float()
    ko = k[:, :, pk].float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (qo * ko).sum(-1).mul_(scale)
    if kpm is not None:
        s.masked_fill_(kpm[:, None, pk], -math.inf)
    return qo, ko, s


def _remove_pairs(out, lse, q, k, v, pq, pk, scale: float, kpm):
    """Take the pairs (pq, pk), counted twice in (out, lse), out once, on their rows only:
    with r = e^(s - lse) summed per row to R (R <= 1/2: each pair's mass is in lse twice),
    out' = (out - sum r v) / (1 - R), lse' = lse + log(1 - R)."""
    rows, inv = torch.unique(pq, return_inverse=True)
    g = q.shape[1] // k.shape[1]
    lse_r = lse[:, :, rows]
    _, _, s = _pair_scores(q, k, pq, pk, scale, kpm)
    r = s.sub_(torch.where(torch.isfinite(lse_r), lse_r, math.inf)[:, :, inv]).exp_()  # (B, H, P)
    big_r = torch.zeros_like(lse_r).index_add_(2, inv, r)
    acc = torch.zeros(*lse_r.shape, q.shape[-1], device=q.device, dtype=torch.float32)
    acc.index_add_(2, inv, r[..., None] * v[:, :, pk].float().repeat_interleave(g, 1))
    keep = (1.0 - big_r).clamp_min(1e-30)
    out[:, :, rows] = ((out[:, :, rows].float() - acc) / keep[..., None]).to(out.dtype)
    lse[:, :, rows] = lse_r + torch.log(keep)
    return out, lse


class StridedOp:
    """Forward: both kernels' forwards and the merge. Backward: each part's backward kernels
    run with the *merged* output and LSE (P recomputed from the final LSE and delta from the
    final output is the union's gradient restricted to that part's pairs), and the overlap
    pairs, counted by both, are subtracted once. No gradient flows through the merge itself."""

    def __init__(self, split: StridedSplit):
        self.split = split

    def forward(self, q, k, v, scale, kpm):
        split = self.split
        b, _, n, _ = q.shape
        n_pad, geometry = line_grid(n, split.stride)
        out_b, lse_b = axial_forward(_pad_lines(q, n_pad), _pad_lines(k, n_pad), _pad_lines(v, n_pad), geometry,
                                     scale, key_padding=_line_padding(kpm, b, n, n_pad, q.device))
        if split.rest is None:
            out, lse = out_b[:, :, :n], token_order(lse_b, *geometry)[:, :, :n].contiguous()
        else:
            out_a, lse_a = attention_forward(q, k, v, split.rest, scale, key_padding=kpm)
            out, lse = merge(out_a, lse_a, out_b, lse_b, q, k, v, split, scale, kpm, n_pad)
        return out, lse, (q, k, v, out, lse)

    def backward(self, saved, dout, dlse, scale, kpm):
        q, k, v, out, lse = saved
        split = self.split
        b, h, n, _ = q.shape
        if dlse is not None:
            dlse = torch.where(torch.isfinite(lse), dlse.float(), 0.0)
        n_pad, geometry = line_grid(n, split.stride)
        # padded query rows: no output, no gradient, and an LSE of -inf, so their P is 0
        lse_lines = line_order(_pad_lines(lse[..., None], n_pad, -math.inf)[..., 0], *geometry)
        dq_b, dk_b, dv_b = axial_backward(
            _pad_lines(q, n_pad), _pad_lines(k, n_pad), _pad_lines(v, n_pad), _pad_lines(out, n_pad), lse_lines,
            _pad_lines(dout, n_pad), geometry, scale,
            dlse=None if dlse is None else _pad_lines(dlse[..., None], n_pad)[..., 0],
            key_padding=_line_padding(kpm, b, n, n_pad, q.device))
        if split.rest is None:
            return dq_b[:, :, :n], dk_b[:, :, :n], dv_b[:, :, :n]
        dq_a, dk_a, dv_a = attention_backward(q, k, v, out, lse, dout, split.rest, scale, dlse=dlse,
                                              key_padding=kpm)
        exact = torch.float32 if split.xq.numel() else None  # PyTorch subtracts the rest of the overlap
        dq, dk, dv = _sum_grads(dq_a, dk_a, dv_a, dq_b, dk_b, dv_b, q, k, v, out, lse, dout, dlse, split,
                                scale, kpm, exact)
        if split.xq.numel():
            _remove_overlap(dq, dk, dv, q, k, v, out, lse, dout, dlse, split.xq, split.xk, scale, kpm)
            dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        return dq, dk, dv


def _sum_grads(dq_a, dk_a, dv_a, dq_b, dk_b, dv_b, q, k, v, out, lse, dout, dlse, split, scale, kpm, dtype):
    """dq, dk, dv = part A's + part B's, minus the diagonal pairs' gradient when `split.diag`,
    in one kernel; in `dtype` (None: the inputs' dtypes)."""
    b, h, n, _ = q.shape
    hk = k.shape[1]
    d, d_pad = dims(q)
    dq = torch.empty(q.shape, device=q.device, dtype=dtype or q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=dtype or k.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=dtype or v.dtype)
    kpm_flags, stride_kpm, has_kpm = padding_flags(kpm, q)
    dout = last_contiguous(dout)
    rows = _rows(n, d_pad)
    _merge_bwd_kernel[(triton.cdiv(n, rows), b * hk)](
        dq_a, dk_a, dv_a, dq_b, dk_b, dv_b, q, k, v, out, dout, lse, lse if dlse is None else dlse, kpm_flags,
        dq, dk, dv,
        *dq_a.stride()[:3], *dk_a.stride()[:3], *dv_a.stride()[:3], *dq_b.stride()[:3], *dk_b.stride()[:3],
        *dv_b.stride()[:3], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *dout.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], stride_kpm,
        n, hk, scale,
        GROUP=h // hk, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=rows, DIAG=split.diag, HAS_KPM=has_kpm,
        HAS_DLSE=dlse is not None,
    )
    return dq, dk, dv


def _remove_overlap(dq, dk, dv, q, k, v, out, lse, dout, dlse, oq, ok, scale: float, kpm) -> None:
    """Subtract, in place (float32 dq, dk, dv), the gradient of the pairs (oq, ok), which both
    parts' backward passes counted: dS = P (dO . v - delta + dlse), P = exp(s - lse),
    delta = rowsum(dO * out)."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    g = h // hk
    lse_q = lse[:, :, oq]
    qo, ko, s = _pair_scores(q, k, oq, ok, scale, kpm)
    p = s.sub_(torch.where(torch.isfinite(lse_q), lse_q, math.inf)).exp_()
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


def strided_attention(q, k, v, split: StridedSplit, scale: float | None = None, key_padding_mask=None):
    """Attention over a `rest | Strided(s)` pattern: rest block-sparse, strided lines axial,
    merged by LSE (module doc). `split` comes from mmsparse.attention (it decides which
    layouts take this path); arguments and results otherwise as `block_sparse_attention`'s.

    Raises:
        ValueError: on bad inputs, or a split built for another N.
    """
    if not isinstance(split, StridedSplit):
        raise ValueError(f"strided_attention: split must be a StridedSplit, got {type(split).__name__}")
    if split.rest is not None:
        check_block_inputs(q, k, v, split.rest, "strided_attention", key_padding_mask)
    else:
        check_kernel_inputs(q, k, v, "strided_attention", key_padding_mask)
    if q.shape[2] != split.n:
        raise ValueError(f"q has N={q.shape[2]} tokens but the layout was built for N={split.n}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return run_attention(StridedOp(split), q, k, v, scale, key_padding_mask)


__all__ = ["StridedOp", "StridedSplit", "strided_attention", "strided_attention_ref"]
