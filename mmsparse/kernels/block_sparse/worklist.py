"""What the kernels read of a layout: its lowered mask program and index lists on the device,
the work lists (rows kept whole and the chunks of split rows, with the kernel that combines
the chunks), the partial blocks' mask tiles under one memory budget, and the per-tile lists of
non-empty tiles.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ..common import dims
from ..options import KernelOptions, kernel_options
from .lists import BlockLists, rows_of
from .mask import as_int32, lower_program, mask_tiles_kernel

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



# Split rows. A program walks one row of the layout (a query block's key blocks, or for dK / dV
# a key block's query blocks), so one long row (the global tokens' row and column of Longformer
# or BigBird: every block of the sequence) runs serially in one program while the others are
# done. Rows longer than a chunk are cut into chunks of consecutive list entries, one program
# each, writing float32 partial results to scratch rows; one launch of `_combine_chunks_kernel`
# merges them (forward: by their LSE; dQ, dK, dV: a sum in a fixed order, so the result stays
# deterministic). It replaced ~15 torch ops a call, which had left the A5 Longformer forward
# waiting on the host (bench/NOTES.md v14, 2026-12-04).


def _chunk_length(lengths: torch.Tensor) -> int:
    """Entries per chunk: twice the mean non-empty row, at least 8, so only rows far above the
    typical length are cut (a window or a dense layout is never split)."""
    forced = kernel_options().split_chunk  # tests: a chunk length in layout blocks
    if forced is not None:
        return forced
    busy = lengths[lengths > 0]
    return max(8, 2 * math.ceil(busy.float().mean().item())) if busy.numel() else 1


class WorkList:
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
        d, d_pad = dims(dest)
        rows = 16  # layout blocks are multiples of 16
        merge = scratch_lse is not None
        ls, dl = (scratch_lse, dest_lse) if merge else (scratch, dest)
        _combine_chunks_kernel[(len(self.long_blocks) * (block // rows), b * h)](
            scratch, ls, self.chunk_index, self.tokens, dest, dl, self.tokens.numel(), h,
            self.chunk_index.shape[1], scratch.stride(0), scratch.stride(1), scratch.stride(2),
            ls.stride(0), ls.stride(1), dest.stride(0), dest.stride(1), dest.stride(2), dl.stride(0), dl.stride(1),
            LAYOUT_B=block, ROWS=rows, HEAD_DIM=d, D_PAD=d_pad, MERGE=merge,
            num_warps=4)


class KernelProgram:
    """What the kernels read of a layout (its BlockLists), cached on it: int32 attributes,
    tables, the constexpr program, index lists and the work lists on the right device."""

    def __init__(self, layout: BlockLists, device):
        self.program, tab = lower_program(layout.clauses, layout.attrs, layout.tables)
        self.attrs = as_int32(layout.attrs, "mask attribute").to(device)  # (A, N)
        self.tab = (as_int32(tab, "coarse table") if tab is not None else torch.zeros(1, dtype=torch.int32)).to(device)
        self.lists = {
            name: getattr(layout, name).to(device=device, dtype=torch.int32).contiguous()
            for name in ("q_full_idx", "q_part_idx", "k_full_idx", "k_part_idx")
        }
        # empty index lists still need a valid pointer
        for name, t in self.lists.items():
            if t.numel() == 0:
                self.lists[name] = torch.zeros(1, dtype=torch.int32, device=device)
        self.rows = WorkList(layout.q_full_ptr, layout.q_part_ptr, layout.block_q, layout.n, device)  # fwd, dQ
        self.cols = WorkList(layout.k_full_ptr, layout.k_part_ptr, layout.block_k, layout.n, device)  # dK, dV
        self.has_partial = layout.num_partial > 0
        self.tile_bytes = layout.num_partial * layout.block_q * layout.block_k
        self._layout, self._device, self._tiles = layout, device, None
        self._subs: dict = {}

    def mask_tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tiles (P, bq, bk) uint8, k_part_ord (P,) int32), built on first use by one launch
        of `mask_tiles_kernel`: every partial block's mask, one byte per pair, in the order of
        q_part_idx; k_part_ord maps the column-ordered list (k_part_idx) to that order."""
        if self._tiles is None:
            _make_room_for_tiles(self)
            lay, dev = self._layout, self._device
            qb, kb = rows_of(lay.q_part_ptr).long(), lay.q_part_idx.long()
            pairs = torch.stack([qb, kb], 1).to(device=dev, dtype=torch.int32).contiguous()
            tiles = torch.empty(lay.num_partial, lay.block_q, lay.block_k, dtype=torch.uint8, device=dev)
            rows = 16  # layout blocks are multiples of 16
            mask_tiles_kernel[(lay.num_partial, lay.block_q // rows)](
                self.attrs, self.attrs.stride(0), self.tab, pairs, tiles, lay.n,
                LAYOUT_BQ=lay.block_q, LAYOUT_BK=lay.block_k, COLS=triton.next_power_of_2(lay.block_k),
                ROWS=rows, PROGRAM=self.program, num_warps=4)
            # the row-ordered list is sorted by (qb, kb): find each column entry's (qb, kb) in it
            mk = lay.num_k_blocks
            key_col = lay.k_part_idx.long() * mk + rows_of(lay.k_part_ptr).long()
            ordinal = torch.searchsorted(qb * mk + kb, key_col)
            self._tiles = (tiles, ordinal.to(device=dev, dtype=torch.int32).contiguous())
        TILE_HOLDERS[id(self)] = weakref.ref(self)  # most recently used last
        TILE_HOLDERS.move_to_end(id(self))
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
# layout each) holds at most that much. "0" / "1" force the program / the tiles
# (KernelOptions.mask_tiles and mask_tile_mb).
# kernel programs holding tiles, least recently used first; weak, so a layout dropped from the
# layout cache frees its tiles with it
TILE_HOLDERS: "OrderedDict[int, weakref.ref]" = OrderedDict()


def _tile_budget(opts: KernelOptions | None = None) -> float:
    return float((opts or kernel_options()).mask_tile_mb) * 2**20


def _make_room_for_tiles(kp: "KernelProgram") -> None:
    """Drop the least recently used layouts' tiles until kp's fit the budget next to the rest."""
    for key in [k for k, ref in TILE_HOLDERS.items() if ref() is None or ref()._tiles is None]:
        del TILE_HOLDERS[key]
    held = sum(ref().tile_bytes for ref in TILE_HOLDERS.values())
    budget = _tile_budget()
    while TILE_HOLDERS and held + kp.tile_bytes > budget:
        _, ref = TILE_HOLDERS.popitem(last=False)
        old = ref()
        if old is not None:
            old._tiles, old._subs = None, {}
            held -= old.tile_bytes


def use_mask_tiles(kp: "KernelProgram", opts: KernelOptions | None = None) -> bool:
    opts = opts or kernel_options()
    mode = opts.mask_tiles
    if not kp.has_partial or not kp.program or mode == "0":
        return False
    if mode == "1":
        return True
    return kp.tile_bytes <= _tile_budget(opts)


def skip_empty(mask_tiles: bool, opts: KernelOptions | None = None) -> bool:
    """Whether the partial-block loops skip the kernel tiles that attend nothing (with mask
    tiles only: the lists come from them); KernelOptions.skip_empty_tiles=False turns it off."""
    return mask_tiles and (opts or kernel_options()).skip_empty_tiles


def tile_args(kp: "KernelProgram", opts: KernelOptions | None = None):
    """(MT, k_part_ord, MASK_TILES) kernel arguments: the tiles, or dummy pointers."""
    if use_mask_tiles(kp, opts):
        tiles, ordinal = kp.mask_tiles()
        return tiles, ordinal, True
    return kp.tab, kp.tab, False


def kernel_program(layout: BlockLists, device, opts: KernelOptions | None = None) -> KernelProgram:
    """The layout's KernelProgram on `device`, built once and cached on the layout."""
    cache = layout.programs
    key = (str(device), (opts or kernel_options()).split_chunk)
    if key not in cache:
        cache[key] = KernelProgram(layout, device)
    return cache[key]
