"""Reformer LSH attention around any backend: hash, sort, attend in sorted chunks, unsort.

Legend: B batch, H query heads, Hk key heads, N tokens, D head dim, R hashing rounds,
nb buckets.

For each round the queries and keys are hashed with one seeded random rotation
(nb / 2 directions, bucket = argmax over [xR, -xR] of the unit vector), stably sorted by
bucket, and attended with the layout's static chunk band (own chunk and the one before) by
the chosen backend; outputs go back to token order and the rounds are merged with weights
exp(lse_r - logsumexp_r lse_r). Gradients flow through the gathers.
"""

from __future__ import annotations

import torch

from .patterns import LSH


def lsh_buckets(x: torch.Tensor, pattern: LSH, round_: int) -> torch.Tensor:
    """x (B, H, N, D) -> bucket ids (B, H, N) int64 for hashing round `round_`."""
    gen = torch.Generator().manual_seed(pattern.seed * 1_000_003 + round_)
    rot = torch.randn(x.shape[-1], pattern.buckets // 2, generator=gen).to(x.device, torch.float32)
    proj = torch.nn.functional.normalize(x.detach().float(), dim=-1) @ rot
    return torch.cat([proj, -proj], -1).argmax(-1)


def sorted_order(x: torch.Tensor, pattern: LSH, round_: int) -> torch.Tensor:
    """(B, H, N) permutation that sorts tokens by (bucket, position)."""
    n = x.shape[2]
    key = lsh_buckets(x, pattern, round_) * n + torch.arange(n, device=x.device)
    return key.argsort(-1)


def _gather(x, idx):
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


def lsh_attention(q, k, v, layout, attend):
    """attend(q, k, v, layout) -> (out, lse) is a backend; returns (out, lse) in token order."""
    pattern: LSH = layout.pattern
    b, h, n, d = q.shape
    r = h // k.shape[1]
    # keys are hashed per key head; queries use their key head's order when the heads are
    # shared (GQA) so a query head and its key head see the same sort
    outs, lses = [], []
    for round_ in range(pattern.rounds):
        order_q = sorted_order(q, pattern, round_)  # (B, H, N)
        order_k = sorted_order(k, pattern, round_)  # (B, Hk, N)
        qs = _gather(q, order_q)
        ks, vs = _gather(k, order_k), _gather(v, order_k)
        if r > 1:  # each query head needs its own key order: expand keys to query heads
            ks, vs = ks.repeat_interleave(r, 1), vs.repeat_interleave(r, 1)
        out_s, lse_s = attend(qs, ks, vs, layout)
        inverse = order_q.argsort(-1)
        outs.append(_gather(out_s, inverse))
        lses.append(lse_s.gather(2, inverse))
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.stack(lses)  # (R, B, H, N)
    total = torch.logsumexp(lse, 0)
    weights = torch.exp(lse - total).nan_to_num(0.0)
    out = sum(w[..., None].to(o.dtype) * o for w, o in zip(weights, outs))
    return out, total
