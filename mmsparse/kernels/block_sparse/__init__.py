"""Block-sparse attention over CSR block lists: Triton forward and backward kernels.

Legend: B batch, H query heads, Hk key/value heads (GQA: H = Hk * G), N tokens, D head dim,
Dp = D padded to a power of two (>= 16), A mask-program attributes, Mq / Mk layout query / key
blocks of bq / bk tokens, BM / BN the kernel's tiles (powers of two dividing bq / bk).

Modules, bottom to top:
- `lists`: `BlockLists`, the layout as the kernels take it (CSR lists, block sizes, the mask
  program's clauses and attributes); mmsparse.attention builds it from a BlockLayout.
- `mask`: the mask program lowered to constexpr ints and evaluated on a tile
  (`program_mask`), and the kernel that precomputes partial blocks' mask tiles.
- `steps`: Triton pieces shared with the axial kernels (tile loads, the online-softmax step,
  the dQ and dK / dV steps, delta).
- `worklist`: the per-layout `KernelProgram` (lists on the device, work lists with split long
  rows and their combine kernel, mask tiles under one memory budget, non-empty tile lists).
- `tiles`: tile tables per head dim and the autotuner; `launch`: scratch, launches, TMA.
- `forward`, `backward`: the kernels and their launchers.
- here: the dense reference, the op in the shared autograd shell, `block_sparse_attention`.

Partial blocks read their mask one of two ways (`worklist.use_mask_tiles`). By default the
program is evaluated once per layout into one uint8 per pair of every partial block, and the
kernels load a tile of it like a K tile: a coalesced, software-pipelined load whatever the
program's size. Where the tiles would take more than `KernelOptions.mask_tile_mb` (a very long
sequence), or with mask_tiles "0", the kernels evaluate the program in registers on every tile
instead: no memory, but a few attribute loads and integer operations per pair and predicate.
"""

from __future__ import annotations

import math

import torch

from ..common import check_kernel_inputs, run_attention, tensor_unsupported_reason
from .backward import attention_backward
from .forward import attention_forward
from .lists import BlockLists


def block_sparse_attention_ref(q, k, v, mask, scale=None, upcast: bool = True, key_padding_mask=None):
    """Dense masked attention with an (N, N) bool mask (small N only).

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
    mask = mask.to(q.device)  # (N, N)
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


def unsupported_reason(q, block_q: int, block_k: int) -> str | None:
    """Why the block-sparse kernels cannot run q over blocks of block_q x block_k tokens, or
    None when they can (lets the `auto` backend fall back with one log line)."""
    reason = tensor_unsupported_reason(q)
    if reason is None and (block_q % 16 or block_k % 16):
        reason = (f"layout blocks {block_q}x{block_k} must be multiples of 16 "
                  f"(build the layout with block_q=block_k=128)")
    return reason


class BlockSparseOp:
    """The block-sparse kernels as an op of the shared autograd shell (common.AttentionFunction)."""

    def __init__(self, lists: BlockLists):
        self.lists = lists

    def forward(self, q, k, v, scale, key_padding):
        out, lse = attention_forward(q, k, v, self.lists, scale, key_padding=key_padding)
        return out, lse, (q, k, v, out, lse)

    def backward(self, saved, dout, dlse, scale, key_padding):
        q, k, v, out, lse = saved
        return attention_backward(q, k, v, out, lse, dout, self.lists, scale, dlse=dlse, key_padding=key_padding)


def block_sparse_attention(q, k, v, lists: BlockLists, scale: float | None = None, key_padding_mask=None):
    """Block-sparse attention over `lists` with the Triton kernels.

    Args:
        q: (B, H, N, D) queries; k, v: (B, Hk, N, D), H a multiple of Hk (GQA).
            float16, bfloat16 or float32; D <= 256; CUDA tensors (or CPU under TRITON_INTERPRET=1).
        lists: the BlockLists of these N tokens (mmsparse.attention builds them from a
            BlockLayout), blocks multiples of 16.
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: (B, N) bool, True where a key is padding: never attended (applied in
            full blocks too), so its dk / dv are zero.

    Returns:
        out (B, H, N, D) in q's dtype and lse (B, H, N) float32 (natural log; -inf for rows
        that attend nothing). Both differentiable in q, k, v (d lse / d s = P, which merging
        attention results by their LSE needs).
    """
    check_block_inputs(q, k, v, lists, "block_sparse_attention", key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return run_attention(BlockSparseOp(lists), q, k, v, scale, key_padding_mask)


def check_block_inputs(q, k, v, lists, op: str, key_padding_mask=None) -> None:
    """The kernel input checks, plus: `lists` is a BlockLists for q's N tokens, blocks of 16."""
    if not isinstance(lists, BlockLists):
        raise ValueError(f"{op}: lists must be a BlockLists (mmsparse.attention builds it from a BlockLayout), "
                         f"got {type(lists).__name__}")
    check_kernel_inputs(q, k, v, op, key_padding_mask)
    if q.shape[2] != lists.n:
        raise ValueError(f"q has N={q.shape[2]} tokens but the layout was built for N={lists.n}")
    reason = unsupported_reason(q, lists.block_q, lists.block_k)
    if reason:
        raise ValueError(f"{op}: {reason}")


__all__ = ["BlockLists", "BlockSparseOp", "block_sparse_attention", "block_sparse_attention_ref",
           "check_block_inputs", "unsupported_reason"]
