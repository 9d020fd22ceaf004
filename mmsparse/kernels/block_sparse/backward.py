"""The block-sparse backward: delta = rowsum(dO * O), then dQ per query tile over the same key
lists and dK / dV per key tile over the transposed lists and the G query heads of its key head,
P recomputed from the LSE. No atomics: the gradients are deterministic. WARP_SPECIALIZE
(launches without partial blocks or key padding, `launch.warp_specialize`) marks the full-block
loops (dQ over key tiles, dK / dV over query tiles) for Triton's automatic warp specialisation
and loads the program's own tiles (q and dO, k and v) by descriptor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LOG2E, dims, dot_prec, last_contiguous, padding_flags
from ..options import kernel_options
from .launch import descriptor, launch_items, scratch, tma_backward, use_tma, warp_specialize
from .steps import (
    bwd_preprocess, dkdv_inner, dq_inner, is_padding, load_desc, load_kv_desc, load_kv_tile, load_lse2, partial_range,
    partial_step, tile_start, work_item,
)
from .tiles import maybe_tune, tile_config, ws_config
from .worklist import kernel_program, skip_empty, tile_args

@triton.jit
def _bwd_dq_kernel(
    Q, K, V, KD, VD, DO, QD, DOD, DQ, LSE, DELTA, ATTR, TAB, MT, KPM, ITEMS, q_full_idx, q_part_idx, SUB_ENTRIES, SUB_RANGES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_attr, stride_kpm, N, H, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PROGRAM: tl.constexpr, HAS_PARTIAL: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_KPM: tl.constexpr, MASK_TILES: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    SUB_N: tl.constexpr = LAYOUT_BK // BLOCK_N
    qb, full_lo, full_hi, part_lo, part_hi, offs_m, offs_out = work_item(
        ITEMS, pid_m, LAYOUT_BQ, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    if WARP_SPECIALIZE:  # Triton's Hopper pass fails unless every dot operand comes by descriptor
        start_m = tile_start(qb, pid_m, LAYOUT_BQ, BLOCK_M)
        q, do = load_desc(QD, b, h, start_m, BLOCK_M, D_PAD), load_desc(DOD, b, h, start_m, BLOCK_M, D_PAD)
    else:
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                     + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = load_lse2(LSE + pid_bh.to(tl.int64) * N, offs_m, N)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    K_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    KPM_base = KPM + b.to(tl.int64) * stride_kpm
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for i in tl.range(full_lo * SUB_N, full_hi * SUB_N, warp_specialize=WARP_SPECIALIZE):
        kb = tl.load(q_full_idx + i // SUB_N)
        start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
        dq = dq_inner(dq, q, do, lse2, delta, K_base, V_base, KPM_base, 1, offs_m, start_n, N, qk_scale,
                       stride_kn, stride_vn, ATTR, stride_attr, TAB, MT, 0, offs_m, 0, KD, VD, b, hk,
                       HEAD_DIM, D_PAD, BLOCK_N, False, EVEN_N, PROGRAM, DOT_PREC, HAS_KPM,
                       MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    if HAS_PARTIAL:
        rows_in = offs_m - qb * LAYOUT_BQ
        lo, hi = partial_range(SUB_RANGES, pid_m, part_lo * SUB_N, part_hi * SUB_N, SKIP_EMPTY)
        for e in range(lo, hi):
            i = partial_step(SUB_ENTRIES, e, SKIP_EMPTY)
            kb = tl.load(q_part_idx + i // SUB_N)
            start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
            dq = dq_inner(dq, q, do, lse2, delta, K_base, V_base, KPM_base, 1, offs_m, start_n, N, qk_scale,
                           stride_kn, stride_vn, ATTR, stride_attr, TAB,
                           MT, i // SUB_N, rows_in, (i % SUB_N) * BLOCK_N, KD, VD, b, hk,
                           HEAD_DIM, D_PAD, BLOCK_N, True, EVEN_N, PROGRAM, DOT_PREC, HAS_KPM,
                           MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_out[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_mask)



@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, QD, DOD, KD, VD, DK, DV, LSE, DELTA, ATTR, TAB, MT, k_part_ord, KPM, ITEMS, k_full_idx, k_part_idx,
    SUB_ENTRIES, SUB_RANGES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_attr, stride_kpm, N, HK, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PROGRAM: tl.constexpr, HAS_PARTIAL: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_KPM: tl.constexpr, MASK_TILES: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = pid_bhk // HK
    hk = pid_bhk % HK
    SUB_M: tl.constexpr = LAYOUT_BQ // BLOCK_M
    kb, full_lo, full_hi, part_lo, part_hi, offs_n, offs_out = work_item(
        ITEMS, pid_n, LAYOUT_BK, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    col_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    if WARP_SPECIALIZE:  # as in dQ: the key tile by descriptor too
        k, v = load_kv_desc(KD, VD, b, hk, tile_start(kb, pid_n, LAYOUT_BK, BLOCK_N), BLOCK_N, D_PAD)
    else:
        k, v = load_kv_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh,
                             V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh,
                             offs_n, N, stride_kn, stride_vn, HEAD_DIM, D_PAD, False)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    # every query head of this key head, in a fixed order (deterministic, no atomics)
    for r in range(GROUP):
        h = hk * GROUP + r
        bh = b * (HK * GROUP) + h
        Q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DO_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSE_base = LSE + bh.to(tl.int64) * N
        DELTA_base = DELTA + bh.to(tl.int64) * N
        for i in tl.range(full_lo * SUB_M, full_hi * SUB_M, warp_specialize=WARP_SPECIALIZE):
            qb = tl.load(k_full_idx + i // SUB_M)
            start_m = qb * LAYOUT_BQ + (i % SUB_M) * BLOCK_M
            dk, dv = dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, offs_n, start_m,
                                 N, qk_scale, stride_qn, stride_don, ATTR, stride_attr, TAB, MT, 0, 0, offs_n,
                                 QD, DOD, b, h, HEAD_DIM, D_PAD, BLOCK_M, False, PROGRAM, DOT_PREC,
                                 MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
        if HAS_PARTIAL:
            cols_in = offs_n - kb * LAYOUT_BK
            lo, hi = partial_range(SUB_RANGES, pid_n, part_lo * SUB_M, part_hi * SUB_M, SKIP_EMPTY)
            for e in range(lo, hi):
                i = partial_step(SUB_ENTRIES, e, SKIP_EMPTY)
                qb = tl.load(k_part_idx + i // SUB_M)
                start_m = qb * LAYOUT_BQ + (i % SUB_M) * BLOCK_M
                ordinal = 0
                if MASK_TILES:  # the block's position in the row-ordered partial list
                    ordinal = tl.load(k_part_ord + i // SUB_M)
                dk, dv = dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, offs_n, start_m,
                                     N, qk_scale, stride_qn, stride_don, ATTR, stride_attr, TAB,
                                     MT, ordinal, (i % SUB_M) * BLOCK_M, cols_in, QD, DOD, b, h,
                                     HEAD_DIM, D_PAD, BLOCK_M, True, PROGRAM, DOT_PREC,
                                     MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    dk = dk * sm_scale
    if HAS_KPM:  # a padding key is attended by no query: its gradients are exactly zero
        pad = is_padding(KPM + b.to(tl.int64) * stride_kpm, 1, offs_n, N)[:, None]
        dk = tl.where(pad, 0.0, dk)
        dv = tl.where(pad, 0.0, dv)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_out[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_out[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_mask)



def attention_backward(q, k, v, out, lse, dout, layout, scale, dq=None, dk=None, dv=None, dlse=None,
                        key_padding=None):
    """Gradients of (out, lse) = attention(q, k, v) given dout (and dlse (B, H, N) or None):
    dq (like q), dk, dv (like k, v)."""
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    out, dout = last_contiguous(out), last_contiguous(dout)
    b, h, n, _ = q.shape
    hk = k.shape[1]
    d, d_pad = dims(q)
    opts = kernel_options()  # read once a call
    kp = kernel_program(layout, q.device, opts)
    rows, cols = kp.rows, kp.cols
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv

    # delta = rowsum(dO * O)
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    pre_m = 64
    bwd_preprocess[(triton.cdiv(n, pre_m), b * h)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), n, h,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=pre_m,
    )
    if dlse is not None:
        # d lse_i / d s_ij = P_ij, so dS = P * (dP - delta + dlse): dlse shifts delta
        delta -= torch.where(torch.isfinite(lse), dlse.float(), 0.0)
    kpm, stride_kpm, has_kpm = padding_flags(key_padding, q)
    mt, k_part_ord, mask_tiles = tile_args(kp, opts)
    masked = kp.has_partial or has_kpm  # no warp specialisation (launch.warp_specialize)
    skip = skip_empty(mask_tiles, opts)
    common = dict(GROUP=h // hk, HEAD_DIM=d, D_PAD=d_pad, LAYOUT_BQ=layout.block_q,
                  LAYOUT_BK=layout.block_k, PROGRAM=kp.program, HAS_PARTIAL=kp.has_partial,
                  DOT_PREC=dot_prec(q.dtype), HAS_KPM=has_kpm, MASK_TILES=mask_tiles, SKIP_EMPTY=skip)
    dq_split = scratch(q, rows, layout.block_q) if rows.n_split else None
    dkdv_split = (scratch(k, cols, layout.block_k), scratch(v, cols, layout.block_k)) if cols.n_split else None

    desc = {}

    def dq_args(items, g, sub):
        return (q, k, v, desc.get("k", k), desc.get("v", v), dout, desc.get("q", q), desc.get("do", dout), g, lse, delta, kp.attrs, kp.tab, mt, kpm, items, kp.lists["q_full_idx"],
                kp.lists["q_part_idx"], *sub,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                g.stride(0), g.stride(1), g.stride(2),
                kp.attrs.stride(0), stride_kpm, n, h, scale * LOG2E, scale)

    def dkdv_args(items, g, sub):
        gk, gv = g
        return (q, k, v, dout, desc.get("q", q), desc.get("do", dout), desc.get("k", k), desc.get("v", v), gk, gv,
                lse, delta, kp.attrs, kp.tab, mt, k_part_ord, kpm, items,
                kp.lists["k_full_idx"], kp.lists["k_part_idx"], *sub,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                gk.stride(0), gk.stride(1), gk.stride(2),
                gv.stride(0), gv.stride(1), gv.stride(2),
                kp.attrs.stride(0), stride_kpm, n, hk, scale * LOG2E, scale)

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        tma = use_tma(k, v, bn, d_pad, opts) and tma_backward(opts)
        ws = warp_specialize(tma, masked, (q, dout), opts)
        if ws:
            bm, bn, warps, stages = ws_config("dq", d_pad, cfg)
        desc.clear()
        if tma:
            desc["k"], desc["v"] = descriptor(k, bn, d_pad), descriptor(v, bn, d_pad)
        if ws:
            desc["q"], desc["do"] = descriptor(q, bm, d_pad), descriptor(dout, bm, d_pad)
        launch_items(_bwd_dq_kernel, rows, bm, layout.block_q, b * h, dq_args, dq, dq_split,
                      kp.sub_lists("q", bm, bn) if skip else None,
                      BLOCK_M=bm, BLOCK_N=bn, EVEN_N=n % layout.block_k == 0, TMA=tma, WARP_SPECIALIZE=ws,
                      num_warps=warps, num_stages=stages, **common)

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        tma = use_tma(q, dout, bm, d_pad, opts) and tma_backward(opts)
        ws = warp_specialize(tma, masked, (k, v), opts)
        if ws:
            bm, bn, warps, stages = ws_config("dkdv", d_pad, cfg)
        desc.clear()
        if tma:
            desc["q"], desc["do"] = descriptor(q, bm, d_pad), descriptor(dout, bm, d_pad)
        if ws:
            desc["k"], desc["v"] = descriptor(k, bn, d_pad), descriptor(v, bn, d_pad)
        launch_items(_bwd_dkdv_kernel, cols, bn, layout.block_k, b * hk, dkdv_args, (dk, dv), dkdv_split,
                      kp.sub_lists("k", bm, bn) if skip else None,
                      BLOCK_M=bm, BLOCK_N=bn, TMA=tma, WARP_SPECIALIZE=ws, num_warps=warps, num_stages=stages,
                      **common)

    maybe_tune("dq", d_pad, q, layout, launch_dq, opts)
    launch_dq(tile_config("dq", d_pad, q, layout, opts))
    maybe_tune("dkdv", d_pad, q, layout, launch_dkdv, opts)
    launch_dkdv(tile_config("dkdv", d_pad, q, layout, opts))
    if dq_split is not None:  # the chunks' partial gradients, summed in a fixed order
        rows.combine(dq_split, layout.block_q, dq)
    if dkdv_split is not None:
        cols.combine(dkdv_split[0], layout.block_k, dk)
        cols.combine(dkdv_split[1], layout.block_k, dv)
    return dq, dk, dv

