"""The flash backend: a layout's full blocks on FlashAttention-4, its partial blocks on the
Triton kernels, the two merged by log-sum-exp.

Legend: B batch, H query heads, Hk key/value heads (GQA: H = Hk * R), N tokens, D head dim,
Mq / Mk query / key blocks of the layout, W the longest block list of a row.

A full block is one where every query attends every key: no mask to evaluate, the work
FlashAttention-4 (FA4, CuTe DSL) does fastest. The backend splits the BlockLayout into its full
blocks and its partial blocks (`blocklayout.split_full_coarse`). The full blocks run on FA4's
block-sparse kernels (FA4's forward and backward functions with block-sparse tensors: per query
block its full key blocks for the forward pass, per key block its full query blocks for the
backward pass; `FA4Op`); the partial blocks run on the Triton block-sparse kernels with the mask
program. The two results are merged by their log-sum-exp, and each part's backward runs with the
merged output and LSE (`SplitOp`): no autograd graph of the merge, nothing of it kept for the
backward, and the parts' gradients summed (merged through autograd, the float32 merge kept its
intermediates for the backward, and E1 on an H100 ran 1.2x slower than on the Triton kernels
alone; bench/NOTES.md, 2026-12-08). It runs on CUDA (Hopper, sm90; Blackwell, sm100) with
float16 or bfloat16, head dims 8 to 128 in multiples of 8, GQA included, on layouts whose
blocks, or whole multiples of them, fit FA4's tiles (Hopper: block_q a multiple of 128 and
block_k = 128; Blackwell: block_q a multiple of 256 and block_k a multiple of 128;
`fa4_blocks`). Where the layout's blocks are smaller (64 x 64, the block-aligned captioners'),
FA4 takes the coarse blocks whose layout blocks are all full, and the Triton kernels the
layout's other blocks, full ones included (`blocklayout.split_full_coarse`). With a key padding
mask the whole layout runs on the Triton kernels (FA4 evaluates no mask in full blocks); the
compressed branch passes none on a model's stream without padded clips
(``compressed.pooled_key_inputs``), so its pooled key blocks, full blocks every query block
attends, go to FA4 with the rest. `auto` picks it where it can run and the full blocks hold at
least `KernelOptions.flash_min_full_share` (MMSPARSE_FLASH_MIN_FULL_SHARE, default 0.95) of the
layout's computed pairs, and logs why it did or did not; elsewhere auto keeps its choice
(triton, else flex). Install FA4 with `pip install -e ".[flash]"` (flash-attn-4 4.0.0b36).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch

from mmsparse.kernels.block_sparse.lists import rows_of
from mmsparse.kernels.common import merge_lse, run_attention
from mmsparse.kernels.options import kernel_options

from ..blocklayout import BlockLayout, split_full_coarse
from . import triton_kernels

log = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[flash]"'
DTYPES = (torch.float16, torch.bfloat16)
# FA4 4.0.0b36's block-sparse tiles per compute capability major: (block_q must be a multiple
# of this, block_k must be a multiple of this, block_k at most this). Hopper's backward walks
# 128-key tiles that must equal the sparse key block; Blackwell's forward stages two 128-query
# tiles per sparse query block and takes several 128-key tiles per key block.
BLOCKS = {9: (128, 128, 128), 10: (256, 128, None), 11: (256, 128, None)}
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 128


@functools.lru_cache(maxsize=1)
def _fa4():
    """(forward, backward, BlockSparseTensorsTorch) of FlashAttention-4: the functions its
    autograd Function calls (`flash_attn.cute.interface._flash_attn_fwd` / `_flash_attn_bwd`,
    as in 4.0.0b36, the version the extra pins), so that the backward can run with another
    output and LSE than its own forward's (``FA4Op``); or why they do not import."""
    try:
        from flash_attn.cute import interface
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        fwd, bwd = interface._flash_attn_fwd, interface._flash_attn_bwd
    except Exception as err:  # absent, or installed without its CUDA / CuTe DSL libraries
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "flash_attn":
            return f"FlashAttention-4 is not installed ({INSTALL})"
        return f"FlashAttention-4 does not import ({type(err).__name__}: {err}; {INSTALL})"
    return fwd, bwd, BlockSparseTensorsTorch


def _fa4_missing() -> str | None:
    """Why FA4 cannot be used, without importing it (no CUDA here to run it anyway)."""
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"FlashAttention-4 is not installed ({INSTALL})"


def input_reason(dtype: torch.dtype, head_dim: int, head_dim_v: int, capability: tuple[int, int],
                 block_q: int, block_k: int) -> str | None:
    """Why FA4's block-sparse kernels cannot run inputs of this dtype and head dims on a GPU of
    this compute capability over blocks of block_q x block_k tokens, or None when they can."""
    if dtype not in DTYPES:
        return f"FlashAttention-4 takes float16 or bfloat16, got {dtype}"
    if head_dim != head_dim_v:
        return f"q / k head dim {head_dim} and v head dim {head_dim_v} differ"
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    blocks = BLOCKS.get(capability[0])
    if blocks is None:
        return (f"FlashAttention-4's block-sparse forward and backward run on sm90 / sm100, "
                f"got sm{capability[0]}{capability[1]}")
    if fa4_blocks(capability, block_q, block_k) is None:
        mult_q, mult_k, max_k = blocks
        want_k = f"block_k = {max_k}" if max_k is not None else f"block_k a multiple of {mult_k}"
        return (f"layout blocks {block_q}x{block_k} do not fit FlashAttention-4's tiles on "
                f"sm{capability[0]}{capability[1]}, nor do any whole multiples of them "
                f"(block_q a multiple of {mult_q}, {want_k})")
    return None


def _capability(x: torch.Tensor) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(x.device) if x.is_cuda else None


def fa4_blocks(capability: tuple[int, int] | None, block_q: int, block_k: int) -> tuple[int, int] | None:
    """The blocks FA4 takes the full blocks of a block_q x block_k layout in on this GPU: the
    least whole multiples of the layout's blocks that fit its tiles (on Hopper 128 x 128 for
    layouts of 64 x 64 or 128 x 128), or None where none does. A coarse block goes to FA4 when
    every layout block inside it is full (``blocklayout.split_full_coarse``)."""
    blocks = BLOCKS.get(capability[0]) if capability else None
    if blocks is None:
        return None
    mult_q, mult_k, max_k = blocks
    tq, tk = math.lcm(block_q, mult_q), math.lcm(block_k, mult_k)
    return None if max_k is not None and tk > max_k else (tq, tk)


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """Why the flash backend cannot run these inputs (no CUDA, FA4 missing, dtype, head dim,
    GPU, block sizes, or the Triton kernels refusing the partial blocks), or None when it can."""
    if q.device.type != "cuda":
        reasons = [f"it needs CUDA tensors (got {q.device})", _fa4_missing()]
        return "backend='flash' cannot run: " + "; ".join(r for r in reasons if r)
    fa4 = _fa4()
    reason = fa4 if isinstance(fa4, str) else input_reason(
        q.dtype, q.shape[-1], v.shape[-1], torch.cuda.get_device_capability(q.device), layout.block_q, layout.block_k)
    if reason is None and layout.num_partial:
        reason = triton_kernels.can_run(q, k, v, layout)
    return None if reason is None else f"backend='flash' cannot run: {reason}"


def full_share(layout: BlockLayout, blocks: tuple[int, int] | None = None) -> float:
    """The share of `layout`'s computed (query, key) pairs that FA4 would take: those in full
    blocks of `blocks` (block_q, block_k; None: the layout's own), every layout block inside
    one full. Cached per `blocks`."""
    blocks = blocks or (layout.block_q, layout.block_k)
    cache = layout.__dict__.setdefault("_full_share", {})
    if blocks not in cache:
        total = layout.computed_pairs()
        cache[blocks] = split_full_coarse(layout, *blocks)[0].computed_pairs() / total if total else 0.0
    return cache[blocks]


def auto_reason(q, k, v, layout: BlockLayout) -> str | None:
    """Why `auto` does not pick flash for these inputs, or None when it does: it can run them
    and the layout's full blocks hold at least `KernelOptions.flash_min_full_share` of its
    computed pairs (FA4's faster full blocks must pay for the second kernel and the merge)."""
    reason = can_run(q, k, v, layout)
    if reason is not None:
        return reason
    blocks = fa4_blocks(_capability(q), layout.block_q, layout.block_k)
    share, least = full_share(layout, blocks), kernel_options().flash_min_full_share
    if share < least:
        return (f"full blocks hold {100 * share:.1f} % of the computed pairs, below flash_min_full_share="
                f"{least:g} (MMSPARSE_FLASH_MIN_FULL_SHARE)")
    return None


# ---------------------------------------------------------------------------------------------
# The split and the merge
# ---------------------------------------------------------------------------------------------


def split_attention(q, k, v, layout: BlockLayout, scale: float, full_op, partial_op, key_padding_mask=None,
                    blocks: tuple[int, int] | None = None):
    """Attention over `layout` as the log-sum-exp merge of its full blocks, run by the op
    `full_op(part)` makes, and the rest, its partial blocks, by `partial_op(part)`'s (ops of the
    kernels' autograd shell, ``kernels.common.AttentionFunction``: forward -> (out, lse, saved),
    backward(saved, dout, dlse)). With `blocks` (block_q, block_k), whole multiples of the
    layout's, the full part is the full blocks of that size whose layout blocks are all full,
    and the partial part the layout's other blocks, full ones included
    (``blocklayout.split_full_coarse``). A part with no block is not run. Returns out
    (B, H, N, D) in q's dtype and lse (B, H, N) float32, differentiable in q, k, v (``SplitOp``)."""
    full, partial = split_full_coarse(layout, *(blocks or (layout.block_q, layout.block_k)))
    ops = []
    if full.num_full:
        ops.append(full_op(full))
    if partial.num_partial or partial.num_full or not ops:
        ops.append(partial_op(partial))
    return run_attention(ops[0] if len(ops) == 1 else SplitOp(*ops), q, k, v, scale, key_padding_mask)


class SplitOp:
    """Two ops over disjoint sets of pairs as one: forward, both parts and their log-sum-exp
    merge (no autograd graph); backward, each part's backward with the merged output and LSE in
    place of its own, summed. With P from the final LSE and delta = rowsum(dO * out) from the
    final output, each part's dS = P (dP - delta + dlse) is the union's gradient on its own
    pairs, so the sum is exact (the strided split's backward, kernels/strided_attention.py,
    works the same way), and nothing of the merge is kept for the backward or differentiated."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def forward(self, q, k, v, scale, key_padding):
        out_a, lse_a, _ = self.a.forward(q, k, v, scale, key_padding)
        out_b, lse_b, _ = self.b.forward(q, k, v, scale, key_padding)
        out, lse = merge_lse(out_a, lse_a, out_b, lse_b)
        return out, lse, (q, k, v, out, lse)

    def backward(self, saved, dout, dlse, scale, key_padding):
        grads_a = self.a.backward(saved, dout, dlse, scale, key_padding)
        grads_b = self.b.backward(saved, dout, dlse, scale, key_padding)
        return tuple(ga + gb for ga, gb in zip(grads_a, grads_b))


def _block_table(ptr: torch.Tensor, idx: torch.Tensor):
    """CSR lists (ptr (M + 1,), idx) -> (counts (1, 1, M), table (1, 1, M, W)) int32, each row's
    entries first and ascending (FA4 walks a row from its last entry and masks the sequence end
    there: the ragged last block, when listed, is the last entry), padded with zeros."""
    counts = (ptr[1:] - ptr[:-1]).to(torch.int32)
    m = counts.numel()
    width = max(int(counts.max()) if m else 0, 1)
    rows = rows_of(ptr).long()
    slot = torch.arange(idx.numel(), device=idx.device) - ptr[:-1].long()[rows]
    table = torch.zeros(m, width, dtype=torch.int32, device=idx.device)
    table[rows, slot] = idx.to(torch.int32)
    return counts[None, None].contiguous(), table[None, None].contiguous()


def fa4_block_tensors(layout: BlockLayout, tensors_type):
    """FA4's block-sparse tensors of a full-blocks-only layout, (forward: per query block its
    key blocks, backward: per key block its query blocks), no partial ("mask") block in either;
    batch and head dims of size 1 (broadcast). Cached on the layout."""
    cached = layout.__dict__.get("_fa4_blocks")
    if cached is None:
        size = (layout.block_q, layout.block_k)

        def tensors(ptr, idx):
            count, table = _block_table(ptr, idx)
            return tensors_type(mask_block_cnt=torch.zeros_like(count), mask_block_idx=torch.zeros_like(table[..., :1]),
                                full_block_cnt=count, full_block_idx=table, block_size=size)

        cached = layout.__dict__["_fa4_blocks"] = (tensors(layout.q_full_ptr, layout.q_full_idx),
                                                   tensors(layout.k_full_ptr, layout.k_full_idx))
    return cached


class FA4Op:
    """FlashAttention-4's block-sparse kernels over a layout of full blocks only, as an op of
    the kernels' autograd shell: forward -> (out (B, H, N, D), lse (B, H, N) float32, saved);
    backward from saved (q, k, v, out, lse), which may be a merge's rather than its own
    (``SplitOp``). FA4 takes (B, N, H, D): the transposes are views."""

    def __init__(self, layout: BlockLayout):
        if layout.num_partial:
            raise ValueError(f"FA4Op takes a layout of full blocks only, got {layout.num_partial} partial blocks")
        self.layout = layout

    def forward(self, q, k, v, scale, key_padding):
        if key_padding is not None:
            raise ValueError("FlashAttention-4's full blocks evaluate no mask: run key padding on the Triton kernels")
        fa4_fwd, _, tensors_type = _fa4()
        fwd, _ = fa4_block_tensors(self.layout, tensors_type)
        out, lse, *_ = fa4_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                               block_sparse_tensors=fwd, return_lse=True)
        out = out.transpose(1, 2)
        return out, lse, (q, k, v, out, lse)

    def backward(self, saved, dout, dlse, scale, key_padding):
        q, k, v, out, lse = saved
        _, fa4_bwd, tensors_type = _fa4()
        _, bwd = fa4_block_tensors(self.layout, tensors_type)
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        dq, dk, dv, *_ = fa4_bwd(t(q), t(k), t(v), t(out), t(dout), lse, scale, block_sparse_tensors=bwd,
                                 dlse=dlse)
        return t(dq), t(dk), t(dv)


def run(q, k, v, layout: BlockLayout, scale, key_padding_mask=None):
    """(out, lse): the full blocks on FA4, the partial blocks on the Triton kernels, merged by
    LSE (``split_attention``); with a key padding mask, the whole layout on the Triton kernels
    (module doc)."""
    reason = can_run(q, k, v, layout)
    if reason:
        raise ValueError(reason)
    if key_padding_mask is not None:
        log.debug("backend='flash': a key padding mask runs the whole layout on the Triton kernels")
        return triton_kernels.run(q, k, v, layout, scale, key_padding_mask)
    blocks = fa4_blocks(_capability(q), layout.block_q, layout.block_k)
    return split_attention(q, k, v, layout, scale, FA4Op, triton_kernels.block_sparse_op, blocks=blocks)
