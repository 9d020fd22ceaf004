"""The BlockLayout compiler: pattern + stream layout -> the block structure kernels consume.

Legend: N tokens, Mq / Mk query / key blocks of block_q / block_k tokens, P runs ("pieces")
of tokens, A mask-program attributes, nnz listed block pairs.

For each query block the layout lists the key blocks that are *full* (every query attends
every key: no mask arithmetic) and those that are *partial* (the kernel evaluates the mask
program on token attributes), as CSR index lists; the transposed lists (per key block, its
query blocks) drive the backward pass over dK and dV.

How it is built, with no N x N mask and no N^2 loop:
1. The pattern lowers to a mask program (per-token attributes + a DNF formula).
2. Each block is cut into pieces: runs of consecutive tokens along the fastest grid axis of
   one segment, or the whole block when its tokens form one box of the grid (tile order).
   Inside a box each attribute varies independently, so interval tests are exact per
   predicate.
3. Every (query block, key block) pair is tested on the blocks' attribute intervals (chunked;
   O(Mq x Mk) small integer operations, not O(N^2)); the surviving pairs whose blocks are
   not single boxes are re-tested piece by piece.
4. A pair is full when every piece pair is all-true, partial when some may attend.

Layouts are cached by (pattern, stream layout, block sizes, device).
Layouts derived from a built one (`split_full`: its full and its partial blocks apart;
`with_full_keys`: more keys attended fully) are cached on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from mmsparse.kernels.block_sparse.lists import BlockCSR, rows_of

from .patterns import Pattern
from .program import MaskProgram
from .stream import StreamLayout, as_stream_layout, token_table

_PAIR_CHUNK = 1 << 19  # block pairs tested at once (bounds the compiler's memory)


@dataclass(eq=False)
class BlockLayout(BlockCSR):
    """What a sparse attention kernel consumes: the block structure as CSR lists (BlockCSR:
    n, block sizes, q_full_ptr (Mq + 1,), q_full_idx (nnz_full,) the key blocks attended fully
    by each query block, q_part_* those attended partially, k_* the transposes for the dK / dV
    pass), all int32 on `device`, and
    program: the token-level mask program evaluated inside partial blocks.
    """

    program: MaskProgram
    pattern: Pattern | None = None
    stream: StreamLayout | None = None
    _attended: int | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.q_full_ptr.device

    @property
    def block_density(self) -> float:
        """Listed block pairs / all block pairs."""
        return (self.num_full + self.num_partial) / (self.num_q_blocks * self.num_k_blocks)

    def computed_pairs(self) -> int:
        """Query-key pairs inside listed blocks (clipped to N): what a kernel computes."""
        return _pairs_in_blocks(self, self.q_full_ptr, self.q_full_idx) + _pairs_in_blocks(
            self, self.q_part_ptr, self.q_part_idx
        )

    def attended_pairs(self) -> int:
        """Exact number of attending (query, key) pairs; evaluates the partial blocks once."""
        if self._attended is None:
            count = _pairs_in_blocks(self, self.q_full_ptr, self.q_full_idx)
            chunk = max(64, (1 << 24) // (self.block_q * self.block_k))
            for qi, ki, valid in self.iter_partial_blocks(chunk):
                count += int((self.program.evaluate(qi, ki) & valid).sum())
            self._attended = count
        return self._attended

    def density(self) -> float:
        return self.attended_pairs() / (self.n * self.n)

    def utilization(self) -> float:
        """Attended pairs / computed pairs: how much of each computed block is useful."""
        computed = self.computed_pairs()
        return self.attended_pairs() / computed if computed else 1.0

    def iter_partial_blocks(self, chunk: int = 64):
        """Yield (qi (G, bq, 1), ki (G, 1, bk), valid) token indices of partial block pairs."""
        qb = rows_of(self.q_part_ptr).long()
        kb = self.q_part_idx.long()
        dq = torch.arange(self.block_q, device=self.device)
        dk = torch.arange(self.block_k, device=self.device)
        for s in range(0, qb.numel(), chunk):
            qi = (qb[s : s + chunk, None] * self.block_q + dq)[:, :, None]
            ki = (kb[s : s + chunk, None] * self.block_k + dk)[:, None, :]
            valid = (qi < self.n) & (ki < self.n)
            yield qi.clamp(max=self.n - 1), ki.clamp(max=self.n - 1), valid

    def dense_mask(self, max_tokens: int = 16384) -> torch.Tensor:
        """(N, N) bool mask assembled from full blocks and evaluated partial blocks."""
        if self.n > max_tokens:
            raise ValueError(f"dense_mask: N={self.n} is above max_tokens={max_tokens}")
        n, bq, bk = self.n, self.block_q, self.block_k
        mq, mk = self.num_q_blocks, self.num_k_blocks
        mask = torch.zeros(mq * bq, mk * bk, dtype=torch.bool, device=self.device)
        view = mask.view(mq, bq, mk, bk)
        qb = rows_of(self.q_full_ptr).long()
        view[qb, :, self.q_full_idx.long(), :] = True
        start = 0
        part_q = rows_of(self.q_part_ptr).long()
        for qi, ki, valid in self.iter_partial_blocks():
            g = qi.shape[0]
            sel = slice(start, start + g)
            view[part_q[sel], :, self.q_part_idx[sel].long(), :] = self.program.evaluate(qi, ki) & valid
            start += g
        return mask[:n, :n]

    def to(self, device) -> "BlockLayout":
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {
            name: getattr(self, name).to(device)
            for name in (
                "q_full_ptr", "q_full_idx", "q_part_ptr", "q_part_idx",
                "k_full_ptr", "k_full_idx", "k_part_ptr", "k_part_idx",
            )
        }
        return BlockLayout(
            self.n, self.block_q, self.block_k, program=self.program.to(device),
            pattern=self.pattern, stream=self.stream, _attended=self._attended, **moved,
        )

    def summary(self) -> str:
        return (
            f"BlockLayout(N={self.n}, blocks {self.block_q}x{self.block_k}, "
            f"{self.num_full} full + {self.num_partial} partial of "
            f"{self.num_q_blocks}x{self.num_k_blocks} ({100 * self.block_density:.2f} %))"
        )


def _pairs_in_blocks(layout: BlockLayout, ptr, idx) -> int:
    rows = rows_of(ptr).long()
    q_len = (torch.clamp(layout.n - rows * layout.block_q, max=layout.block_q)).long()
    k_len = (torch.clamp(layout.n - idx.long() * layout.block_k, max=layout.block_k)).long()
    return int((q_len * k_len).sum())


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class _Pieces:
    lo: torch.Tensor  # (A, P) attribute minima
    hi: torch.Tensor  # (A, P) attribute maxima
    block: torch.Tensor  # (P,) block of each piece
    start: torch.Tensor  # (M + 1,) first piece of each block (pieces of a block are contiguous)
    single: torch.Tensor  # (M,) the block is one piece
    block_lo: torch.Tensor  # (A, M)
    block_hi: torch.Tensor  # (A, M)


def _pieces(stream: StreamLayout, attrs: torch.Tensor, block: int) -> _Pieces:
    table = token_table(stream)
    dev = attrs.device
    n = stream.length
    seg = table.segment.to(dev)
    coords = table.coords.to(dev)
    pos = torch.arange(n, device=dev)
    blk = pos // block
    m = math.ceil(n / block)
    # fastest axis of each token's segment (the last one)
    ndim = torch.zeros(len(stream.segments) + 1, dtype=torch.long, device=dev)
    for i, s in enumerate(stream.segments):
        ndim[i] = s.ndim
    last = (ndim[seg] - 1).clamp(min=0)
    fast = coords.gather(1, last[:, None]).squeeze(1)
    # a run breaks where the segment changes, a slower coordinate changes, or the fastest
    # coordinate does not step by one
    brk = torch.ones(n, dtype=torch.bool, device=dev)
    if n > 1:
        same_seg = seg[1:] == seg[:-1]
        slow_same = torch.ones(n - 1, dtype=torch.bool, device=dev)
        axis = torch.arange(3, device=dev)
        keep = axis[None, :] != last[1:, None]  # compare every axis but the fastest
        slow_same = ((coords[1:] == coords[:-1]) | ~keep).all(1)
        step = (fast[1:] == fast[:-1] + 1) | (seg[1:] < 0)
        brk[1:] = ~(same_seg & slow_same & step)
    brk |= pos % block == 0
    # merge the runs of a block whose tokens form one box of one segment's grid
    big = torch.iinfo(torch.int64).max
    s_lo = torch.full((m,), big, device=dev).scatter_reduce(0, blk, seg, "amin")
    s_hi = torch.full((m,), -big, device=dev).scatter_reduce(0, blk, seg, "amax")
    c_lo = torch.full((m, 3), big, device=dev).scatter_reduce(0, blk[:, None].expand(-1, 3), coords, "amin")
    c_hi = torch.full((m, 3), -big, device=dev).scatter_reduce(0, blk[:, None].expand(-1, 3), coords, "amax")
    count = torch.bincount(blk, minlength=m)
    volume = (c_hi - c_lo + 1).prod(1)
    boxed = (s_lo == s_hi) & (s_lo >= 0) & (volume == count)
    brk &= ~boxed[blk] | (pos % block == 0)
    piece = torch.cumsum(brk.long(), 0) - 1
    p = int(piece[-1]) + 1
    a = attrs.shape[0]
    idx = piece[None, :].expand(a, -1)
    lo = torch.full((a, p), big, device=dev).scatter_reduce(1, idx, attrs, "amin")
    hi = torch.full((a, p), -big, device=dev).scatter_reduce(1, idx, attrs, "amax")
    pblock = blk[brk]
    start = torch.zeros(m + 1, dtype=torch.long, device=dev)
    start[1:] = torch.cumsum(torch.bincount(pblock, minlength=m), 0)
    bidx = pblock[None, :].expand(a, -1)
    block_lo = torch.full((a, m), big, device=dev).scatter_reduce(1, bidx, lo, "amin")
    block_hi = torch.full((a, m), -big, device=dev).scatter_reduce(1, bidx, hi, "amax")
    single = (start[1:] - start[:-1]) == 1
    return _Pieces(lo, hi, pblock, start, single, block_lo, block_hi)


class _Gather:
    """attrs (A, M) indexed lazily: g[a] -> attrs[a][index]."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table, self.index, self.cache = table, index, {}

    def __getitem__(self, a: int) -> torch.Tensor:
        if a not in self.cache:
            self.cache[a] = self.table[a][self.index]
        return self.cache[a]

    @property
    def shape(self):
        return (self.table.shape[0], self.index.numel())

    @property
    def device(self):
        return self.table.device


# ---------------------------------------------------------------------------------------------
# The compiler
# ---------------------------------------------------------------------------------------------


def build_layout(
    pattern: Pattern,
    layout,
    block_q: int = 128,
    block_k: int = 128,
    device=None,
) -> BlockLayout:
    """Compile `pattern` on `layout` (a StreamLayout, or a grid tuple such as (T, H, W) for
    one raster segment) into a BlockLayout on `device` (default CPU). Cached."""
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be an mmsparse Pattern, got {type(pattern).__name__}")
    stream = as_stream_layout(layout)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _build_cached(pattern, stream, block_q, block_k, device)


@lru_cache(maxsize=64)
def _build_cached(pattern, stream, block_q, block_k, device) -> BlockLayout:
    return _build(pattern, stream, block_q, block_k, device)


def _build(pattern: Pattern, stream: StreamLayout, block_q: int, block_k: int, device) -> BlockLayout:
    program = pattern.lower(stream).to(device)
    n = stream.length
    qp = _pieces(stream, program.attrs, block_q)
    kp = qp if block_k == block_q else _pieces(stream, program.attrs, block_k)
    mq, mk = qp.single.numel(), kp.single.numel()

    # 1. block-level interval test over every block pair, chunked over query blocks
    rows_per_chunk = max(1, _PAIR_CHUNK // mk)
    cand_q, cand_k, cand_all = [], [], []
    kb_all = torch.arange(mk, device=device)
    for q0 in range(0, mq, rows_per_chunk):
        qb = torch.arange(q0, min(mq, q0 + rows_per_chunk), device=device)
        pq = qb.repeat_interleave(mk)
        pk = kb_all.repeat(qb.numel())
        exists, every = program.classify(
            _Gather(qp.block_lo, pq), _Gather(qp.block_hi, pq),
            _Gather(kp.block_lo, pk), _Gather(kp.block_hi, pk),
        )
        cand_q.append(pq[exists])
        cand_k.append(pk[exists])
        cand_all.append(every[exists])
    pq, pk, full = torch.cat(cand_q), torch.cat(cand_k), torch.cat(cand_all)

    # 2. pairs of multi-piece blocks: re-test piece by piece
    refine = ~(qp.single[pq] & kp.single[pk]) & ~full
    if refine.any():
        rq, rk = pq[refine], pk[refine]
        nq = qp.start[rq + 1] - qp.start[rq]
        nk = kp.start[rk + 1] - kp.start[rk]
        n_pairs = nq * nk
        pair = torch.repeat_interleave(torch.arange(rq.numel(), device=device), n_pairs)
        offset = torch.arange(pair.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(n_pairs, 0) - n_pairs, n_pairs
        )
        piece_q = qp.start[rq][pair] + offset // nk[pair]
        piece_k = kp.start[rk][pair] + offset % nk[pair]
        exists, every = program.classify(
            _Gather(qp.lo, piece_q), _Gather(qp.hi, piece_q),
            _Gather(kp.lo, piece_k), _Gather(kp.hi, piece_k),
        )
        any_exists = torch.zeros(rq.numel(), dtype=torch.long, device=device).scatter_reduce(
            0, pair, exists.long(), "amax"
        )
        all_every = torch.ones(rq.numel(), dtype=torch.long, device=device).scatter_reduce(
            0, pair, every.long(), "amin"
        )
        keep = torch.ones_like(pq, dtype=torch.bool)
        keep[refine] = any_exists.bool()
        full = full.clone()
        full[refine] = all_every.bool()
        pq, pk, full = pq[keep], pk[keep], full[keep]

    q_full_ptr, q_full_idx = _csr(pq[full], pk[full], mq, mk)
    q_part_ptr, q_part_idx = _csr(pq[~full], pk[~full], mq, mk)
    k_full_ptr, k_full_idx = _csr(pk[full], pq[full], mk, mq)
    k_part_ptr, k_part_idx = _csr(pk[~full], pq[~full], mk, mq)
    return BlockLayout(
        n, block_q, block_k,
        q_full_ptr, q_full_idx, q_part_ptr, q_part_idx,
        k_full_ptr, k_full_idx, k_part_ptr, k_part_idx,
        program=program, pattern=pattern, stream=stream,
    )


def _csr(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int):
    order = torch.argsort(rows * n_cols + cols)
    ptr = torch.zeros(n_rows + 1, dtype=torch.int32, device=rows.device)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    return ptr, cols[order].to(torch.int32)


def with_full_keys(layout: BlockLayout, n_keys: int) -> tuple[BlockLayout, int]:
    """`layout` (N positions) widened so that every query block of the N positions also attends
    ``n_keys`` more keys fully: they sit in key blocks from K0 = N rounded up to ``block_k``, after
    the stream, and the wide layout ends with them (N' = K0 + n_keys: its last block is ragged
    where ``block_k`` does not divide n_keys, as any layout's last block may be). Returns (wide
    layout, K0). The wide layout's rows past the stream's query blocks attend nothing; its
    positions in [N, K0) hold no key (mask them as key padding; there are none when ``block_k``
    divides N). Its mask program says the same at token level (backends that evaluate it on
    every pair, flex, read the blocks from it): the new positions repeat the last token's
    attributes (every index stays inside the program's tables), and one more clause lets a query
    of the stream attend every added key."""
    if n_keys < 1:
        raise ValueError(f"n_keys must be >= 1, got {n_keys}")
    n, bq, bk = layout.n, layout.block_q, layout.block_k
    k0 = math.ceil(n / bk) * bk
    extra = math.ceil(n_keys / bk)
    n_wide = k0 + n_keys
    mq, mk = math.ceil(n_wide / bq), math.ceil(n_wide / bk)
    dev = layout.device
    rows = torch.arange(layout.num_q_blocks, device=dev).repeat_interleave(extra)
    cols = (k0 // bk + torch.arange(extra, device=dev)).repeat(layout.num_q_blocks)
    fr = torch.cat([rows_of(layout.q_full_ptr), rows])
    fc = torch.cat([layout.q_full_idx.long(), cols])
    pr, pc = rows_of(layout.q_part_ptr), layout.q_part_idx.long()
    q_full_ptr, q_full_idx = _csr(fr, fc, mq, mk)
    q_part_ptr, q_part_idx = _csr(pr, pc, mq, mk)
    k_full_ptr, k_full_idx = _csr(fc, fr, mk, mq)
    k_part_ptr, k_part_idx = _csr(pc, pr, mk, mq)
    prog = layout.program
    pos = torch.arange(n_wide, device=prog.attrs.device)
    a = prog.attrs.shape[0]
    attrs = torch.cat([torch.cat([prog.attrs, prog.attrs[:, -1:].expand(-1, n_wide - n)], 1),
                       (pos < n).to(prog.attrs.dtype)[None], (pos >= k0).to(prog.attrs.dtype)[None]])
    clauses = prog.clauses + ((("qflag", a), ("kflag", a + 1)),)
    wide = BlockLayout(n_wide, bq, bk, q_full_ptr, q_full_idx, q_part_ptr, q_part_idx,
                       k_full_ptr, k_full_idx, k_part_ptr, k_part_idx,
                       program=MaskProgram(attrs, clauses, prog.names + ("in_stream", "added_key"), prog.tables))
    return wide, k0


def _no_entries(layout: BlockLayout, m: int):
    """CSR lists (ptr, idx) of m rows with no entry, on `layout`'s device and index dtype."""
    return torch.zeros(m + 1, dtype=torch.int32, device=layout.device), layout.q_full_idx.new_zeros(0)


def split_full_coarse(layout: BlockLayout, block_q: int, block_k: int) -> tuple[BlockLayout, BlockLayout]:
    """`layout` as (full blocks of block_q x block_k, the rest on `layout`'s own blocks): a coarse
    block pair goes to the first layout when every one of `layout`'s blocks inside it is full
    (an edge pair holds fewer of them where N ends inside it: those must be full); every other
    full block and every partial block stay in the second. The two cover each attended pair
    once, so attention over `layout` is their log-sum-exp merge, as for ``split_full``; with
    block_q x block_k equal to `layout`'s blocks this is ``split_full``. Lets a backend whose
    full-block kernel needs larger tiles (FlashAttention-4 on Hopper: 128 x 128) take the full
    blocks of a layout of smaller ones. Both carry `layout`'s mask program. Cached on `layout`."""
    bq, bk = layout.block_q, layout.block_k
    if block_q % bq or block_k % bk:
        raise ValueError(f"coarse blocks {block_q}x{block_k} must be multiples of the layout's {bq}x{bk}")
    if (block_q, block_k) == (bq, bk):
        return split_full(layout)
    cache = layout.__dict__.setdefault("_split_full_coarse", {})
    if (block_q, block_k) in cache:
        return cache[block_q, block_k]
    fq, fk = block_q // bq, block_k // bk
    mq, mk = layout.num_q_blocks, layout.num_k_blocks
    cq, ck = math.ceil(layout.n / block_q), math.ceil(layout.n / block_k)
    rows = rows_of(layout.q_full_ptr)
    cols = layout.q_full_idx.long()
    # full fine blocks per coarse pair against the fine blocks it holds (fewer at the ends)
    count = torch.bincount((rows // fq) * ck + cols // fk, minlength=cq * ck).view(cq, ck)
    per_q = torch.bincount(torch.arange(mq, device=rows.device) // fq, minlength=cq)
    per_k = torch.bincount(torch.arange(mk, device=rows.device) // fk, minlength=ck)
    whole = count == per_q[:, None] * per_k[None, :]
    covered = whole[rows // fq, cols // fk]
    wr, wc = whole.nonzero(as_tuple=True)
    q_ptr, q_idx = _csr(wr, wc, cq, ck)
    k_ptr, k_idx = _csr(wc, wr, ck, cq)

    coarse = BlockLayout(layout.n, block_q, block_k, q_ptr, q_idx, *_no_entries(layout, cq),
                         k_ptr, k_idx, *_no_entries(layout, ck), program=layout.program)
    fr, fc = rows[~covered], cols[~covered]
    rq_ptr, rq_idx = _csr(fr, fc, mq, mk)
    rk_ptr, rk_idx = _csr(fc, fr, mk, mq)
    rest = BlockLayout(layout.n, bq, bk, rq_ptr, rq_idx, layout.q_part_ptr, layout.q_part_idx,
                       rk_ptr, rk_idx, layout.k_part_ptr, layout.k_part_idx, program=layout.program)
    cache[block_q, block_k] = (coarse, rest)
    return coarse, rest


def split_full(layout: BlockLayout) -> tuple[BlockLayout, BlockLayout]:
    """`layout` as two layouts of the same N, block sizes and mask program: (the full blocks
    alone, the partial blocks alone). A block pair is either full or partial, so each query's
    keys are the disjoint union of its keys in the two, and attention over `layout` is the
    log-sum-exp merge of attention over each (``mmsparse.kernels.common.merge_lse``); a row with
    no block in one of them has LSE -inf and zero output there, and takes nothing from it. The
    two carry no pattern (a backend sees plain block lists). Cached on `layout`."""
    cached = layout.__dict__.get("_split_full")
    if cached is not None:
        return cached

    mq, mk = layout.num_q_blocks, layout.num_k_blocks
    full = BlockLayout(layout.n, layout.block_q, layout.block_k,
                       layout.q_full_ptr, layout.q_full_idx, *_no_entries(layout, mq),
                       layout.k_full_ptr, layout.k_full_idx, *_no_entries(layout, mk), program=layout.program)
    partial = BlockLayout(layout.n, layout.block_q, layout.block_k,
                          *_no_entries(layout, mq), layout.q_part_ptr, layout.q_part_idx,
                          *_no_entries(layout, mk), layout.k_part_ptr, layout.k_part_idx, program=layout.program)
    layout.__dict__["_split_full"] = (full, partial)
    return full, partial
