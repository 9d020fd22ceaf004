"""The mask program on the GPU: its lowering to constexpr ints, its evaluation on a tile, and
the precomputed per-pair mask tiles of partial blocks.

The mask program (mmsparse/attention/program.py) is lowered to a flat tuple of ints, five per
predicate (kind, a, b, c, d), with kind 0 separating the clauses of the DNF. Attribute 0 is
the token position and is never loaded (the tile offsets are the positions). Coarse tables
(Random, BlockSparse) are concatenated into one int32 buffer; a coarse predicate loads its
query rows (a few int32 per query) and compares them with the key groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# predicate kinds in the kernel's encoding (0 separates clauses)
PREDICATE_KINDS = {"eq": 1, "ne": 2, "range": 3, "cong": 4, "qflag": 5, "kflag": 6, "le": 7, "coarse": 8}


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
def program_mask(ATTR, stride_attr, TAB, oq, ok, N, PROGRAM: tl.constexpr):
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
def tile_keep(MT, ordinal, rows, cols, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr):
    """A partial block's precomputed mask (one uint8 per pair, `mask_tiles_kernel`) on a tile.

    ordinal: the block's position in the row-ordered partial list; rows / cols: offsets within
    the layout block, shaped to broadcast ((BM, 1) and (1, BN), or transposed for dK / dV)."""
    base = MT + tl.cast(ordinal, tl.int64) * (LAYOUT_BQ * LAYOUT_BK)
    return tl.load(base + rows * LAYOUT_BK + cols) != 0


@triton.jit
def mask_tiles_kernel(ATTR, stride_attr, TAB, PAIRS, MT, N,
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
    keep = program_mask(ATTR, stride_attr, TAB, oq, ok, N, PROGRAM) & (oq < N)
    ptrs = MT + p.to(tl.int64) * (LAYOUT_BQ * LAYOUT_BK) + rows[:, None] * LAYOUT_BK + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=cols[None, :] < LAYOUT_BK)


def _simplify(clauses, attrs) -> list:
    """The clauses without predicates that are constant over all N tokens (e.g. `eq segment`
    on a one-segment stream): fewer operations per element of a partial block."""
    const = {}

    def constant(a):
        if a not in const:
            col = attrs[a]
            const[a] = int(col[0]) if a != 0 and bool((col == col[0]).all()) else None
        return const[a]

    kept_clauses = []
    for clause in clauses:
        kept, false = [], False
        for pred in clause:
            kind, c = pred[0], constant(pred[1]) if pred[0] in ("eq", "ne", "qflag", "kflag") else None
            if c is None:
                kept.append(pred)
            elif kind == "ne" or (kind in ("qflag", "kflag") and c == 0):
                false = True
        if not false:
            kept_clauses.append(tuple(kept))
    if not kept_clauses:  # nothing ever attends: keep one original (false) clause
        return [clauses[0]]
    return kept_clauses


def lower_program(clauses, attrs, tables) -> tuple[tuple, torch.Tensor | None]:
    """A mask program (its DNF `clauses` of predicate tuples, `attrs` (A, N) and coarse
    `tables`, as `mmsparse.attention.program.MaskProgram` holds them) as the kernel's flat
    constexpr tuple (empty: every pair attends), and the concatenated coarse tables."""
    coarse = tables
    clauses = _simplify(clauses, attrs) if clauses else []
    if any(len(c) == 0 for c in clauses):
        return (), None
    flat, tables, offset = [], [], 0  # tables: the ones the kernel reads, concatenated
    table_at = {}
    for ci, clause in enumerate(clauses):
        if ci:
            flat += [0, 0, 0, 0, 0]
        for pred in clause:
            kind = pred[0]
            if kind == "coarse":
                t, gq, gk = pred[1:]
                if t not in table_at:
                    tab = coarse[t]
                    table_at[t] = (offset, tab.shape[1])
                    tables.append(tab.reshape(-1))
                    offset += tab.numel()
                off, width = table_at[t]
                flat += [PREDICATE_KINDS[kind], off, gq, gk, width]
            else:
                args = list(pred[1:]) + [0] * (4 - len(pred[1:]))
                flat += [PREDICATE_KINDS[kind]] + [int(a) for a in args]
    tab = torch.cat(tables) if tables else None
    return tuple(flat), tab


def as_int32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and (int(t.max()) >= 2**31 or int(t.min()) < -(2**31)):
        raise ValueError(f"{what} values do not fit int32")
    return t.to(torch.int32).contiguous()

