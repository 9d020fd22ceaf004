"""Applied from outside the model (it stays plain PyTorch): activation checkpointing and Ulysses.

Legend: B batch, N stream tokens, C channels, H heads, D head dim, P sequence-parallel size.

**Activation checkpointing** wraps each ``model.blocks[i].forward`` in non-reentrant
``torch.utils.checkpoint`` (keyword arguments, layouts and rope tuples pass through; RNG state
is replayed so DropPath draws the same masks in the recomputation).

**DeepSpeed-Ulysses sequence parallelism.** Inside a sequence-parallel group of P ranks every
rank holds N / P consecutive tokens of the same clip between the blocks:

- a forward pre-hook on ``blocks[0]`` pads the stream with zero tokens to a multiple of P
  (N' = P ceil(N / P)) and keeps this rank's slice ``[r N'/P, (r+1) N'/P)``; the padding
  tokens are left out of attention and cut off again at the end;
- each block's ``attn`` (a ``SparseSelfAttention``) is replaced by ``UlyssesSelfAttention``
  sharing its parameters: q, k, v of the local tokens (B, H, N/P, D), rotary positions of
  those tokens, then ``deepspeed.sequence.layer.DistributedAttention`` swaps the split from
  tokens to heads (B, N, H/P, D), runs ``sparse_attention`` with the *whole stream's*
  BlockLayout (every rank sees all N tokens of H/P heads, so the pattern is unchanged), and
  swaps back;
- a forward hook on ``blocks[-1]`` all-gathers the tokens (gradient: the sum of the ranks'
  gradients of their slice), so the norm, pooling and caption decoder see the full stream.

Gradients: every rank of a group computes the same loss; the gather's backward sums the
group's upstream gradients, so a rank's encoder gradient is P times its slice's share and
DeepSpeed's plain average over all W ranks yields exactly the data-parallel mean over clips
(decoder gradients are identical within a group). So the engine is given no sequence-parallel
``mpu``: its ordinary all-rank averaging is the right reduction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmsparse.attention.compressed import layer_attention
from mmsparse.encoders import apply_rope


def checkpoint_blocks(blocks: nn.ModuleList) -> int:
    """Wrap every block's forward in activation checkpointing; returns how many were wrapped."""
    for block in blocks:
        if getattr(block, "_mmsparse_ckpt", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._mmsparse_ckpt = True
    return len(blocks)


def check_heads(model: nn.Module, sp: int) -> int:
    """The model's head count, after checking the sequence-parallel size divides it."""
    heads = {blk.attn.num_heads for blk in model.blocks}
    bad = sorted(h for h in heads if h % sp)
    if bad:
        raise ValueError(f"deepspeed.sequence_parallel_size={sp} must divide the number of attention heads, "
                         f"but the model has blocks with {bad} heads; choose a sequence_parallel_size that "
                         f"divides {sorted(heads)} or set model.overrides.num_heads")
    return min(heads)


class _GatherTokens(torch.autograd.Function):
    """(B, N/P, C) slices of a group -> (B, N, C); backward: sum the group's grads, keep our slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        p = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(p)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        p, r = dist.get_world_size(group), dist.get_rank(group)
        n = grad.shape[1] // p
        return grad[:, r * n:(r + 1) * n].contiguous(), None


class _LocalSparseAttention(nn.Module):
    """DistributedAttention's local attention: (B, N', H/P, D) in and out, sparse_attention of the
    N real tokens inside (padding rows come out as zeros). ``compress``: the layer's compressed
    branch (``SparseSelfAttention.compress``), which after the all-to-all sees the whole stream of
    its heads, so it runs as on one GPU (``compress_keys``: its bound on the pooled keys)."""

    def __init__(self, backend: str, state: dict, compress: int = 0, compress_keys: int = 0):
        super().__init__()
        self.backend, self.state, self.compress, self.compress_keys = backend, state, compress, compress_keys

    def forward(self, q, k, v, layout, pad_mask=None, real=None):
        n_pad, n = q.shape[1], self.state["n"]
        q, k, v = (t[:, :n].transpose(1, 2) for t in (q, k, v))  # (B, H/P, N, D)
        # layout None (a dense layer): SDPA, padding keys masked; the compressed branch as on one GPU
        out = layer_attention(q, k, v, layout, self.compress, self.backend, key_padding_mask=pad_mask, real=real,
                              compress_keys=self.compress_keys)
        out = out.transpose(1, 2)  # (B, N, H/P, D)
        return F.pad(out, (0, 0, 0, 0, 0, n_pad - n)) if n_pad > n else out


class UlyssesSelfAttention(nn.Module):
    """``SparseSelfAttention`` on a token slice, with the heads spread over the group for attention."""

    def __init__(self, attn: nn.Module, group, sp_rank: int, sp: int, state: dict):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        # share the parameters (same names under .attn, so checkpoints and exports are unchanged)
        self.qkv, self.q_norm, self.k_norm, self.proj = attn.qkv, attn.q_norm, attn.k_norm, attn.proj
        self.num_heads, self.head_dim, self.backend = attn.num_heads, attn.head_dim, attn.backend
        self.sp_rank, self.sp = sp_rank, sp
        self.dist_attn = DistributedAttention(_LocalSparseAttention(attn.backend, state, attn.compress,
                                                                    attn.compress_keys), group, scatter_idx=2,
                                              gather_idx=1)

    def forward(self, x: torch.Tensor, layout, rope=None, pad_mask=None, packed=None, real=None) -> torch.Tensor:
        """(B, N/P, C): the output projection of `heads` (same arguments)."""
        return self.proj(self.heads(x, layout, rope, pad_mask, packed, real))

    def heads(self, x: torch.Tensor, layout, rope=None, pad_mask=None, packed=None, real=None) -> torch.Tensor:
        """The local tokens' head outputs side by side, (B, N/P, C), before the output projection
        (`SparseSelfAttention.heads`). x (B, N/P, C) local tokens; layout of the whole stream;
        rope (cos, sin) and pad_mask (B, N) of all N tokens (attention sees the whole stream
        after the all-to-all)."""
        if packed is not None:
            raise ValueError("sequence parallelism runs the blocks on every stream position: "
                             "set model.cfg.pack_gaps = False (apply_sequence_parallel does)")

        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N/P, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            lo = self.sp_rank * n
            cos, sin = rope[0][lo:lo + n], rope[1][lo:lo + n]
            if cos.shape[0] < n:  # padding tokens: identity rotation
                extra = n - cos.shape[0]
                cos = torch.cat([cos, cos.new_ones(extra, *cos.shape[1:])])
                sin = torch.cat([sin, sin.new_zeros(extra, *sin.shape[1:])])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, N/P, H, D)
        out = self.dist_attn(q, k, v, 0, None, layout, pad_mask, real)  # (B, N/P, H, D)
        return out.reshape(b, n, c)


def apply_sequence_parallel(model: nn.Module, group, sp_rank: int, sp: int) -> None:
    """Shard the token stream over ``group`` between the first and the last block (see module doc)."""
    check_heads(model, sp)
    if getattr(model, "cfg", None) is not None and hasattr(model.cfg, "pack_gaps"):
        # the token slices are slices of the whole stream (its layout, rope and masks): the
        # blocks run on every position, gaps included
        model.cfg.pack_gaps = False
    blocks = model.blocks
    state = {"n": 0}  # the real stream length of the current forward
    for blk in blocks:
        blk.attn = UlyssesSelfAttention(blk.attn, group, sp_rank, sp, state)

    def scatter(_module, args, kwargs):
        x, *rest = args  # (B, N, C)
        n = x.shape[1]
        state["n"] = n
        m = -(-n // sp)
        if m * sp > n:
            x = F.pad(x, (0, 0, 0, m * sp - n))  # (B, N', C)
        return (x[:, sp_rank * m:(sp_rank + 1) * m].contiguous(), *rest), kwargs  # (B, N'/P, C)

    def gather(_module, _args, out):
        return _GatherTokens.apply(out, group)[:, :state["n"]]  # (B, N, C)

    blocks[0].register_forward_pre_hook(scatter, with_kwargs=True)
    blocks[-1].register_forward_hook(gather)
