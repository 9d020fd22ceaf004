"""Triton pieces shared by the attention kernels (block-sparse, axial): K / V tile loads, the
work-list decoding, the online-softmax step of the forward, the dQ and dK / dV steps of the
backward, and delta = rowsum(dO * O). Each step is unmasked, masked by a precomputed tile, or
masked by the mask program in registers (constexpr switches).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .mask import program_mask, tile_keep

@triton.jit
def load_kv_tile(K_base, V_base, offs_n, N, stride_kn, stride_vn,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, EVEN_N: tl.constexpr):
    """K and V rows offs_n: (BN, D_PAD) each, zero past N and past HEAD_DIM; unmasked loads
    when neither can happen."""
    offs_d = tl.arange(0, D_PAD)
    k_ptrs = K_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    if EVEN_N and HEAD_DIM == D_PAD:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def load_desc(XD, b, h, start, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """Rows [start, start + BLOCK) of head (b, h) of a (B, H, N, D) tensor through its tensor
    descriptor (the copy engine; rows past N and columns past the head dim come back zero)."""
    return XD.load([b, h, start, 0]).reshape(BLOCK, D_PAD)


@triton.jit
def load_kv_desc(KD, VD, b, hk, start_n, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """K and V rows [start_n, start_n + BLOCK_N) of (b, hk) through their descriptors."""
    return load_desc(KD, b, hk, start_n, BLOCK_N, D_PAD), load_desc(VD, b, hk, start_n, BLOCK_N, D_PAD)


@triton.jit
def is_padding(KPM_base, stride_pn, offs, N):
    """(len(offs),) bool: which of these keys are padding (int8 flags; keys past N count)."""
    return tl.load(KPM_base + offs * stride_pn, mask=offs < N, other=1) != 0


@triton.jit
def partial_range(SUB_RANGES, pid, lo, hi, SKIP_EMPTY: tl.constexpr):
    """The range of this program's partial-block loop: every tile position i in [lo, hi) of its
    row's partial list, or (SKIP_EMPTY) a range of SUB_ENTRIES holding only the positions whose
    tile has an attending pair (`KernelProgram.sub_lists`)."""
    if SKIP_EMPTY:
        lo = tl.load(SUB_RANGES + 2 * pid)
        hi = tl.load(SUB_RANGES + 2 * pid + 1)
    return lo, hi


@triton.jit
def partial_step(SUB_ENTRIES, e, SKIP_EMPTY: tl.constexpr):
    """Tile position i of loop step e (see `partial_range`)."""
    if SKIP_EMPTY:
        i = tl.load(SUB_ENTRIES + e)
    else:
        i = e
    return i


@triton.jit
def work_item(ITEMS, pid, LAYOUT_B: tl.constexpr, BLOCK: tl.constexpr):
    """This program's row of the work list: a layout block (query block for fwd / dQ, key
    block for dK / dV), its ranges in the full and partial index lists, and the block of the
    output it writes (itself, or a chunk's block of the split-row scratch buffers); plus the
    token offsets of this program's tile and of its output rows."""
    SUB: tl.constexpr = LAYOUT_B // BLOCK  # kernel tiles per layout block
    W = ITEMS + (pid // SUB) * 6
    blk = tl.load(W)
    full_lo = tl.load(W + 1)
    full_hi = tl.load(W + 2)
    part_lo = tl.load(W + 3)
    part_hi = tl.load(W + 4)
    out_blk = tl.load(W + 5)
    local = (pid % SUB) * BLOCK + tl.arange(0, BLOCK)
    return blk, full_lo, full_hi, part_lo, part_hi, blk * LAYOUT_B + local, out_blk * LAYOUT_B + local


@triton.jit
def tile_start(blk, pid, LAYOUT_B: tl.constexpr, BLOCK: tl.constexpr):
    """The first token of this program's tile of layout block `blk` (`work_item`'s first offset)."""
    return blk * LAYOUT_B + (pid % (LAYOUT_B // BLOCK)) * BLOCK


@triton.jit
def fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, stride_pn, offs_m, start_n, N, qk_scale,
               stride_kn, stride_vn, ATTR, stride_attr, TAB, MT, ordinal, rows_in, cols0, KD, VD, b, hk,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, EVEN_N: tl.constexpr, PROGRAM: tl.constexpr,
               DOT_PREC: tl.constexpr, HAS_KPM: tl.constexpr, MASK_TILES: tl.constexpr,
               LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, TMA: tl.constexpr):
    """One key tile of the online softmax (log2 domain). Partial blocks (MASKED): the mask from
    the block's precomputed tile (MASK_TILES; `ordinal`, the rows' offsets `rows_in` and the
    tile's first column `cols0` within the block) or from the program in registers. TMA: K and V
    through their descriptors KD, VD at (b, hk)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k, v = load_kv_desc(KD, VD, b, hk, start_n, BLOCK_N, D_PAD)
    else:
        k, v = load_kv_tile(K_base, V_base, offs_n, N, stride_kn, stride_vn, HEAD_DIM, D_PAD, EVEN_N)
    # scores, scaled into the log2 domain: (BM, BN)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        if MASK_TILES:
            keep = tile_keep(MT, ordinal, rows_in[:, None], cols0 + tl.arange(0, BLOCK_N)[None, :],
                              LAYOUT_BQ, LAYOUT_BK)
        else:
            keep = program_mask(ATTR, stride_attr, TAB, offs_m[:, None], offs_n[None, :], N, PROGRAM)
        qk = tl.where(keep, qk, float("-inf"))
    elif not EVEN_N:
        qk = tl.where(offs_n[None, :] < N, qk, float("-inf"))
    if HAS_KPM:  # padding keys of this batch element, in every block (full ones too)
        qk = tl.where(is_padding(KPM_base, stride_pn, offs_n, N)[None, :], float("-inf"), qk)
    # online softmax; rows with nothing attended yet keep m = -inf and use 0 as their shift
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def finish_rows(acc, l_i, m_i):
    """End of the online softmax: (out, natural-log LSE); a row that attended nothing (all its
    keys masked or padding) gives 0 and -inf."""
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return acc, lse



@triton.jit
def bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                    N, H, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta (B, H, N) = rowsum(dO * O) in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_on + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def load_lse2(LSE_base, offs_m, N):
    """LSE in the log2 domain for P = exp2(s * qk_scale - lse2); rows that attend nothing
    (and rows past N) get +inf, so their P is 0 everywhere."""
    lse = tl.load(LSE_base + offs_m, mask=offs_m < N, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def dq_inner(dq, q, do, lse2, delta, K_base, V_base, KPM_base, stride_pn, offs_m, start_n, N, qk_scale,
              stride_kn, stride_vn, ATTR, stride_attr, TAB, MT, ordinal, rows_in, cols0, KD, VD, b, hk,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, EVEN_N: tl.constexpr, PROGRAM: tl.constexpr,
              DOT_PREC: tl.constexpr, HAS_KPM: tl.constexpr, MASK_TILES: tl.constexpr,
              LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k, v = load_kv_desc(KD, VD, b, hk, start_n, BLOCK_N, D_PAD)
    else:
        k, v = load_kv_tile(K_base, V_base, offs_n, N, stride_kn, stride_vn, HEAD_DIM, D_PAD, EVEN_N)
    # P recomputed from the LSE: (BM, BN)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if MASKED:
        if MASK_TILES:
            keep = tile_keep(MT, ordinal, rows_in[:, None], cols0 + tl.arange(0, BLOCK_N)[None, :],
                              LAYOUT_BQ, LAYOUT_BK)
        else:
            keep = program_mask(ATTR, stride_attr, TAB, offs_m[:, None], offs_n[None, :], N, PROGRAM)
        p = tl.where(keep, p, 0.0)
    elif not EVEN_N:
        p = tl.where(offs_n[None, :] < N, p, 0.0)
    if HAS_KPM:
        p = tl.where(is_padding(KPM_base, stride_pn, offs_n, N)[None, :], 0.0, p)
    # dS = P * (dP - delta); dQ += dS K
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq



@triton.jit
def dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, offs_n, start_m, N, qk_scale,
                stride_qn, stride_don, ATTR, stride_attr, TAB, MT, ordinal, rows0, cols_in, QD, DOD, b, h,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, PROGRAM: tl.constexpr, DOT_PREC: tl.constexpr,
                MASK_TILES: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr,
                TMA: tl.constexpr):
    """One query tile against this program's key tile, everything transposed: (BN, BM). A
    partial block's tile mask is read transposed: the tile's first query row `rows0` and the
    keys' offsets `cols_in` within the block. TMA: Q and dO through their descriptors at (b, h)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if TMA:
        q, do = load_kv_desc(QD, DOD, b, h, start_m, BLOCK_M, D_PAD)
    else:
        offs_d = tl.arange(0, D_PAD)
        row_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = load_lse2(LSE_base, offs_m, N)
    delta = tl.load(DELTA_base + offs_m, mask=offs_m < N, other=0.0)
    # P^T recomputed from the LSE; queries past N have lse2 = +inf, so P^T = 0 there
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    pT = tl.math.exp2(qkT - lse2[None, :])
    if MASKED:
        if MASK_TILES:
            keep = tile_keep(MT, ordinal, rows0 + tl.arange(0, BLOCK_M)[None, :], cols_in[:, None],
                              LAYOUT_BQ, LAYOUT_BK)
        else:
            keep = program_mask(ATTR, stride_attr, TAB, offs_m[None, :], offs_n[:, None], N, PROGRAM)
        pT = tl.where(keep, pT, 0.0)
    # dV += P^T dO;  dS^T = P^T * (dP^T - delta);  dK += dS^T Q
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv

