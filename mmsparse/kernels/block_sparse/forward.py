"""The block-sparse forward: per (query tile, batch x head) an online softmax over the layout's
key blocks, full blocks first (no mask arithmetic), then partial blocks (a mask tile or the
mask program in registers). Writes out and the natural-log LSE. WARP_SPECIALIZE (launches
without partial blocks or key padding, `launch.warp_specialize`) marks the full-block loop for
Triton's automatic warp specialisation and loads the query tile by descriptor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LOG2E, dims, dot_prec, last_contiguous, padding_flags
from ..options import kernel_options
from .launch import descriptor, launch_items, scratch, use_tma, warp_specialize
from .steps import finish_rows, fwd_inner, load_desc, partial_range, partial_step, tile_start, work_item
from .tiles import maybe_tune, tile_config, ws_config
from .worklist import kernel_program, skip_empty, tile_args

@triton.jit
def _fwd_kernel(
    Q, K, V, QD, KD, VD, O, LSE, ATTR, TAB, MT, KPM, ITEMS, q_full_idx, q_part_idx, SUB_ENTRIES, SUB_RANGES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_lse,
    stride_attr, stride_kpm, N, H, qk_scale,
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
    SUB_N: tl.constexpr = LAYOUT_BK // BLOCK_N  # kernel tiles per layout key block
    qb, full_lo, full_hi, part_lo, part_hi, offs_m, offs_out = work_item(
        ITEMS, pid_m, LAYOUT_BQ, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    K_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    KPM_base = KPM + b.to(tl.int64) * stride_kpm
    if WARP_SPECIALIZE:  # Triton's Hopper pass fails unless every dot operand comes by descriptor
        q = load_desc(QD, b, h, tile_start(qb, pid_m, LAYOUT_BQ, BLOCK_M), BLOCK_M, D_PAD)
    else:
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn
                    + offs_d[None, :], mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # 1. full key blocks: no mask arithmetic
    for i in tl.range(full_lo * SUB_N, full_hi * SUB_N, warp_specialize=WARP_SPECIALIZE):
        kb = tl.load(q_full_idx + i // SUB_N)
        start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
        acc, l_i, m_i = fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, 1, offs_m, start_n, N,
                                   qk_scale, stride_kn, stride_vn, ATTR, stride_attr, TAB, MT, 0, offs_m, 0,
                                   KD, VD, b, hk, HEAD_DIM, D_PAD, BLOCK_N, False, EVEN_N, PROGRAM, DOT_PREC,
                                   HAS_KPM, MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    # 2. partial key blocks: the mask from the block's tile or the program in registers
    if HAS_PARTIAL:
        rows_in = offs_m - qb * LAYOUT_BQ
        lo, hi = partial_range(SUB_RANGES, pid_m, part_lo * SUB_N, part_hi * SUB_N, SKIP_EMPTY)
        for e in range(lo, hi):
            i = partial_step(SUB_ENTRIES, e, SKIP_EMPTY)
            kb = tl.load(q_part_idx + i // SUB_N)
            start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
            acc, l_i, m_i = fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, 1, offs_m, start_n, N,
                                       qk_scale, stride_kn, stride_vn, ATTR, stride_attr, TAB,
                                       MT, i // SUB_N, rows_in, (i % SUB_N) * BLOCK_N, KD, VD, b, hk,
                                       HEAD_DIM, D_PAD, BLOCK_N, True, EVEN_N, PROGRAM, DOT_PREC, HAS_KPM,
                                       MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)

    # 3. normalise; rows that attended nothing give 0 and LSE -inf
    acc, lse = finish_rows(acc, l_i, m_i)
    # rows of O: the query rows, or a chunk's rows of the scratch buffers (split rows)
    O_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = O_base + offs_out[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + pid_bh.to(tl.int64) * stride_lse + offs_out, lse, mask=offs_m < N)



def attention_forward(q, k, v, layout, scale, out=None, lse=None, key_padding=None):
    """q (B, H, N, D), k / v (B, Hk, N, D) -> out (B, H, N, D) q.dtype, lse (B, H, N) float32.
    key_padding (B, N) bool: True where a key is padding (never attended)."""
    q, k, v = last_contiguous(q), last_contiguous(k), last_contiguous(v)
    b, h, n, _ = q.shape
    hk = k.shape[1]
    d, d_pad = dims(q)
    opts = kernel_options()  # read once a call
    kp = kernel_program(layout, q.device, opts)
    rows = kp.rows
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32) if lse is None else lse
    kpm, stride_kpm, has_kpm = padding_flags(key_padding, q)
    split = None
    if rows.n_split:
        split = (scratch(q, rows, layout.block_q), scratch(lse, rows, layout.block_q, float("-inf")))

    mt, _, mask_tiles = tile_args(kp, opts)
    masked = kp.has_partial or has_kpm  # no warp specialisation (launch.warp_specialize)
    desc = {}

    def args(items, outs, sub):
        o, l = outs
        return (q, k, v, desc.get("q", q), desc.get("k", k), desc.get("v", v), o, l, kp.attrs, kp.tab, mt, kpm, items, kp.lists["q_full_idx"], kp.lists["q_part_idx"], *sub,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                o.stride(0), o.stride(1), o.stride(2), l.stride(1),
                kp.attrs.stride(0), stride_kpm, n, h, scale * LOG2E)

    skip = skip_empty(mask_tiles, opts)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        tma = use_tma(k, v, bn, d_pad, opts)
        ws = warp_specialize(tma, masked, (q,), opts)
        if ws:
            bm, bn, warps, stages = ws_config("fwd", d_pad, cfg)
        desc.clear()
        if tma:
            desc["k"], desc["v"] = descriptor(k, bn, d_pad), descriptor(v, bn, d_pad)
        if ws:
            desc["q"] = descriptor(q, bm, d_pad)
        launch_items(_fwd_kernel, rows, bm, layout.block_q, b * h, args, (out, lse), split,
                      kp.sub_lists("q", bm, bn) if skip else None,
                      GROUP=h // hk, HEAD_DIM=d, D_PAD=d_pad,
                      LAYOUT_BQ=layout.block_q, LAYOUT_BK=layout.block_k, BLOCK_M=bm, BLOCK_N=bn,
                      PROGRAM=kp.program, HAS_PARTIAL=kp.has_partial, EVEN_N=n % layout.block_k == 0,
                      DOT_PREC=dot_prec(q.dtype), HAS_KPM=has_kpm, MASK_TILES=mask_tiles,
                      SKIP_EMPTY=skip, TMA=tma, WARP_SPECIALIZE=ws, num_warps=warps, num_stages=stages)

    maybe_tune("fwd", d_pad, q, layout, launch, opts)
    launch(tile_config("fwd", d_pad, q, layout, opts))
    if split is not None:  # merge the chunks of each long row by their LSE
        rows.combine(split[0], layout.block_q, out, split[1], lse)
    return out, lse

