"""Axial attention over strided addresses: Triton forward and backward kernels.

Legend: B batch, H query heads, Hk key/value heads (GQA: H = Hk * G), N tokens, D head dim,
Dp = D padded to a power of two (>= 16).

Axial attention (a token attends the tokens that share all its coordinates except those of
the attended axes) on a raster-ordered grid is dense attention within each *line*: the L =
prod(grid[a0..a1]) tokens with equal outer and inner coordinates, which sit at the token
positions base + j * INNER (INNER = prod(grid[a1 + 1:])). Through the block-sparse kernels a
time axis costs a block per (query block, key block) pair at ~1 % utilization (every token of a
128-block lies on a different line), and the usual alternative, SDPA on the batch of lines,
pays for a permuted copy of q, k, v, o and their gradients. These kernels read the lines in
place: one program per (line, query tile) in the forward and dQ passes and per (line, key
tile) in the dK / dV pass, with the line's stride in the pointer arithmetic. The inner steps
(online softmax, P recomputed from the LSE) are the block-sparse kernels' own, unmasked.

Layers (CONVENTIONS.md item 1):
1. `axial_attention_ref`: the permuted batch through dense PyTorch attention.
2. `_axial_fwd_kernel`, `_axial_dq_kernel`, `_axial_dkdv_kernel` (and the shared
   `bwd_preprocess` for delta = rowsum(dO O)). LSE and delta are kept in line order
   (B, H, lines, L) inside, token order (B, H, N) outside.
3. Launchers, the op in the shared autograd shell and the public `axial_attention`
   (mmsparse.attention recognises a layout that is exactly axial and passes its geometry).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .block_sparse.steps import (
    bwd_preprocess, dkdv_inner, dq_inner, finish_rows, fwd_inner, is_padding, load_kv_tile, load_lse2,
)
from .common import (
    LOG2E, MAX_HEAD_DIM, check_kernel_inputs, dims, dot_prec, last_contiguous, padding_flags, run_attention,
    tensor_unsupported_reason,
)

# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------


def lines_view(x: torch.Tensor, outer: int, length: int, inner: int) -> torch.Tensor:
    """(B, H, N, ...) -> (B, H, outer * inner, L, ...): the lines as a batch (a copy)."""
    b, h = x.shape[:2]
    rest = x.shape[3:]
    y = x.reshape(b, h, outer, length, inner, *rest).transpose(3, 4)
    return y.reshape(b, h, outer * inner, length, *rest)


def tokens_view(y: torch.Tensor, outer: int, length: int, inner: int) -> torch.Tensor:
    """Inverse of `lines_view`."""
    b, h = y.shape[:2]
    rest = y.shape[4:]
    x = y.reshape(b, h, outer, inner, length, *rest).transpose(3, 4)
    return x.reshape(b, h, outer * length * inner, *rest)


def axial_attention_ref(q, k, v, geometry: tuple[int, int, int], scale=None, key_padding_mask=None):
    """Dense attention within each line, in float64 on the permuted batch: (out, lse); padding
    keys (key_padding_mask (B, N) True) never attend, a line of padding only gives 0 / -inf."""
    outer, length, inner = geometry
    g = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ql, kl, vl = (lines_view(t.double(), outer, length, inner) for t in (q, k, v))
    kl, vl = kl.repeat_interleave(g, 1), vl.repeat_interleave(g, 1)
    s = ql @ kl.transpose(-1, -2) * scale
    if key_padding_mask is not None:
        pad = lines_view(key_padding_mask.to(q.device)[:, None], outer, length, inner)  # (B, 1, lines, L)
        s = s.masked_fill(pad[:, :, :, None, :], -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = p @ vl
    return (tokens_view(out, outer, length, inner).to(q.dtype),
            tokens_view(lse.unsqueeze(-1), outer, length, inner).squeeze(-1).float())


# ---------------------------------------------------------------------------------------------
# 2. Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _line_of(pid, L, INNER, BLOCK: tl.constexpr):
    """Program -> (line, first token of the line, offsets of this tile along the line)."""
    tiles = tl.cdiv(L, BLOCK)
    line = pid // tiles
    base = (line // INNER) * (L * INNER) + line % INNER
    return line, base.to(tl.int64), (pid % tiles) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _line_start(X, b, h, base, stride_b, stride_h, stride_n):
    """Pointer to the first token of this line in X[b, h]."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + base * stride_n


@triton.jit
def _line_tile(X_line, offs, INNER, stride_n, offs_d):
    """Pointers (len(offs), D_PAD) of the line's tokens `offs` (INNER tokens apart)."""
    return X_line + offs[:, None] * (INNER * stride_n) + offs_d[None, :]


@triton.jit
def _axial_fwd_kernel(
    Q, K, V, O, LSE, KPM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_kpm, N, L, INNER, H, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_L: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    line, base, offs_m = _line_of(tl.program_id(0), L, INNER, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(_line_tile(_line_start(Q, b, h, base, stride_qb, stride_qh, stride_qn), offs_m, INNER, stride_qn,
                           offs_d), mask=row_mask, other=0.0)
    K_base = _line_start(K, b, hk, base, stride_kb, stride_kh, stride_kn)
    V_base = _line_start(V, b, hk, base, stride_vb, stride_vh, stride_vn)
    KPM_base = KPM + b.to(tl.int64) * stride_kpm + base
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        acc, l_i, m_i = fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, INNER, offs_m, start_n, L,
                                   qk_scale, INNER * stride_kn, INNER * stride_vn, Q, 0, Q, Q, 0, offs_m, 0,
                                   Q, Q, 0, 0, HEAD_DIM, D_PAD, BLOCK_N, False, EVEN_L, (), DOT_PREC, HAS_KPM,
                                   False, BLOCK_M, BLOCK_N, False)
    acc, lse = finish_rows(acc, l_i, m_i)  # a line of padding keys only attends nothing: 0, -inf
    tl.store(_line_tile(_line_start(O, b, h, base, stride_ob, stride_oh, stride_on), offs_m, INNER, stride_on, offs_d),
             acc.to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * N + line * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _axial_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_kpm, N, L, INNER, H, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_L: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    line, base, offs_m = _line_of(tl.program_id(0), L, INNER, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(_line_tile(_line_start(Q, b, h, base, stride_qb, stride_qh, stride_qn), offs_m, INNER, stride_qn,
                           offs_d), mask=row_mask, other=0.0)
    do = tl.load(_line_tile(_line_start(DO, b, h, base, stride_dob, stride_doh, stride_don), offs_m, INNER,
                            stride_don, offs_d), mask=row_mask, other=0.0)
    stat = pid_bh.to(tl.int64) * N + line * L
    lse2 = load_lse2(LSE + stat, offs_m, L)
    delta = tl.load(DELTA + stat + offs_m, mask=offs_m < L, other=0.0)
    K_base = _line_start(K, b, hk, base, stride_kb, stride_kh, stride_kn)
    V_base = _line_start(V, b, hk, base, stride_vb, stride_vh, stride_vn)
    KPM_base = KPM + b.to(tl.int64) * stride_kpm + base
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        dq = dq_inner(dq, q, do, lse2, delta, K_base, V_base, KPM_base, INNER, offs_m, start_n, L, qk_scale,
                       INNER * stride_kn, INNER * stride_vn, Q, 0, Q, Q, 0, offs_m, 0, Q, Q, 0, 0,
                       HEAD_DIM, D_PAD, BLOCK_N, False, EVEN_L, (), DOT_PREC, HAS_KPM,
                       False, BLOCK_M, BLOCK_N, False)
    tl.store(_line_tile(_line_start(DQ, b, h, base, stride_dqb, stride_dqh, stride_dqn), offs_m, INNER, stride_dqn,
                        offs_d), (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _axial_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_kpm, N, L, INNER, HK, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_L: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_KPM: tl.constexpr,
):
    pid_bhk = tl.program_id(1)
    b = pid_bhk // HK
    hk = pid_bhk % HK
    line, base, offs_n = _line_of(tl.program_id(0), L, INNER, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    col_mask = (offs_n[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    k, v = load_kv_tile(_line_start(K, b, hk, base, stride_kb, stride_kh, stride_kn),
                         _line_start(V, b, hk, base, stride_vb, stride_vh, stride_vn),
                         offs_n, L, INNER * stride_kn, INNER * stride_vn, HEAD_DIM, D_PAD, False)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for r in range(GROUP):  # the query heads of this key head, in order: no atomics
        h = hk * GROUP + r
        bh = b * (HK * GROUP) + h
        Q_base = _line_start(Q, b, h, base, stride_qb, stride_qh, stride_qn)
        DO_base = _line_start(DO, b, h, base, stride_dob, stride_doh, stride_don)
        stat = bh.to(tl.int64) * N + line * L
        for start_m in range(0, L, BLOCK_M):
            dk, dv = dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE + stat, DELTA + stat, offs_n, start_m,
                                 L, qk_scale, INNER * stride_qn, INNER * stride_don, Q, 0, Q, Q, 0, 0, offs_n,
                                 Q, Q, 0, 0, HEAD_DIM, D_PAD, BLOCK_M, False, (), DOT_PREC, False, BLOCK_M,
                                 BLOCK_N, False)
    if HAS_KPM:  # padding keys are attended by no query: zero gradients
        pad = is_padding(KPM + b.to(tl.int64) * stride_kpm + base, INNER, offs_n, L)[:, None]
        dk = tl.where(pad, 0.0, dk)
        dv = tl.where(pad, 0.0, dv)
    tl.store(_line_tile(_line_start(DK, b, hk, base, stride_dkb, stride_dkh, stride_dkn), offs_n, INNER, stride_dkn,
                        offs_d), (dk * sm_scale).to(DK.dtype.element_ty), mask=col_mask)
    tl.store(_line_tile(_line_start(DV, b, hk, base, stride_dvb, stride_dvh, stride_dvn), offs_n, INNER, stride_dvn,
                        offs_d), dv.to(DV.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# 3. Launchers
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages): tiles no longer than the line (rounded up to a
# power of two, at least 16) and at most 64 x 64: a line of 32 (a time axis) runs as one tile.
# 16-bit inputs up to D_PAD 64: three stages, and dK / dV steps of 32 queries; on the strided
# lines of the A5 Sparse Transformer preset (512-token lines, D = 64, H200) that took fwd+bwd
# 3.71 -> 3.57 ms and the forward 0.92 -> 0.88 ms (results/logs/sweep-axial-in-strided-a5-h200-
# 2026-12-04.log, bench/NOTES.md of 2026-12-04). At D_PAD 128 the same rule timed A4's T and H
# lines slower (1.01 / 0.93 ms against 0.93 / 0.80 in an earlier, not same-run, measurement) and W faster
# (0.88 against 1.03): not adopted there without a same-run A/B.
FORCED: dict = {}  # tests: kernel name -> config


def _config(kernel: str, length: int, d_pad: int, dtype):
    if kernel in FORCED:
        return FORCED[kernel]
    small = dtype == torch.float32 or d_pad > 128
    t = min(32 if small else 64, max(16, triton.next_power_of_2(length)))
    if small or d_pad > 64:
        return t, t, 4, 2
    return (min(32, t) if kernel == "dkdv" else t), t, 4, 3


def line_order(x: torch.Tensor, outer: int, length: int, inner: int) -> torch.Tensor:
    """(B, H, N) token order -> (B, H, N) line order, contiguous."""
    return lines_view(x.unsqueeze(-1), outer, length, inner).reshape(x.shape).contiguous()


def token_order(x: torch.Tensor, outer: int, length: int, inner: int) -> torch.Tensor:
    b, h, n = x.shape
    return tokens_view(x.reshape(b, h, outer * inner, length, 1), outer, length, inner).reshape(b, h, n)


def axial_forward(q, k, v, geometry, scale, out=None, key_padding=None):
    """-> out (B, H, N, D) and the LSE (B, H, N) float32 in line order."""
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    outer, length, inner = geometry
    b, h, n, _ = q.shape
    d, d_pad = dims(q)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    kpm, stride_kpm, has_kpm = padding_flags(key_padding, q)
    bm, bn, warps, stages = _config("fwd", length, d_pad, q.dtype)
    _axial_fwd_kernel[(outer * inner * triton.cdiv(length, bm), b * h)](
        q, k, v, out, lse, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        stride_kpm, n, length, inner, h, scale * LOG2E,
        GROUP=h // k.shape[1], HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, EVEN_L=length % bn == 0,
        DOT_PREC=dot_prec(q.dtype), HAS_KPM=has_kpm, num_warps=warps, num_stages=stages,
    )
    return out, lse


def axial_backward(q, k, v, out, lse_lines, dout, geometry, scale, dlse=None, dq=None, dk=None, dv=None,
              key_padding=None):
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    out, dout = last_contiguous(out), last_contiguous(dout)
    outer, length, inner = geometry
    b, h, n, _ = q.shape
    hk = k.shape[1]
    d, d_pad = dims(q)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    bwd_preprocess[(triton.cdiv(n, 64), b * h)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], n, h, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=64,
    )
    if dlse is not None:  # d lse / d s = P: dlse shifts delta (as in the block-sparse backward)
        delta -= dlse.float()
    delta = line_order(delta, outer, length, inner)
    kpm, stride_kpm, has_kpm = padding_flags(key_padding, q)
    common = dict(GROUP=h // hk, HEAD_DIM=d, D_PAD=d_pad, DOT_PREC=dot_prec(q.dtype), HAS_KPM=has_kpm)
    bm, bn, warps, stages = _config("dq", length, d_pad, q.dtype)
    _axial_dq_kernel[(outer * inner * triton.cdiv(length, bm), b * h)](
        q, k, v, dout, dq, lse_lines, delta, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *dout.stride()[:3], *dq.stride()[:3], stride_kpm, n, length, inner, h, scale * LOG2E, scale,
        BLOCK_M=bm, BLOCK_N=bn, EVEN_L=length % bn == 0, num_warps=warps, num_stages=stages, **common,
    )
    bm, bn, warps, stages = _config("dkdv", length, d_pad, q.dtype)
    _axial_dkdv_kernel[(outer * inner * triton.cdiv(length, bn), b * hk)](
        q, k, v, dout, dk, dv, lse_lines, delta, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *dout.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], stride_kpm, n, length, inner, hk,
        scale * LOG2E, scale,
        BLOCK_M=bm, BLOCK_N=bn, EVEN_L=length % bn == 0, num_warps=warps, num_stages=stages, **common,
    )
    return dq, dk, dv


class AxialOp:
    """The axial kernels as an op of the shared autograd shell: the LSE is kept in line order
    inside (saved for the backward), returned in token order."""

    def __init__(self, geometry: tuple[int, int, int]):
        self.geometry = geometry

    def forward(self, q, k, v, scale, key_padding):
        out, lse_lines = axial_forward(q, k, v, self.geometry, scale, key_padding=key_padding)
        return out, token_order(lse_lines, *self.geometry), (q, k, v, out, lse_lines)

    def backward(self, saved, dout, dlse, scale, key_padding):
        q, k, v, out, lse_lines = saved
        if dlse is not None:
            dlse = torch.where(torch.isfinite(token_order(lse_lines, *self.geometry)), dlse, 0.0)
        return axial_backward(q, k, v, out, lse_lines, dout, self.geometry, scale, dlse=dlse, key_padding=key_padding)


def axial_attention(q, k, v, geometry: tuple[int, int, int], scale: float | None = None, key_padding_mask=None):
    """Dense attention within the lines of a raster-ordered grid, read in place.

    Args:
        q: (B, H, N, D); k, v: (B, Hk, N, D), H a multiple of Hk; float16, bfloat16 or float32,
            D <= 256; CUDA tensors (or CPU under TRITON_INTERPRET=1).
        geometry: (outer, L, inner) with N = outer * L * inner: token i lies on line
            (i // (L * inner), i % inner) at position (i // inner) % L. For a grid (T, H, W),
            axis 0 (time) is (1, T, H * W), axis 2 (width) (T * H, W, 1), axes (1, 2) (T, H * W, 1).
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: (B, N) bool, True where a key is padding (never attended).

    Returns:
        out (B, H, N, D) in q's dtype and lse (B, H, N) float32 (-inf on a line of padding
        only), both differentiable.
    """
    check_kernel_inputs(q, k, v, "axial_attention", key_padding_mask)
    outer, length, inner = (int(x) for x in geometry)
    if min(outer, length, inner) < 1 or outer * length * inner != q.shape[2]:
        raise ValueError(f"geometry (outer, L, inner) = {tuple(geometry)} must be positive with product "
                         f"N = {q.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return run_attention(AxialOp((outer, length, inner)), q, k, v, scale, key_padding_mask)


def unsupported_reason(q) -> str | None:
    """Why these kernels cannot run q (None when they can): the block-sparse kernels' rules on q."""
    return tensor_unsupported_reason(q)


__all__ = ["AxialOp", "axial_attention", "axial_attention_ref", "axial_backward", "axial_forward", "line_order",
           "token_order", "unsupported_reason", "MAX_HEAD_DIM"]
