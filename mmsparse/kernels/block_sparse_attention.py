"""Block-sparse attention over a BlockLayout: Triton forward and backward kernels.

Legend: B batch, H query heads, Hk key/value heads (GQA: H = Hk * G), N tokens, D head dim,
Dp = D padded to a power of two (>= 16), A mask-program attributes, Mq / Mk layout query / key
blocks of bq / bk tokens, BM / BN the kernel's tiles (powers of two dividing bq / bk).

Layers, top to bottom (CONVENTIONS.md item 1):
1. `block_sparse_attention_ref`: dense masked PyTorch (N x N mask from the layout), optionally
   in the input dtype, for tests and error budgets.
2. The `@triton.jit` kernels:
   - `_fwd_kernel`: per (query tile, batch x head) an online softmax over the layout's key
     blocks: full blocks first (no mask arithmetic at all), then partial blocks, whose mask
     is evaluated in registers from int32 token attributes by the mask program, which is
     baked into the kernel as compile-time constants (`PROGRAM`). Writes out and the
     natural-log LSE.
   - `_bwd_preprocess`: delta = rowsum(dO * O).
   - `_bwd_dq_kernel`: per query tile over the same key lists, P recomputed from the LSE.
   - `_bwd_dkdv_kernel`: per key tile over the transposed lists (k_full_* / k_part_*) and
     over the G query heads of its key head. No atomics: gradients are deterministic.
   - `_combine_chunks_kernel`: the chunks of split rows (below) back into whole rows.
3. The launchers: argument checks, allocation, tile choice, grids.
4. `_BlockSparseAttention` (autograd) and the public `block_sparse_attention`.

Tiles and the layout. The layout's blocks (bq x bk, 128 x 128 by default) are the unit of
sparsity; the kernel's tiles BM x BN are powers of two that divide them, so one layout block
is processed as (bq / BM) x (bk / BN) tiles and a full block stays full in every tile. The
layout therefore need not be rebuilt for a kernel configuration; the tile sizes come from a
per-head-dim table (`_CONFIGS`), or from a timing of candidates when MMSPARSE_TRITON_AUTOTUNE=1
(cached per head dim, dtype, layout block and kernel). Layout blocks must be multiples of 16.

The mask program (mmsparse/attention/program.py) is lowered to a flat tuple of ints, five per
predicate (kind, a, b, c, d), with kind 0 separating the clauses of the DNF. Attribute 0 is
the token position and is never loaded (the tile offsets are the positions). Coarse tables
(Random, BlockSparse) are concatenated into one int32 buffer; a coarse predicate loads its
query rows (a few int32 per query) and compares them with the key groups.

Partial blocks read their mask one of two ways (`_use_mask_tiles`). By default the program is
evaluated once per layout by `_mask_tiles_kernel` into one uint8 per pair of every partial block
(bq x bk bytes each, in the row order of q_part_idx; k_part_ord maps the column order to it),
and the kernels load a tile of it like a K tile: a coalesced, software-pipelined load whatever
the program's size. Where the tiles would take more than MMSPARSE_MASK_TILE_MB (a very long
sequence), or with MMSPARSE_MASK_TILES=0, the kernels evaluate the program in registers on
every tile instead: no memory, but a few attribute loads and integer operations per pair and
predicate in every tile of every head.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections import OrderedDict

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are decorated

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mmsparse.attention.backends import check_key_padding_mask  # noqa: E402

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# predicate kinds in the kernel's encoding (0 separates clauses)
_KIND = {"eq": 1, "ne": 2, "range": 3, "cong": 4, "qflag": 5, "kflag": 6, "le": 7, "coarse": 8}


# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------


def block_sparse_attention_ref(q, k, v, layout, scale=None, upcast: bool = True, key_padding_mask=None):
    """Dense masked attention with the layout's N x N mask (small N only).

    q (B, H, N, D), k / v (B, Hk, N, D) -> out (B, H, N, D) in q's dtype, lse (B, H, N) float32.
    upcast=True computes in float64 (the truth for tests); False computes in the input dtype,
    which measures what rounding alone costs (the error budget of CONVENTIONS.md item 3).
    Rows that attend nothing give zeros and an LSE of -inf, as the kernels do.
    key_padding_mask (B, N) bool: True where a key is padding (never attended).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)  # (B, H, N, D)
    v = v.repeat_interleave(group, 1)
    mask = layout.to(q.device).dense_mask(max_tokens=1 << 15)  # (N, N)
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask.to(q.device)[:, None, None, :]  # (B, 1, N, N)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, N, N)
    s = s.masked_fill(~mask, -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = torch.matmul(p / l.clamp(min=torch.finfo(l.dtype).tiny), v)
    lse = torch.where(l > 0, m + torch.log(l), -math.inf).squeeze(-1)
    return out.to(dtype), lse.float()


# ---------------------------------------------------------------------------------------------
# 2. Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _predicate(ATTR, stride_attr, TAB, oq, ok, q_in, k_in, zero,
               KIND: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
               P4: tl.constexpr):
    """One predicate of the mask program as a broadcast comparison (program.py semantics)."""
    if KIND == 8:  # coarse: key group ok // P3 listed in row oq // P2 of the table at P1
        grp_k = ok // P3
        row_ptrs = TAB + P1 + (oq // P2) * P4
        r = zero != 0
        for j in tl.static_range(P4):
            r = r | (tl.load(row_ptrs + j, mask=q_in, other=-1) == grp_k)
    else:
        # attribute P1 of the queries and of the keys (attribute 0: the position, not loaded)
        if P1 == 0:
            xq = oq
            xk = ok
        else:
            if KIND != 6:
                xq = tl.load(ATTR + P1 * stride_attr + oq, mask=q_in, other=0)
            if KIND != 5:
                xk = tl.load(ATTR + P1 * stride_attr + ok, mask=k_in, other=0)
        if KIND == 1:  # eq
            r = xq == xk
        elif KIND == 2:  # ne
            r = xq != xk
        elif KIND == 3:  # range: attrs[P2][q] <= attrs[P1][k] < attrs[P3][q]
            if P2 == 0:
                lo = oq
            else:
                lo = tl.load(ATTR + P2 * stride_attr + oq, mask=q_in, other=0)
            if P3 == 0:
                hi = oq
            else:
                hi = tl.load(ATTR + P3 * stride_attr + oq, mask=q_in, other=0)
            # lo <= xk < hi as one unsigned comparison (xk < lo wraps to a huge value)
            r = (xk - lo).to(tl.uint32) < tl.maximum(hi - lo, 0).to(tl.uint32)
        elif KIND == 4:  # cong: (q - k) % P2 == 0 (C's remainder sign is irrelevant for 0)
            r = (xq - xk) % P2 == 0
        elif KIND == 5:  # qflag
            r = xq != 0
        elif KIND == 6:  # kflag
            r = xk != 0
        else:  # le: attrs[P1][k] <= attrs[P1][q]
            r = xk <= xq
    return r


@triton.jit
def _program_mask(ATTR, stride_attr, TAB, oq, ok, N, PROGRAM: tl.constexpr):
    """The mask program (DNF) on a tile.

    oq, ok: token positions of the tile's queries and keys, shaped to broadcast against each
    other ((BM, 1) and (1, BN), or (1, BM) and (BN, 1) for the transposed dK/dV tile), so
    every predicate is one broadcast comparison. Returns a bool tile, False for keys past N.
    """
    zero = oq * 0 + ok * 0
    q_in = oq < N
    k_in = ok < N
    allowed = zero != 0
    term = zero == 0
    for i in tl.static_range(len(PROGRAM) // 5):
        if PROGRAM[5 * i] == 0:  # end of a clause
            allowed = allowed | term
            term = zero == 0
        else:
            term = term & _predicate(ATTR, stride_attr, TAB, oq, ok, q_in, k_in, zero,
                                     PROGRAM[5 * i], PROGRAM[5 * i + 1], PROGRAM[5 * i + 2],
                                     PROGRAM[5 * i + 3], PROGRAM[5 * i + 4])
    allowed = allowed | term
    # keys past N never attend (their attributes were loaded as 0)
    return allowed & k_in


@triton.jit
def _tile_keep(MT, ordinal, rows, cols, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr):
    """A partial block's precomputed mask (one uint8 per pair, `_mask_tiles_kernel`) on a tile.

    ordinal: the block's position in the row-ordered partial list; rows / cols: offsets within
    the layout block, shaped to broadcast ((BM, 1) and (1, BN), or transposed for dK / dV)."""
    base = MT + tl.cast(ordinal, tl.int64) * (LAYOUT_BQ * LAYOUT_BK)
    return tl.load(base + rows * LAYOUT_BK + cols) != 0


@triton.jit
def _mask_tiles_kernel(ATTR, stride_attr, TAB, PAIRS, MT, N,
                       LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, COLS: tl.constexpr,
                       ROWS: tl.constexpr, PROGRAM: tl.constexpr):
    """MT[p] (LAYOUT_BQ, LAYOUT_BK) uint8 = the mask program on partial block p = (PAIRS[2p],
    PAIRS[2p + 1]); 0 for queries or keys past N. One program per ROWS rows of one block."""
    p = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    qb = tl.load(PAIRS + 2 * p)
    kb = tl.load(PAIRS + 2 * p + 1)
    oq = (qb * LAYOUT_BQ + rows)[:, None]
    ok = (kb * LAYOUT_BK + cols)[None, :]
    keep = _program_mask(ATTR, stride_attr, TAB, oq, ok, N, PROGRAM) & (oq < N)
    ptrs = MT + p.to(tl.int64) * (LAYOUT_BQ * LAYOUT_BK) + rows[:, None] * LAYOUT_BK + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=cols[None, :] < LAYOUT_BK)


@triton.jit
def _load_kv_tile(K_base, V_base, offs_n, N, stride_kn, stride_vn,
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
def _load_kv_desc(KD, VD, b, hk, start_n, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """K and V rows [start_n, start_n + BLOCK_N) of (b, hk) through their tensor descriptors
    (the copy engine; rows past N and columns past the head dim come back zero)."""
    k = KD.load([b, hk, start_n, 0]).reshape(BLOCK_N, D_PAD)
    v = VD.load([b, hk, start_n, 0]).reshape(BLOCK_N, D_PAD)
    return k, v


@triton.jit
def _is_padding(KPM_base, stride_pn, offs, N):
    """(len(offs),) bool: which of these keys are padding (int8 flags; keys past N count)."""
    return tl.load(KPM_base + offs * stride_pn, mask=offs < N, other=1) != 0


@triton.jit
def _partial_range(SUB_RANGES, pid, lo, hi, SKIP_EMPTY: tl.constexpr):
    """The range of this program's partial-block loop: every tile position i in [lo, hi) of its
    row's partial list, or (SKIP_EMPTY) a range of SUB_ENTRIES holding only the positions whose
    tile has an attending pair (`_KernelProgram.sub_lists`)."""
    if SKIP_EMPTY:
        lo = tl.load(SUB_RANGES + 2 * pid)
        hi = tl.load(SUB_RANGES + 2 * pid + 1)
    return lo, hi


@triton.jit
def _partial_step(SUB_ENTRIES, e, SKIP_EMPTY: tl.constexpr):
    """Tile position i of loop step e (see `_partial_range`)."""
    if SKIP_EMPTY:
        i = tl.load(SUB_ENTRIES + e)
    else:
        i = e
    return i


@triton.jit
def _work_item(ITEMS, pid, LAYOUT_B: tl.constexpr, BLOCK: tl.constexpr):
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
def _fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, stride_pn, offs_m, start_n, N, qk_scale,
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
        k, v = _load_kv_desc(KD, VD, b, hk, start_n, BLOCK_N, D_PAD)
    else:
        k, v = _load_kv_tile(K_base, V_base, offs_n, N, stride_kn, stride_vn, HEAD_DIM, D_PAD, EVEN_N)
    # scores, scaled into the log2 domain: (BM, BN)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        if MASK_TILES:
            keep = _tile_keep(MT, ordinal, rows_in[:, None], cols0 + tl.arange(0, BLOCK_N)[None, :],
                              LAYOUT_BQ, LAYOUT_BK)
        else:
            keep = _program_mask(ATTR, stride_attr, TAB, offs_m[:, None], offs_n[None, :], N, PROGRAM)
        qk = tl.where(keep, qk, float("-inf"))
    elif not EVEN_N:
        qk = tl.where(offs_n[None, :] < N, qk, float("-inf"))
    if HAS_KPM:  # padding keys of this batch element, in every block (full ones too)
        qk = tl.where(_is_padding(KPM_base, stride_pn, offs_n, N)[None, :], float("-inf"), qk)
    # online softmax; rows with nothing attended yet keep m = -inf and use 0 as their shift
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """End of the online softmax: (out, natural-log LSE); a row that attended nothing (all its
    keys masked or padding) gives 0 and -inf."""
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return acc, lse


@triton.jit
def _fwd_kernel(
    Q, K, V, KD, VD, O, LSE, ATTR, TAB, MT, KPM, ITEMS, q_full_idx, q_part_idx, SUB_ENTRIES, SUB_RANGES,
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
    TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    SUB_N: tl.constexpr = LAYOUT_BK // BLOCK_N  # kernel tiles per layout key block
    qb, full_lo, full_hi, part_lo, part_hi, offs_m, offs_out = _work_item(
        ITEMS, pid_m, LAYOUT_BQ, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    Q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    KPM_base = KPM + b.to(tl.int64) * stride_kpm
    q_ptrs = Q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # 1. full key blocks: no mask arithmetic
    for i in range(full_lo * SUB_N, full_hi * SUB_N):
        kb = tl.load(q_full_idx + i // SUB_N)
        start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, 1, offs_m, start_n, N,
                                   qk_scale, stride_kn, stride_vn, ATTR, stride_attr, TAB, MT, 0, offs_m, 0,
                                   KD, VD, b, hk, HEAD_DIM, D_PAD, BLOCK_N, False, EVEN_N, PROGRAM, DOT_PREC,
                                   HAS_KPM, MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    # 2. partial key blocks: the mask from the block's tile or the program in registers
    if HAS_PARTIAL:
        rows_in = offs_m - qb * LAYOUT_BQ
        lo, hi = _partial_range(SUB_RANGES, pid_m, part_lo * SUB_N, part_hi * SUB_N, SKIP_EMPTY)
        for e in range(lo, hi):
            i = _partial_step(SUB_ENTRIES, e, SKIP_EMPTY)
            kb = tl.load(q_part_idx + i // SUB_N)
            start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, KPM_base, 1, offs_m, start_n, N,
                                       qk_scale, stride_kn, stride_vn, ATTR, stride_attr, TAB,
                                       MT, i // SUB_N, rows_in, (i % SUB_N) * BLOCK_N, KD, VD, b, hk,
                                       HEAD_DIM, D_PAD, BLOCK_N, True, EVEN_N, PROGRAM, DOT_PREC, HAS_KPM,
                                       MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)

    # 3. normalise; rows that attended nothing give 0 and LSE -inf
    acc, lse = _finish_rows(acc, l_i, m_i)
    # rows of O: the query rows, or a chunk's rows of the scratch buffers (split rows)
    O_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = O_base + offs_out[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + pid_bh.to(tl.int64) * stride_lse + offs_out, lse, mask=offs_m < N)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
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
def _load_lse2(LSE_base, offs_m, N):
    """LSE in the log2 domain for P = exp2(s * qk_scale - lse2); rows that attend nothing
    (and rows past N) get +inf, so their P is 0 everywhere."""
    lse = tl.load(LSE_base + offs_m, mask=offs_m < N, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_base, V_base, KPM_base, stride_pn, offs_m, start_n, N, qk_scale,
              stride_kn, stride_vn, ATTR, stride_attr, TAB, MT, ordinal, rows_in, cols0, KD, VD, b, hk,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, EVEN_N: tl.constexpr, PROGRAM: tl.constexpr,
              DOT_PREC: tl.constexpr, HAS_KPM: tl.constexpr, MASK_TILES: tl.constexpr,
              LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k, v = _load_kv_desc(KD, VD, b, hk, start_n, BLOCK_N, D_PAD)
    else:
        k, v = _load_kv_tile(K_base, V_base, offs_n, N, stride_kn, stride_vn, HEAD_DIM, D_PAD, EVEN_N)
    # P recomputed from the LSE: (BM, BN)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(qk - lse2[:, None])
    if MASKED:
        if MASK_TILES:
            keep = _tile_keep(MT, ordinal, rows_in[:, None], cols0 + tl.arange(0, BLOCK_N)[None, :],
                              LAYOUT_BQ, LAYOUT_BK)
        else:
            keep = _program_mask(ATTR, stride_attr, TAB, offs_m[:, None], offs_n[None, :], N, PROGRAM)
        p = tl.where(keep, p, 0.0)
    elif not EVEN_N:
        p = tl.where(offs_n[None, :] < N, p, 0.0)
    if HAS_KPM:
        p = tl.where(_is_padding(KPM_base, stride_pn, offs_n, N)[None, :], 0.0, p)
    # dS = P * (dP - delta); dQ += dS K
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, KD, VD, DO, DQ, LSE, DELTA, ATTR, TAB, MT, KPM, ITEMS, q_full_idx, q_part_idx, SUB_ENTRIES, SUB_RANGES,
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
    TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    SUB_N: tl.constexpr = LAYOUT_BK // BLOCK_N
    qb, full_lo, full_hi, part_lo, part_hi, offs_m, offs_out = _work_item(
        ITEMS, pid_m, LAYOUT_BQ, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = _load_lse2(LSE + pid_bh.to(tl.int64) * N, offs_m, N)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    K_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    KPM_base = KPM + b.to(tl.int64) * stride_kpm
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for i in range(full_lo * SUB_N, full_hi * SUB_N):
        kb = tl.load(q_full_idx + i // SUB_N)
        start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
        dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, KPM_base, 1, offs_m, start_n, N, qk_scale,
                       stride_kn, stride_vn, ATTR, stride_attr, TAB, MT, 0, offs_m, 0, KD, VD, b, hk,
                       HEAD_DIM, D_PAD, BLOCK_N, False, EVEN_N, PROGRAM, DOT_PREC, HAS_KPM,
                       MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    if HAS_PARTIAL:
        rows_in = offs_m - qb * LAYOUT_BQ
        lo, hi = _partial_range(SUB_RANGES, pid_m, part_lo * SUB_N, part_hi * SUB_N, SKIP_EMPTY)
        for e in range(lo, hi):
            i = _partial_step(SUB_ENTRIES, e, SKIP_EMPTY)
            kb = tl.load(q_part_idx + i // SUB_N)
            start_n = kb * LAYOUT_BK + (i % SUB_N) * BLOCK_N
            dq = _dq_inner(dq, q, do, lse2, delta, K_base, V_base, KPM_base, 1, offs_m, start_n, N, qk_scale,
                           stride_kn, stride_vn, ATTR, stride_attr, TAB,
                           MT, i // SUB_N, rows_in, (i % SUB_N) * BLOCK_N, KD, VD, b, hk,
                           HEAD_DIM, D_PAD, BLOCK_N, True, EVEN_N, PROGRAM, DOT_PREC, HAS_KPM,
                           MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_out[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, offs_n, start_m, N, qk_scale,
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
        q, do = _load_kv_desc(QD, DOD, b, h, start_m, BLOCK_M, D_PAD)
    else:
        offs_d = tl.arange(0, D_PAD)
        row_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = _load_lse2(LSE_base, offs_m, N)
    delta = tl.load(DELTA_base + offs_m, mask=offs_m < N, other=0.0)
    # P^T recomputed from the LSE; queries past N have lse2 = +inf, so P^T = 0 there
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    pT = tl.math.exp2(qkT - lse2[None, :])
    if MASKED:
        if MASK_TILES:
            keep = _tile_keep(MT, ordinal, rows0 + tl.arange(0, BLOCK_M)[None, :], cols_in[:, None],
                              LAYOUT_BQ, LAYOUT_BK)
        else:
            keep = _program_mask(ATTR, stride_attr, TAB, offs_m[None, :], offs_n[:, None], N, PROGRAM)
        pT = tl.where(keep, pT, 0.0)
    # dV += P^T dO;  dS^T = P^T * (dP^T - delta);  dK += dS^T Q
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, QD, DOD, DK, DV, LSE, DELTA, ATTR, TAB, MT, k_part_ord, KPM, ITEMS, k_full_idx, k_part_idx,
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
    TMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = pid_bhk // HK
    hk = pid_bhk % HK
    SUB_M: tl.constexpr = LAYOUT_BQ // BLOCK_M
    kb, full_lo, full_hi, part_lo, part_hi, offs_n, offs_out = _work_item(
        ITEMS, pid_n, LAYOUT_BK, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    col_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    k, v = _load_kv_tile(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh,
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
        for i in range(full_lo * SUB_M, full_hi * SUB_M):
            qb = tl.load(k_full_idx + i // SUB_M)
            start_m = qb * LAYOUT_BQ + (i % SUB_M) * BLOCK_M
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, offs_n, start_m,
                                 N, qk_scale, stride_qn, stride_don, ATTR, stride_attr, TAB, MT, 0, 0, offs_n,
                                 QD, DOD, b, h, HEAD_DIM, D_PAD, BLOCK_M, False, PROGRAM, DOT_PREC,
                                 MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
        if HAS_PARTIAL:
            cols_in = offs_n - kb * LAYOUT_BK
            lo, hi = _partial_range(SUB_RANGES, pid_n, part_lo * SUB_M, part_hi * SUB_M, SKIP_EMPTY)
            for e in range(lo, hi):
                i = _partial_step(SUB_ENTRIES, e, SKIP_EMPTY)
                qb = tl.load(k_part_idx + i // SUB_M)
                start_m = qb * LAYOUT_BQ + (i % SUB_M) * BLOCK_M
                ordinal = 0
                if MASK_TILES:  # the block's position in the row-ordered partial list
                    ordinal = tl.load(k_part_ord + i // SUB_M)
                dk, dv = _dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, offs_n, start_m,
                                     N, qk_scale, stride_qn, stride_don, ATTR, stride_attr, TAB,
                                     MT, ordinal, (i % SUB_M) * BLOCK_M, cols_in, QD, DOD, b, h,
                                     HEAD_DIM, D_PAD, BLOCK_M, True, PROGRAM, DOT_PREC,
                                     MASK_TILES, LAYOUT_BQ, LAYOUT_BK, TMA)
    dk = dk * sm_scale
    if HAS_KPM:  # a padding key is attended by no query: its gradients are exactly zero
        pad = _is_padding(KPM + b.to(tl.int64) * stride_kpm, 1, offs_n, N)[:, None]
        dk = tl.where(pad, 0.0, dk)
        dv = tl.where(pad, 0.0, dv)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_out[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_out[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_mask)


@triton.jit
def _combine_chunks_kernel(
    S, LS, CHUNKS, TOKENS, DEST, DEST_LSE, n_tok, H, cmax,
    stride_sb, stride_sh, stride_sn, stride_lsb, stride_lsh,
    stride_db, stride_dh, stride_dn, stride_dlb, stride_dlh,
    LAYOUT_B: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    MERGE: tl.constexpr,
):
    """The chunks of the split rows back into whole rows, one program per ROWS rows of one long
    row block and (batch, head). S (B, H, (chunks + 1) * LAYOUT_B, D) float32 holds each chunk's
    rows; CHUNKS (L, cmax) int32 each long row's chunks (padding entries name the extra chunk,
    which holds zeros and LSE -inf); TOKENS the long rows' token indices below N (n_tok of them).
    MERGE (forward): softmax results weighted by their LSE in LS, the merged LSE to DEST_LSE;
    otherwise (dQ, dK, dV) a plain sum. The chunks are visited in order: deterministic."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    PER: tl.constexpr = LAYOUT_B // ROWS
    row = pid // PER
    r = (pid % PER) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D_PAD)
    d_in = offs_d[None, :] < HEAD_DIM
    S_base = S + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
    acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    if MERGE:
        LS_base = LS + b.to(tl.int64) * stride_lsb + h.to(tl.int64) * stride_lsh
        m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        for c in range(cmax):
            ci = tl.load(CHUNKS + row * cmax + c)
            m = tl.maximum(m, tl.load(LS_base + ci * LAYOUT_B + r))
        m = tl.where(m == float("-inf"), 0.0, m)
        w_sum = tl.zeros([ROWS], dtype=tl.float32)
        for c in range(cmax):
            ci = tl.load(CHUNKS + row * cmax + c)
            w = tl.exp(tl.load(LS_base + ci * LAYOUT_B + r) - m)
            o = tl.load(S_base + (ci * LAYOUT_B + r)[:, None] * stride_sn + offs_d[None, :], mask=d_in, other=0.0)
            acc += w[:, None] * o
            w_sum += w
        acc = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
        lse = tl.where(w_sum == 0.0, float("-inf"), m + tl.log(tl.where(w_sum == 0.0, 1.0, w_sum)))
    else:
        for c in range(cmax):
            ci = tl.load(CHUNKS + row * cmax + c)
            acc += tl.load(S_base + (ci * LAYOUT_B + r)[:, None] * stride_sn + offs_d[None, :], mask=d_in, other=0.0)
    i = row * LAYOUT_B + r
    valid = i < n_tok
    tok = tl.load(TOKENS + i, mask=valid, other=0)
    tl.store(DEST + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + tok[:, None] * stride_dn
             + offs_d[None, :], acc.to(DEST.dtype.element_ty), mask=valid[:, None] & d_in)
    if MERGE:
        tl.store(DEST_LSE + b.to(tl.int64) * stride_dlb + h.to(tl.int64) * stride_dlh + tok, lse, mask=valid)


# ---------------------------------------------------------------------------------------------
# 3. Launchers
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim, for Hopper in
# 16-bit; BLOCK_* are upper bounds, cut to the largest power of two dividing the layout block.
# fwd / dq: BLOCK_M queries x BLOCK_N keys; dkdv: BLOCK_N keys (the program's tile) x BLOCK_M
# queries (the loop's tile). D_PAD 64 and 128: the MMSPARSE_TRITON_AUTOTUNE=1 choices of
# 2026-11-28 on an H200 (bench/NOTES.md, v2): the same on full-block (A3) and partial-block (A1)
# workloads except dq, where A1 preferred BLOCK_N = 32 by a few per cent. 16 / 32 follow 64;
# 256 is untimed (compiled without spills for sm_90 on the CPU).
_CONFIGS = {
    "fwd": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3),
            128: (128, 128, 8, 3), 256: (64, 64, 8, 2)},
    "dq": {16: (64, 128, 4, 3), 32: (64, 128, 4, 3), 64: (64, 128, 4, 3),
           128: (64, 64, 4, 3), 256: (64, 32, 8, 2)},
    "dkdv": {16: (32, 64, 4, 3), 32: (32, 64, 4, 3), 64: (32, 64, 4, 3),
             128: (64, 64, 4, 3), 256: (32, 64, 8, 2)},
}
# D_PAD 16-64 fwd (128, 64, 8, 3) and dq (64, 128, 4, 3) since session 6: the sweep on the E1
# captioner layer at 512 frames (bench/probe_mask_cost.py --sweep; v7 in bench/NOTES.md) timed
# them 4 % (fwd) and 5 % (whole backward) under the former (64, 128, 4, 3) and (64, 64, 4, 3).
# v1 table (first H200 run): fwd 64: (128, 128, 8, 3), 128: (128, 64, 8, 3); dq (128, 64, 8, 3|2);
# dkdv (64, 128, 8, 3|2)
# Layouts whose blocks are mostly partial (token-level windows such as A1, A2) at D_PAD 128: the
# forward on 64 x 64 tiles (the E1 captioner's heads are 64 wide: this entry does not reach it). bench/NOTES.md v9, sweep of 2026-12-02 on an
# H200 (results/logs/sweep-d128-partial-h200-2026-12-02.log): A1 8x128 0.569 -> 0.398 ms, A2
# 6.65 -> 4.85 ms, A2 in tile order 5.01 -> 3.85 ms; smaller tiles skip more empty tiles and hold
# a (64, 64) byte mask instead of (128, 128). dq and dK/dV keep their table entry (the best there).
# Full-block layouts (A3, dense) keep the larger tiles of _CONFIGS.
_CONFIGS_PARTIAL = {"fwd": {128: (64, 64, 4, 3)}}
PARTIAL_HEAVY = 0.5  # share of partial blocks above which _CONFIGS_PARTIAL applies
# Layouts of 64 x 64 blocks (tile-aligned 14 x 14 grids, `Segment.tile_align=64`) at D_PAD <= 64:
# the table's 8-warp forward cut to 64 x 64 leaves each warp 8 rows. MMSPARSE_TRITON_AUTOTUNE=1
# on the E1 64-frame layer (batch 8, H200, 2026-12-03; results/logs/model-64f-batch8-tile-align-
# autotune-h200-2026-12-03.log) chose these on both its layouts (tiled and tiled_shifted); the
# step went from 154.7 to 143.6 ms (bench/NOTES.md, session 11).
# dQ on 64 x 64 tiles since session 15: the autotuner chose it on A1 16x64 (H200, 2026-12-04;
# results/logs/attention-A1A2-autotune-h200-2026-12-04.log: fwd+bwd 1.78 -> 1.70 ms, A2 22.0 ->
# 20.9 ms) and on the E1 layer (123.5 against 123.4 ms, no change), and the sweep of the A5
# presets timed the whole backward 4 % (Longformer 2.19 -> 2.10 ms) and 3 % (BigBird 2.56 ->
# 2.49 ms) faster than with the former (64, 32, 4, 3) (results/logs/sweep-a5-h200-2026-12-04.log).
_CONFIGS_B64 = {"fwd": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "dkdv": (32, 64, 4, 3)}
# float32 inputs (three tf32 products per dot): smaller tiles; accepted, not a fast path
_CONFIGS_FP32 = {
    "fwd": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 4, 1)},
    "dq": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 4, 1)},
    "dkdv": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (32, 64, 8, 2), 256: (32, 32, 4, 1)},
}
# candidates timed when MMSPARSE_TRITON_AUTOTUNE=1
_CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2),
           (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2),
             (32, 128, 4, 3), (32, 128, 4, 4), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 4, 2)],
}
_TUNED: dict = {}
_OVERRIDE: dict = {}  # tests: kernel name -> config


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fit(block: int, layout_block: int) -> int:
    """Largest power of two <= block dividing layout_block."""
    b = block
    while b > 16 and layout_block % b:
        b //= 2
    return b


def _partial_heavy(layout) -> bool:
    """Whether most of the layout's listed blocks are partial (they pick other tiles)."""
    total = layout.num_full + layout.num_partial
    return total > 0 and layout.num_partial > PARTIAL_HEAVY * total


def _default_config(kernel: str, d_pad: int, dtype, layout=None):
    if dtype == torch.float32:
        return _CONFIGS_FP32[kernel][d_pad]
    if layout is not None and d_pad <= 64 and layout.block_q == layout.block_k == 64:
        return _CONFIGS_B64[kernel]
    if layout is not None and _partial_heavy(layout):
        cfg = _CONFIGS_PARTIAL.get(kernel, {}).get(d_pad)
        if cfg is not None:
            return cfg
    return _CONFIGS[kernel][d_pad]


def _config(kernel: str, d_pad: int, q, layout):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a test override, a tuned entry, or the table."""
    cfg = _OVERRIDE.get(kernel) or _TUNED.get(_autotune_key(kernel, d_pad, q, layout))
    bm, bn, warps, stages = cfg or _default_config(kernel, d_pad, q.dtype, layout)
    return _fit(bm, layout.block_q), _fit(bn, layout.block_k), warps, stages


def unsupported_reason(q, k, v, layout) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can.

    Lets `sparse_attention(backend="auto")` fall back with one log line."""
    reason = tensor_unsupported_reason(q)
    if reason is None and (layout.block_q % 16 or layout.block_k % 16):
        reason = (f"layout blocks {layout.block_q}x{layout.block_k} must be multiples of 16 "
                  f"(build the layout with block_q=block_k=128)")
    return reason


def tensor_unsupported_reason(q) -> str | None:
    """The rules on q alone (device, dtype, head dim), shared with the axial kernels."""
    if q.device.type != "cuda" and not _interpreting():
        return f"the Triton kernels need CUDA tensors (got {q.device}; TRITON_INTERPRET=1 runs them on the CPU)"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is above the kernels' limit of {MAX_HEAD_DIM}"
    if q.shape[-1] < 1:
        return "head_dim must be positive"
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] < 8:
        return "bfloat16 needs compute capability 8.0 or newer"
    return None


def _check(q, k, v, layout):
    from mmsparse.attention.blocklayout import BlockLayout

    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4D tensor (B, H, N, D), got {getattr(t, 'shape', type(t).__name__)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k and v must be (B, Hk, N, D) = ({b}, Hk, {n}, {d}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if h % k.shape[1]:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({k.shape[1]}) for GQA")
    if n != layout.n:
        raise ValueError(f"q has N={n} tokens but the layout was built for N={layout.n}")
    reason = unsupported_reason(q, k, v, layout)
    if reason:
        raise ValueError(f"block_sparse_attention: {reason}")


def _simplify(program) -> list:
    """The clauses without predicates that are constant over all N tokens (e.g. `eq segment`
    on a one-segment stream): fewer operations per element of a partial block."""
    attrs = program.attrs
    const = {}

    def constant(a):
        if a not in const:
            col = attrs[a]
            const[a] = int(col[0]) if a != 0 and bool((col == col[0]).all()) else None
        return const[a]

    clauses = []
    for clause in program.clauses:
        kept, false = [], False
        for pred in clause:
            kind, c = pred[0], constant(pred[1]) if pred[0] in ("eq", "ne", "qflag", "kflag") else None
            if c is None:
                kept.append(pred)
            elif kind == "ne" or (kind in ("qflag", "kflag") and c == 0):
                false = True
        if not false:
            clauses.append(tuple(kept))
    if not clauses:  # nothing ever attends: keep one original (false) clause
        clauses = [program.clauses[0]]
    return clauses


def _lower_program(program) -> tuple[tuple, torch.Tensor | None]:
    """The mask program as the kernel's flat constexpr tuple (empty: every pair attends), and
    the concatenated coarse tables."""
    clauses = _simplify(program) if program.clauses else []
    if any(len(c) == 0 for c in clauses):
        return (), None
    flat, tables, offset = [], [], 0
    table_at = {}
    for ci, clause in enumerate(clauses):
        if ci:
            flat += [0, 0, 0, 0, 0]
        for pred in clause:
            kind = pred[0]
            if kind == "coarse":
                t, gq, gk = pred[1:]
                if t not in table_at:
                    tab = program.tables[t]
                    table_at[t] = (offset, tab.shape[1])
                    tables.append(tab.reshape(-1))
                    offset += tab.numel()
                off, width = table_at[t]
                flat += [_KIND[kind], off, gq, gk, width]
            else:
                args = list(pred[1:]) + [0] * (4 - len(pred[1:]))
                flat += [_KIND[kind]] + [int(a) for a in args]
    tab = torch.cat(tables) if tables else None
    return tuple(flat), tab


def _int32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and (int(t.max()) >= 2**31 or int(t.min()) < -(2**31)):
        raise ValueError(f"{what} values do not fit int32")
    return t.to(torch.int32).contiguous()


# Split rows. A program walks one row of the layout (a query block's key blocks, or for dK / dV
# a key block's query blocks), so one long row (the global tokens' row and column of Longformer
# or BigBird: every block of the sequence) runs serially in one program while the others are
# done. Rows longer than a chunk are cut into chunks of consecutive list entries, one program
# each, writing float32 partial results to scratch rows; one launch of `_combine_chunks_kernel`
# merges them (forward: by their LSE; dQ, dK, dV: a sum in a fixed order, so the result stays
# deterministic). It replaced ~15 torch ops a call, which had left the A5 Longformer forward
# waiting on the host (bench/NOTES.md, session 15).
_SPLIT_CHUNK: int | None = None  # tests: force a chunk length (layout blocks); None: automatic


def _chunk_length(lengths: torch.Tensor) -> int:
    """Entries per chunk: twice the mean non-empty row, at least 8, so only rows far above the
    typical length are cut (a window or a dense layout is never split)."""
    if _SPLIT_CHUNK is not None:
        return _SPLIT_CHUNK
    busy = lengths[lengths > 0]
    return max(8, 2 * math.ceil(busy.float().mean().item())) if busy.numel() else 1


class _WorkList:
    """Rows of one side of a layout (q: forward / dQ, k: dK / dV) as the kernels' work items.

    direct (n, 6) int32: rows kept whole, [block, full_lo, full_hi, part_lo, part_hi, block];
    split (c, 6) int32: chunks of the long rows, the last column the chunk's scratch block;
    long_blocks (L,): the blocks of the long rows; chunk_index (L, Cmax): each long row's
    chunks, padded with c (an extra scratch block that merges as nothing)."""

    def __init__(self, full_ptr, part_ptr, block: int, n: int, device):
        full_ptr, part_ptr = full_ptr.long().cpu(), part_ptr.long().cpu()
        nf, np_ = full_ptr.diff(), part_ptr.diff()
        lengths = nf + np_
        chunk = _chunk_length(lengths)
        direct, split, long_blocks, chunks_of = [], [], [], []
        for r, total in enumerate(lengths.tolist()):
            f0, f1, p0 = int(full_ptr[r]), int(full_ptr[r + 1]), int(part_ptr[r])
            if total <= chunk:
                direct.append((r, f0, f1, p0, p0 + int(np_[r]), r))
                continue
            long_blocks.append(r)
            ids, nfr = [], f1 - f0
            for s in range(0, total, chunk):  # positions in the row's full list then partial list
                e = min(s + chunk, total)
                ids.append(len(split))
                split.append((r, f0 + min(s, nfr), f0 + min(e, nfr), p0 + max(s - nfr, 0), p0 + max(e - nfr, 0),
                              len(split)))
            chunks_of.append(ids)
        as_items = lambda rows: torch.tensor(rows or [(0,) * 6], dtype=torch.int32, device=device)
        self.direct, self.n_direct = as_items(direct), len(direct)
        self.split, self.n_split = as_items(split), len(split)
        self.long_blocks = torch.tensor(long_blocks, dtype=torch.long, device=device)
        cmax = max((len(c) for c in chunks_of), default=0)
        self.chunk_index = torch.tensor([c + [len(split)] * (cmax - len(c)) for c in chunks_of],
                                        dtype=torch.int32, device=device).reshape(len(chunks_of), cmax)
        # the token indices of the long rows' blocks below n, in block order (built once: a
        # boolean filter per call would synchronise with the GPU and break graph capture)
        tokens = [t for r in long_blocks for t in range(r * block, min((r + 1) * block, n))]
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=device)

    def combine(self, scratch: torch.Tensor, block: int, dest: torch.Tensor, scratch_lse=None, dest_lse=None):
        """dest[:, :, tokens of the long rows] = their chunks in `scratch` combined: merged by
        their LSE in `scratch_lse` (the forward; the merged LSE to `dest_lse`) or summed."""
        b, h = dest.shape[:2]
        d, d_pad = _dims(dest)
        rows = 16  # layout blocks are multiples of 16
        merge = scratch_lse is not None
        ls, dl = (scratch_lse, dest_lse) if merge else (scratch, dest)
        _combine_chunks_kernel[(len(self.long_blocks) * (block // rows), b * h)](
            scratch, ls, self.chunk_index, self.tokens, dest, dl, self.tokens.numel(), h,
            self.chunk_index.shape[1], scratch.stride(0), scratch.stride(1), scratch.stride(2),
            ls.stride(0), ls.stride(1), dest.stride(0), dest.stride(1), dest.stride(2), dl.stride(0), dl.stride(1),
            LAYOUT_B=block, ROWS=rows, HEAD_DIM=d, D_PAD=d_pad, MERGE=merge,
            num_warps=4)


class _KernelProgram:
    """What the kernels read of a layout, cached on it: int32 attributes, tables, the
    constexpr program, index lists and the work lists on the right device."""

    def __init__(self, layout, device):
        prog = layout.program
        self.program, tab = _lower_program(prog)
        self.attrs = _int32(prog.attrs, "mask attribute").to(device)  # (A, N)
        self.tab = (_int32(tab, "coarse table") if tab is not None else torch.zeros(1, dtype=torch.int32)).to(device)
        self.lists = {
            name: getattr(layout, name).to(device=device, dtype=torch.int32).contiguous()
            for name in ("q_full_idx", "q_part_idx", "k_full_idx", "k_part_idx")
        }
        # empty index lists still need a valid pointer
        for name, t in self.lists.items():
            if t.numel() == 0:
                self.lists[name] = torch.zeros(1, dtype=torch.int32, device=device)
        self.rows = _WorkList(layout.q_full_ptr, layout.q_part_ptr, layout.block_q, layout.n, device)  # fwd, dQ
        self.cols = _WorkList(layout.k_full_ptr, layout.k_part_ptr, layout.block_k, layout.n, device)  # dK, dV
        self.has_partial = layout.num_partial > 0
        self.tile_bytes = layout.num_partial * layout.block_q * layout.block_k
        self._layout, self._device, self._tiles = layout, device, None
        self._subs: dict = {}

    def mask_tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tiles (P, bq, bk) uint8, k_part_ord (P,) int32), built on first use by one launch
        of `_mask_tiles_kernel`: every partial block's mask, one byte per pair, in the order of
        q_part_idx; k_part_ord maps the column-ordered list (k_part_idx) to that order."""
        if self._tiles is None:
            from mmsparse.attention.blocklayout import _rows_of

            _make_room_for_tiles(self)
            lay, dev = self._layout, self._device
            qb, kb = _rows_of(lay.q_part_ptr).long(), lay.q_part_idx.long()
            pairs = torch.stack([qb, kb], 1).to(device=dev, dtype=torch.int32).contiguous()
            tiles = torch.empty(lay.num_partial, lay.block_q, lay.block_k, dtype=torch.uint8, device=dev)
            rows = 16  # layout blocks are multiples of 16
            _mask_tiles_kernel[(lay.num_partial, lay.block_q // rows)](
                self.attrs, self.attrs.stride(0), self.tab, pairs, tiles, lay.n,
                LAYOUT_BQ=lay.block_q, LAYOUT_BK=lay.block_k, COLS=triton.next_power_of_2(lay.block_k),
                ROWS=rows, PROGRAM=self.program, num_warps=4)
            # the row-ordered list is sorted by (qb, kb): find each column entry's (qb, kb) in it
            mk = lay.num_k_blocks
            key_col = lay.k_part_idx.long() * mk + _rows_of(lay.k_part_ptr).long()
            ordinal = torch.searchsorted(qb * mk + kb, key_col)
            self._tiles = (tiles, ordinal.to(device=dev, dtype=torch.int32).contiguous())
        _TILE_HOLDERS[id(self)] = weakref.ref(self)  # most recently used last
        _TILE_HOLDERS.move_to_end(id(self))
        return self._tiles

    def sub_lists(self, side: str, bm: int, bn: int):
        """The partial-block loop of each program over the kernel tiles that attend something.

        A partial block is cut into (bm x bn) kernel tiles; where a block straddles a window's
        edge many of them attend no pair at all (E1 captioner at 512 frames: 34 % of the dK / dV
        kernel's 32 x 64 tiles, 15 % of the forward's 128 x 64; `bench/NOTES.md` v8). From the
        mask tiles, this lists per program (a `side` "q" query tile of the row work list, or a
        "k" key tile of the column list) the loop positions i whose tile is not empty:
        (entries int32, ranges of the direct items, ranges of the split items), ranges
        (items x tiles per block, 2) int32 into entries, indexed by the program id."""
        key = (side, bm, bn)
        if key not in self._subs:
            lay = self._layout
            tiles, k_ord = self.mask_tiles()
            sq, sk = lay.block_q // bm, lay.block_k // bn
            occ = tiles.view(lay.num_partial, sq, bm, sk, bn).amax(dim=(2, 4)) != 0  # (P, SQ, SK)
            if side == "q":  # program: query tile s of a row; loop i = ordinal * SK + key tile
                work, inner = self.rows, sk
                valid = [occ[:, t, :].reshape(-1) for t in range(sq)]
            else:  # program: key tile s of a column; loop i = column position * SQ + query tile
                work, inner = self.cols, sq
                occ = occ[k_ord.long()]
                valid = [occ[:, :, t].reshape(-1) for t in range(sk)]
            idx = [v.nonzero().flatten() for v in valid]
            base = [0]
            for ix in idx:
                base.append(base[-1] + ix.numel())
            dev = tiles.device
            entries = torch.cat(idx).to(torch.int32) if base[-1] else torch.zeros(1, dtype=torch.int32, device=dev)
            ranges = []
            for items, count in ((work.direct, work.n_direct), (work.split, work.n_split)):
                lo, hi = items[:count, 3].long() * inner, items[:count, 4].long() * inner
                r = torch.zeros(max(count, 1), len(idx), 2, dtype=torch.int32, device=dev)
                for t, ix in enumerate(idx):
                    r[:count, t, 0] = (torch.searchsorted(ix, lo) + base[t]).to(torch.int32)
                    r[:count, t, 1] = (torch.searchsorted(ix, hi) + base[t]).to(torch.int32)
                ranges.append(r.reshape(-1).contiguous())
            self._subs[key] = (entries.contiguous(), ranges[0], ranges[1])
        return self._subs[key]


# Partial blocks' masks: from the program in registers (loads of a few attribute vectors and a
# few integer operations per pair and predicate, every tile of every head), or read from tiles
# precomputed once per layout (one byte per pair, a coalesced load like a K tile's). "auto"
# takes the tiles while they fit MMSPARSE_MASK_TILE_MB (default 2048) of device memory, a budget
# shared by every cached layout: the least recently used layouts' tiles are dropped to make room
# (rebuilt on their next use, a few ms), so a training run over many frame spacings (one
# layout each) holds at most that much. "0" / "1" force the program / the tiles. Tests set
# _MASK_TILES.
_MASK_TILES: str | None = None
_MASK_TILE_MB_DEFAULT = 2048
# kernel programs holding tiles, least recently used first; weak, so a layout dropped from the
# layout cache frees its tiles with it
_TILE_HOLDERS: "OrderedDict[int, weakref.ref]" = OrderedDict()


def _tile_budget() -> float:
    return float(os.environ.get("MMSPARSE_MASK_TILE_MB", _MASK_TILE_MB_DEFAULT)) * 2**20


def _make_room_for_tiles(kp: "_KernelProgram") -> None:
    """Drop the least recently used layouts' tiles until kp's fit the budget next to the rest."""
    for key in [k for k, ref in _TILE_HOLDERS.items() if ref() is None or ref()._tiles is None]:
        del _TILE_HOLDERS[key]
    held = sum(ref().tile_bytes for ref in _TILE_HOLDERS.values())
    budget = _tile_budget()
    while _TILE_HOLDERS and held + kp.tile_bytes > budget:
        _, ref = _TILE_HOLDERS.popitem(last=False)
        old = ref()
        if old is not None:
            old._tiles, old._subs = None, {}
            held -= old.tile_bytes


def _use_mask_tiles(kp: "_KernelProgram") -> bool:
    mode = _MASK_TILES or os.environ.get("MMSPARSE_MASK_TILES", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MMSPARSE_MASK_TILES must be auto, 0 or 1, got {mode!r}")
    if not kp.has_partial or not kp.program or mode == "0":
        return False
    if mode == "1":
        return True
    return kp.tile_bytes <= _tile_budget()


def _skip_empty(mask_tiles: bool) -> bool:
    """Whether the partial-block loops skip the kernel tiles that attend nothing (with mask
    tiles only: the lists come from them); MMSPARSE_SKIP_EMPTY_TILES=0 turns it off."""
    return mask_tiles and os.environ.get("MMSPARSE_SKIP_EMPTY_TILES", "1") != "0"


def _tile_args(kp: "_KernelProgram"):
    """(MT, k_part_ord, MASK_TILES) kernel arguments: the tiles, or dummy pointers."""
    if _use_mask_tiles(kp):
        tiles, ordinal = kp.mask_tiles()
        return tiles, ordinal, True
    return kp.tab, kp.tab, False


def _kernel_program(layout, device) -> _KernelProgram:
    cache = layout.__dict__.setdefault("_triton_programs", {})
    key = (str(device), _SPLIT_CHUNK)
    if key not in cache:
        cache[key] = _KernelProgram(layout, device)
    return cache[key]


def _dims(q):
    d = q.shape[-1]
    return d, max(16, triton.next_power_of_2(d))


def _dot_prec(dtype) -> str:
    # float32 inputs keep float32 accuracy: three tf32 products on the GPU (plain tf32 would
    # spend the error budget, "ieee" runs on the FMA units and spills), exact in the interpreter
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    return "ieee" if _interpreting() else "tf32x3"


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _autotune_key(kernel, d_pad, q, layout):
    return (kernel, d_pad, q.dtype, layout.block_q, layout.block_k, _partial_heavy(layout), str(q.device))


def _maybe_tune(kernel, d_pad, q, layout, launch):
    """Time the candidate configs once per key when MMSPARSE_TRITON_AUTOTUNE=1."""
    if os.environ.get("MMSPARSE_TRITON_AUTOTUNE") != "1" or q.device.type != "cuda" or _OVERRIDE.get(kernel):
        return
    key = _autotune_key(kernel, d_pad, q, layout)
    if key in _TUNED or q.dtype == torch.float32:
        return
    best, best_ms = None, float("inf")
    default = _default_config(kernel, d_pad, q.dtype, layout)
    for cand in dict.fromkeys([default] + _CANDIDATES[kernel]):
        cfg = (_fit(cand[0], layout.block_q), _fit(cand[1], layout.block_k), cand[2], cand[3])
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=25)
        except Exception as err:  # out of shared memory and the like
            log.debug("autotune %s %s failed: %s", kernel, cfg, err)
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is not None:
        _TUNED[key] = best
        log.info("autotune %s D_PAD=%d %s layout %dx%d: %s (%.3f ms; default %s)", kernel, d_pad,
                 str(q.dtype)[6:], layout.block_q, layout.block_k, best, best_ms, default)


def _scratch(like: torch.Tensor, work: _WorkList, block: int, fill: float = 0.0) -> torch.Tensor:
    """float32 (B, H, (chunks + 1) * block, *rest) for the split rows' partial results; the last
    block is the padding chunk, set to `fill`."""
    t = torch.empty(*like.shape[:2], (work.n_split + 1) * block, *like.shape[3:], device=like.device,
                    dtype=torch.float32)
    t[:, :, work.n_split * block:] = fill
    return t


def _launch_items(kernel, work: _WorkList, tile: int, layout_block: int, bh: int, args, direct, split,
                  subs=None, **kw):
    """Launch `kernel` over the direct rows, writing the outputs `direct`, and, where rows were
    split, over their chunks, writing the scratch outputs `split`; `args(items, outputs, sub)`
    gives the kernel's positional arguments, sub the (SUB_ENTRIES, SUB_RANGES) of that launch
    from `subs` (`_KernelProgram.sub_lists`; None: SKIP_EMPTY is off, dummy pointers)."""
    per_block = layout_block // tile
    for which, (items, count, outs) in enumerate(((work.direct, work.n_direct, direct),
                                                  (work.split, work.n_split, split))):
        if count:
            sub = (items, items) if subs is None else (subs[0], subs[1 + which])
            kernel[(count * per_block, bh)](*args(items, outs, sub), **kw)


def _tma_mode() -> str:
    mode = os.environ.get("MMSPARSE_TRITON_TMA", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MMSPARSE_TRITON_TMA must be auto, 0 or 1, got {mode!r}")
    return mode


def _use_tma(k, v, block_n: int, d_pad: int) -> bool:
    """Whether the forward loads K and V through tensor descriptors (the copy engine): 16-bit
    tensors whose base and every stride but the head dim's are 16-byte aligned, on a Hopper or
    newer GPU (MMSPARSE_TRITON_TMA=auto, the default; 0 turns it off) or, with =1, the CPU under
    the interpreter (tests). 2-6 % faster forwards on the H200 (bench/NOTES.md, session 12)."""
    mode = _tma_mode()
    if mode == "0" or k.dtype not in (torch.float16, torch.bfloat16):
        return False
    if k.is_cuda and torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    if not k.is_cuda and not (_interpreting() and mode == "1"):
        return False
    return all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:3]) and t.stride(3) == 1
               and t.shape[3] * t.element_size() >= 16 for t in (k, v))


def _tma_backward() -> bool:
    """The backward passes take descriptors too unless MMSPARSE_TRITON_TMA_BWD=0 (an A/B switch
    of the session-12 measurement, bench/NOTES.md)."""
    return os.environ.get("MMSPARSE_TRITON_TMA_BWD", "1") != "0"


def _descriptor(t: torch.Tensor, block_n: int, d_pad: int):
    """A (B, H, N, D) tensor's descriptor, boxes of (1, 1, block_n, d_pad)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, d_pad])


def _padding_flags(key_padding, q):
    """key_padding (B, N) bool or None -> (int8 flags or a dummy pointer, batch stride, HAS_KPM)."""
    if key_padding is None:
        return q, 0, False
    flags = key_padding.to(device=q.device, dtype=torch.int8).contiguous()
    return flags, flags.stride(0), True


def _attention_forward(q, k, v, layout, scale, out=None, lse=None, key_padding=None):
    """q (B, H, N, D), k / v (B, Hk, N, D) -> out (B, H, N, D) q.dtype, lse (B, H, N) float32.
    key_padding (B, N) bool: True where a key is padding (never attended)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    b, h, n, _ = q.shape
    hk = k.shape[1]
    d, d_pad = _dims(q)
    kp = _kernel_program(layout, q.device)
    rows = kp.rows
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32) if lse is None else lse
    kpm, stride_kpm, has_kpm = _padding_flags(key_padding, q)
    split = None
    if rows.n_split:
        split = (_scratch(q, rows, layout.block_q), _scratch(lse, rows, layout.block_q, float("-inf")))

    mt, _, mask_tiles = _tile_args(kp)
    desc = {}

    def args(items, outs, sub):
        o, l = outs
        return (q, k, v, desc.get("k", k), desc.get("v", v), o, l, kp.attrs, kp.tab, mt, kpm, items, kp.lists["q_full_idx"], kp.lists["q_part_idx"], *sub,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                o.stride(0), o.stride(1), o.stride(2), l.stride(1),
                kp.attrs.stride(0), stride_kpm, n, h, scale * _LOG2E)

    skip = _skip_empty(mask_tiles)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        tma = _use_tma(k, v, bn, d_pad)
        if tma:
            desc["k"], desc["v"] = _descriptor(k, bn, d_pad), _descriptor(v, bn, d_pad)
        else:
            desc.clear()
        _launch_items(_fwd_kernel, rows, bm, layout.block_q, b * h, args, (out, lse), split,
                      kp.sub_lists("q", bm, bn) if skip else None,
                      GROUP=h // hk, HEAD_DIM=d, D_PAD=d_pad,
                      LAYOUT_BQ=layout.block_q, LAYOUT_BK=layout.block_k, BLOCK_M=bm, BLOCK_N=bn,
                      PROGRAM=kp.program, HAS_PARTIAL=kp.has_partial, EVEN_N=n % layout.block_k == 0,
                      DOT_PREC=_dot_prec(q.dtype), HAS_KPM=has_kpm, MASK_TILES=mask_tiles,
                      SKIP_EMPTY=skip, TMA=tma, num_warps=warps, num_stages=stages)

    _maybe_tune("fwd", d_pad, q, layout, launch)
    launch(_config("fwd", d_pad, q, layout))
    if split is not None:  # merge the chunks of each long row by their LSE
        rows.combine(split[0], layout.block_q, out, split[1], lse)
    return out, lse


def _attention_backward(q, k, v, out, lse, dout, layout, scale, dq=None, dk=None, dv=None, dlse=None,
                        key_padding=None):
    """Gradients of (out, lse) = attention(q, k, v) given dout (and dlse (B, H, N) or None):
    dq (like q), dk, dv (like k, v)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    out, dout = _last_contiguous(out), _last_contiguous(dout)
    b, h, n, _ = q.shape
    hk = k.shape[1]
    d, d_pad = _dims(q)
    kp = _kernel_program(layout, q.device)
    rows, cols = kp.rows, kp.cols
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv

    # delta = rowsum(dO * O)
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    pre_m = 64
    _bwd_preprocess[(triton.cdiv(n, pre_m), b * h)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), n, h,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=pre_m,
    )
    if dlse is not None:
        # d lse_i / d s_ij = P_ij, so dS = P * (dP - delta + dlse): dlse shifts delta
        delta -= torch.where(torch.isfinite(lse), dlse.float(), 0.0)
    kpm, stride_kpm, has_kpm = _padding_flags(key_padding, q)
    mt, k_part_ord, mask_tiles = _tile_args(kp)
    skip = _skip_empty(mask_tiles)
    common = dict(GROUP=h // hk, HEAD_DIM=d, D_PAD=d_pad, LAYOUT_BQ=layout.block_q,
                  LAYOUT_BK=layout.block_k, PROGRAM=kp.program, HAS_PARTIAL=kp.has_partial,
                  DOT_PREC=_dot_prec(q.dtype), HAS_KPM=has_kpm, MASK_TILES=mask_tiles, SKIP_EMPTY=skip)
    dq_split = _scratch(q, rows, layout.block_q) if rows.n_split else None
    dkdv_split = (_scratch(k, cols, layout.block_k), _scratch(v, cols, layout.block_k)) if cols.n_split else None

    desc = {}

    def dq_args(items, g, sub):
        return (q, k, v, desc.get("k", k), desc.get("v", v), dout, g, lse, delta, kp.attrs, kp.tab, mt, kpm, items, kp.lists["q_full_idx"],
                kp.lists["q_part_idx"], *sub,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                g.stride(0), g.stride(1), g.stride(2),
                kp.attrs.stride(0), stride_kpm, n, h, scale * _LOG2E, scale)

    def dkdv_args(items, g, sub):
        gk, gv = g
        return (q, k, v, dout, desc.get("q", q), desc.get("do", dout), gk, gv, lse, delta, kp.attrs, kp.tab, mt, k_part_ord, kpm, items,
                kp.lists["k_full_idx"], kp.lists["k_part_idx"], *sub,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                gk.stride(0), gk.stride(1), gk.stride(2),
                gv.stride(0), gv.stride(1), gv.stride(2),
                kp.attrs.stride(0), stride_kpm, n, hk, scale * _LOG2E, scale)

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        tma = _use_tma(k, v, bn, d_pad) and _tma_backward()
        desc.clear()
        if tma:
            desc["k"], desc["v"] = _descriptor(k, bn, d_pad), _descriptor(v, bn, d_pad)
        _launch_items(_bwd_dq_kernel, rows, bm, layout.block_q, b * h, dq_args, dq, dq_split,
                      kp.sub_lists("q", bm, bn) if skip else None,
                      BLOCK_M=bm, BLOCK_N=bn, EVEN_N=n % layout.block_k == 0, TMA=tma, num_warps=warps,
                      num_stages=stages, **common)

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        tma = _use_tma(q, dout, bm, d_pad) and _tma_backward()
        desc.clear()
        if tma:
            desc["q"], desc["do"] = _descriptor(q, bm, d_pad), _descriptor(dout, bm, d_pad)
        _launch_items(_bwd_dkdv_kernel, cols, bn, layout.block_k, b * hk, dkdv_args, (dk, dv), dkdv_split,
                      kp.sub_lists("k", bm, bn) if skip else None,
                      BLOCK_M=bm, BLOCK_N=bn, TMA=tma, num_warps=warps, num_stages=stages, **common)

    _maybe_tune("dq", d_pad, q, layout, launch_dq)
    launch_dq(_config("dq", d_pad, q, layout))
    _maybe_tune("dkdv", d_pad, q, layout, launch_dkdv)
    launch_dkdv(_config("dkdv", d_pad, q, layout))
    if dq_split is not None:  # the chunks' partial gradients, summed in a fixed order
        rows.combine(dq_split, layout.block_q, dq)
    if dkdv_split is not None:
        cols.combine(dkdv_split[0], layout.block_k, dk)
        cols.combine(dkdv_split[1], layout.block_k, dv)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# 4. Autograd and the public functional
# ---------------------------------------------------------------------------------------------


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, key_padding):
        out, lse = _attention_forward(q, k, v, layout, scale, key_padding=key_padding)
        ctx.save_for_backward(q, k, v, out, lse)
        # an output nobody differentiates (the LSE, in a model) arrives as None in the
        # backward instead of a tensor of zeros: no allocation, no delta correction
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.scale, ctx.key_padding = layout, scale, key_padding
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _attention_backward(q, k, v, out, lse, dout, ctx.layout, ctx.scale, dlse=dlse,
                                         key_padding=ctx.key_padding)
        return dq, dk, dv, None, None, None


def block_sparse_attention(q, k, v, layout, scale: float | None = None, key_padding_mask=None):
    """Block-sparse attention over `layout` with the Triton kernels.

    Args:
        q: (B, H, N, D) queries; k, v: (B, Hk, N, D), H a multiple of Hk (GQA).
            float16, bfloat16 or float32; D <= 256; CUDA tensors (or CPU under TRITON_INTERPRET=1).
        layout: a BlockLayout for these N tokens (mmsparse.attention.build_layout), blocks
            multiples of 16; moved to q's device if needed.
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: (B, N) bool, True where a key is padding: never attended (applied in
            full blocks too), so its dk / dv are zero.

    Returns:
        out (B, H, N, D) in q's dtype and lse (B, H, N) float32 (natural log; -inf for rows
        that attend nothing). Both differentiable in q, k, v (d lse / d s = P, which merging
        attention results by their LSE needs).
    """
    _check(q, k, v, layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    layout = layout.to(q.device)
    check_key_padding_mask(key_padding_mask, q)
    return _BlockSparseAttention.apply(q, k, v, layout, scale, key_padding_mask)


# ---------------------------------------------------------------------------------------------


def sweep(pattern, tokens, heads: int, head_dim: int, kernels=("fwd", "dq", "dkdv"), layout=None,
          candidates=None):
    """Time every candidate tile config of each kernel on one workload (CUDA, bf16): `pattern`
    over `tokens`, or a ready `layout` (then pattern and tokens are unused); `candidates` (kernel
    -> configs) replaces _CANDIDATES for the kernels it names.

    Returns rows (kernel, config, ms): forward alone for "fwd", the whole backward with the
    other backward kernel at its default for "dq" / "dkdv"."""
    from mmsparse.attention import build_layout

    if layout is None:
        layout = build_layout(pattern, tokens, device="cuda")
    n, d_pad = layout.n, max(16, triton.next_power_of_2(head_dim))
    q, k, v, dout = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = head_dim**-0.5
    out, lse = _attention_forward(q, k, v, layout, scale)
    rows = []
    for kernel in kernels:
        pool = (candidates or {}).get(kernel, _CANDIDATES[kernel])
        for cand in dict.fromkeys([_default_config(kernel, d_pad, q.dtype, layout)] + list(pool)):
            _OVERRIDE[kernel] = cand
            try:
                if kernel == "fwd":
                    fn = lambda: _attention_forward(q, k, v, layout, scale)
                else:
                    fn = lambda: _attention_backward(q, k, v, out, lse, dout, layout, scale)
                ms = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
            except Exception as err:  # out of resources and the like
                ms = float("nan")
                log.warning("sweep %s %s: %s", kernel, cand, str(err).splitlines()[0][:120])
            finally:
                _OVERRIDE.pop(kernel, None)
            rows.append((kernel, cand, ms))
            print(f"{kernel:5s} {str(cand):20s} {ms:8.3f} ms", flush=True)
    return rows


def main():  # python -m mmsparse.kernels.block_sparse_attention [--sweep]
    """Compare with the reference on a small 3D window (interpreter on a CPU); on a GPU, time it,
    and with --sweep time the tile candidates on a tile-aligned and a token-level window."""
    import sys

    from mmsparse.attention import Local, Segment, StreamLayout, Tiled, bigbird, build_layout, longformer

    cuda = torch.cuda.is_available()
    if cuda and "--sweep" in sys.argv:  # --sweep [NAME,NAME...] [--kernels dq,dkdv]: a subset
        a3 = StreamLayout.from_grid((16, 32, 32), order=(4, 4, 8))
        a2_tiles = StreamLayout.from_grid((32, 48, 48), order=(4, 4, 8))
        workloads = {
            "A3-8x128": (Tiled((4, 4, 8), 1), a3, 8, 128),
            "A3-16x64": (Tiled((4, 4, 8), 1), a3, 16, 64),
            "A1-16x64": (Local((5, 9, 9)), (16, 32, 32), 16, 64),
            "A1-8x128": (Local((5, 9, 9)), (16, 32, 32), 8, 128),
            "A2-8x128": (Local((7, 13, 13)), (32, 48, 48), 8, 128),
            "A2tile-8x128": (Local((7, 13, 13)), a2_tiles, 8, 128),
            # BENCHMARKS.md's A5 presets on 64-token blocks, as bench/attention.py runs them
            "A5-longformer": (longformer(513, 64), (65536,), 16, 64, 64),
            "A5-bigbird": (bigbird(513, 64, 3, 64), (65536,), 16, 64, 64),
        }
        at = sys.argv.index("--sweep") + 1
        given = at < len(sys.argv) and not sys.argv[at].startswith("--")
        names = sys.argv[at].split(",") if given else ["A3-8x128", "A3-16x64", "A1-16x64", "A1-8x128"]
        kernels = ("fwd", "dq", "dkdv")
        if "--kernels" in sys.argv:
            kernels = tuple(sys.argv[sys.argv.index("--kernels") + 1].split(","))
            if not set(kernels) <= set(_CANDIDATES):
                raise SystemExit(f"--kernels: expected names among {', '.join(_CANDIDATES)}, got {kernels}")
        for name in names:
            if name not in workloads:
                raise SystemExit(f"--sweep: unknown workload {name!r}; known: {', '.join(workloads)}")
            pattern, tokens, h, d, *block = workloads[name]
            layout = build_layout(pattern, tokens, *block, *block, device="cuda") if block else None
            print(f"# sweep {name}", flush=True)
            sweep(pattern, tokens, h, d, kernels, layout=layout)
        return
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float16
    grid = (8, 16, 16) if cuda else (3, 5, 7)
    stream = StreamLayout((Segment("video", grid, order=(2, 4, 4) if cuda else "raster"),))
    blk = 128 if cuda else 32
    layout = build_layout(Local((3, 5, 5) if cuda else (3, 3, 3)), stream, blk, blk, dev)
    print(layout.summary())
    n = layout.n
    q, k, v = (torch.randn(1, 4, n, 64, device=dev, dtype=dtype) for _ in range(3))
    out, lse = block_sparse_attention(q, k, v, layout)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, layout)
    print(f"max |out - ref| = {(out.float() - ref.float()).abs().max():.3e}, "
          f"max |lse - ref| = {(lse - ref_lse).abs().max():.3e}")
    if cuda:
        ms = triton.testing.do_bench(lambda: block_sparse_attention(q, k, v, layout), return_mode="median")
        flops = 4 * layout.attended_pairs() * 64 * 4
        print(f"forward {ms:.3f} ms, {flops / ms * 1e-9:.1f} effective TFLOP/s")


if __name__ == "__main__":
    main()
