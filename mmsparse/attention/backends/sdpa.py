"""The sdpa backend: torch's scaled_dot_product_attention with the layout's dense boolean mask
(N x N, so small N only: `KernelOptions.sdpa_max_tokens`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmsparse.kernels.options import kernel_options

from ..blocklayout import BlockLayout


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """Why sdpa cannot run this layout (its N x N mask would be too large), or None."""
    limit = kernel_options().sdpa_max_tokens
    if layout.n > limit:
        return (f"backend='sdpa' builds a dense N x N mask and takes N <= {limit} "
                f"(MMSPARSE_SDPA_MAX_TOKENS); got N={layout.n}: use 'reference', 'flex' or 'triton'")
    return None


def dense_mask(layout: BlockLayout) -> torch.Tensor:
    """The layout's (N, N) bool mask, cached on it."""
    cached = getattr(layout, "_dense", None)
    if cached is None:
        cached = layout._dense = layout.dense_mask(kernel_options().sdpa_max_tokens)
    return cached


def run(q, k, v, layout: BlockLayout, scale, key_padding_mask=None, return_lse: bool = True):
    reason = can_run(q, k, v, layout)
    if reason:
        raise ValueError(reason)
    kpm = key_padding_mask
    mask = dense_mask(layout)
    if kpm is not None:
        mask = mask & ~kpm[:, None, None, :]  # (B, 1, N, N)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if kpm is not None:  # rows left with no key: SDPA gives NaN, the contract says 0
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    lse = None
    if return_lse:
        kr = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
    return out, lse


def dense_attention(q, k, v, key_padding_mask=None):
    """Dense attention (no layout) through SDPA; key_padding_mask (B, N) bool, True at padding
    keys. The models' path where a layer's pattern is dense."""
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
