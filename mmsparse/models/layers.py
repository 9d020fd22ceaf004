"""Transformer layers of the multimodal encoder: pre-norm blocks around `sparse_attention`.

Legend: B batch, N stream tokens, C channels, H heads, D head dim (C = H x D).

A block takes its attention context per call: the BlockLayout of its pattern (None: dense,
through SDPA's flash path with no mask at all) and the rotary (cos, sin) of the stream. The
model builds both once per forward (layouts are cached by pattern and StreamLayout), so any
wrapper (activation checkpointing, DeepSpeed) sees plain `block(x, layout, rope, pad_mask)` calls.
pad_mask (B, N) marks the padding tokens of shorter clips in the batch: no query attends them.

Packed rows: a stream with alignment gaps (segment and tile padding, which belong to no segment
and which the sparse patterns keep from every real token) may run its residual stream on the R
real rows only, x (B, R, C), with `packed` (a `PackedRows`) naming their stream positions. The
norms, projections and MLPs then skip the gaps; attention alone sees all N positions: the fused
rope kernel writes q, k, v straight to their stream positions (zeros at the gaps) and reads the
gradients back from there, and the same kernel gathers the output rows (`heads_to_rows`). Every move is a plain copy whose
backward is another plain copy, with no atomics (deterministic).

Compiled blocks: with the kernel option `compile_blocks` (mmsparse.kernels.options), the work of
a block after its attention heads (output projection, residual add, norm, MLP, residual add)
runs as one torch.compile graph, shared by every block (the blocks' weights are its inputs): its
pointwise ops, the norm and the bias gradients' reductions fused by inductor, forward and
backward. Attention and the fused rope kernel stay eager; the function is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp

from mmsparse.attention import BlockLayout
from mmsparse.attention.compressed import layer_attention, pooled_tails
from mmsparse.encoders import apply_rope
from mmsparse.kernels.options import kernel_options
from mmsparse.kernels.rope import fused_rope_available, heads_to_rows, qkv_rope


class PackedRows(NamedTuple):
    """R real rows of an N-position stream: `index` (R,) int64, their positions, increasing;
    `rows` (N,) int32, the row of each position (-1 at a gap); `n` = N. Build with `packed_rows`."""

    index: torch.Tensor
    rows: torch.Tensor
    n: int


def packed_rows(gaps: torch.Tensor) -> PackedRows:
    """The PackedRows of the positions where `gaps` (N,) bool is False."""
    index = torch.nonzero(~gaps).squeeze(1)
    rows = torch.full(gaps.shape, -1, dtype=torch.int32, device=gaps.device)
    rows[index] = torch.arange(index.numel(), dtype=torch.int32, device=gaps.device)
    return PackedRows(index, rows, int(gaps.numel()))


class _TakeRows(torch.autograd.Function):
    """x (B, N, ...) -> its rows `index` (B, R, ...); backward: those rows of a zero gradient."""

    @staticmethod
    def forward(ctx, x, index, n):
        ctx.save_for_backward(index)
        ctx.n = n
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.new_zeros(g.shape[0], ctx.n, *g.shape[2:]).index_copy_(1, index, g), None, None


class _PutRows(torch.autograd.Function):
    """x (B, R, ...) -> (B, N, ...) with x at rows `index` and zeros elsewhere; backward: a gather."""

    @staticmethod
    def forward(ctx, x, index, n):
        ctx.save_for_backward(index)
        return x.new_zeros(x.shape[0], n, *x.shape[2:]).index_copy_(1, index, x)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.index_select(1, index), None, None


def take_rows(x: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """(B, N, ...) stream -> (B, R, ...) real rows (differentiable, deterministic)."""
    return _TakeRows.apply(x, packed.index, packed.n)


def put_rows(x: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """(B, R, ...) real rows -> (B, N, ...) stream, zeros at the gaps (differentiable, deterministic)."""
    return _PutRows.apply(x, packed.index, packed.n)


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention whose mask is a BlockLayout; optional QK-norm and rotary."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 norm_layer=nn.LayerNorm, backend: str = "auto", compress: int = 0, compress_keys: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be a multiple of num_heads {num_heads}")
        if compress < 0 or compress_keys < 0:
            raise ValueError(f"compress and compress_keys must be >= 0 (0: off / no bound), got {compress}, {compress_keys}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        # sparse layers also attend the means of every `compress` stream positions
        # (mmsparse/attention/compressed.py) in the same softmax; 0: off; at most compress_keys
        # pooled keys (the block grows by whole multiples past that; 0: no bound)
        self.compress, self.compress_keys = compress, compress_keys
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # the fused split + rotary kernel (mmsparse/kernels/rope.py) applies where no QK-norm sits
        # between the split and the rotation
        self.fused_rope = not qk_norm

    def forward(self, x: torch.Tensor, layout: BlockLayout | None, rope=None,
                pad_mask: torch.Tensor | None = None, packed: PackedRows | None = None,
                real: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N or R, C): the output projection of `heads` (same arguments)."""
        return self.proj(self.heads(x, layout, rope, pad_mask, packed, real))

    def heads(self, x: torch.Tensor, layout: BlockLayout | None, rope=None,
              pad_mask: torch.Tensor | None = None, packed: PackedRows | None = None,
              real: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' outputs side by side, (B, N or R, C), before the output projection.
        x (B, N, C); layout for these N tokens or None (dense); rope (cos, sin) (N, D / 2);
        pad_mask (B, N) bool, True at padding tokens (shorter clips of the batch): never attended.
        packed: x holds only the real rows (B, R, C) of the N-position stream (module doc).
        real (N,) bool: the positions that are tokens, not alignment gaps, where no pad_mask or
        packing says so; the compressed branch pools only those (the sparse patterns keep the
        gaps apart, the block means would not)."""
        b, r, c = x.shape
        qkv = self.qkv(x).view(b, r, 3, self.num_heads, self.head_dim)
        # the positions the compressed branch pools: packed rows know the gaps; else `real`
        real = real if packed is None else packed.rows >= 0
        live = None
        if rope is not None and self.fused_rope and fused_rope_available(qkv):
            # one Triton pass: split into heads and rotate q, k (and its transpose backward),
            # straight to the stream positions of packed rows, and at the length the compressed
            # branch widens them to, with its pooled keys in k's and v's tails (no copy)
            rows = None if packed is None else packed.rows
            tails = pooled_tails(layout, self.compress, b, self.compress_keys, real, pad_mask)
            if tails is None:
                q, k, v = qkv_rope(qkv, *rope, rows=rows)
            else:
                q, k, v, live = qkv_rope(qkv, *rope, rows=rows, n_out=tails.n_out, pooled_tails=tails[1:])
        else:
            if packed is not None:
                qkv = put_rows(qkv, packed)  # (B, N, 3, H, D), zeros at the gaps
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # dense (layout None, padding keys masked), sparse, or sparse with the compressed branch,
        # whose block means skip the gaps
        out = layer_attention(q, k, v, layout, self.compress, self.backend, key_padding_mask=pad_mask,
                              real=real, compress_keys=self.compress_keys, live=live)
        if packed is None:
            out = out.transpose(1, 2)  # (B, N, H, D)
        elif fused_rope_available(out):
            out = heads_to_rows(out, packed.rows, r)  # (B, R, H, D), one Triton copy each way
        else:
            out = take_rows(out.transpose(1, 2), packed)
        return out.reshape(b, r, c)  # (B, N or R, C)


class SparseBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(norm(x))), x + DropPath(mlp(norm(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, drop_path: float = 0.0, backend: str = "auto",
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU, mlp_layer=Mlp, compress: int = 0,
                 compress_keys: int = 0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SparseSelfAttention(dim, num_heads, qkv_bias, qk_norm, norm_layer, backend, compress,
                                        compress_keys)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, layout: BlockLayout | None = None, rope=None,
                pad_mask: torch.Tensor | None = None, packed: PackedRows | None = None,
                real: torch.Tensor | None = None) -> torch.Tensor:
        heads = self.attn.heads(self.norm1(x), layout, rope, pad_mask, packed, real)
        # not over ZeRO-3's partitioned weights (their `ds_id`): its hooks make dynamo recompile
        # for every block (the training config refuses the pair)
        if compile_blocks(x) and not hasattr(self.norm2.weight, "ds_id"):
            return _after_attention_compiled()(self, x, heads)
        return _after_attention(self, x, heads)


def _after_attention(block: SparseBlock, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """A block's work after its attention heads: x + DropPath(proj(heads)), then the MLP half."""
    x = x + block.drop_path1(block.attn.proj(heads))
    return x + block.drop_path2(block.mlp(block.norm2(x)))


_COMPILED = None


def _after_attention_compiled():
    """`_after_attention` through torch.compile, built on first use. One graph serves every
    block (dynamo inlines the modules: their weights are the graph's inputs, not constants); a
    second shape recompiles it with dynamic sizes, once."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_after_attention)
    return _COMPILED


def compile_blocks(x: torch.Tensor) -> bool:
    """Whether blocks run `_after_attention` compiled on `x`: the kernel option
    `compile_blocks` ("auto": CUDA tensors; "1": any; "0": never)."""
    mode = kernel_options().compile_blocks
    return mode == "1" or (mode == "auto" and x.is_cuda)
