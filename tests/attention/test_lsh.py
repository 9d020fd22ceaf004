"""Reformer LSH attention against a dense computation of its definition."""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.attention import LSH, Local, build_layout, reformer, sparse_attention
from mmsparse.attention.lsh import lsh_buckets


def dense_lsh(q, k, v, pattern: LSH):
    """Per round: rank tokens by (bucket, position), chunk the ranks, let a query chunk attend
    its own and the previous key chunk; merge rounds by log-sum-exp."""
    b, h, n, d = q.shape
    r = h // k.shape[1]
    outs, lses = [], []
    for rnd in range(pattern.rounds):
        def chunk_of(x):
            bucket = lsh_buckets(x, pattern, rnd)
            ranks = torch.empty_like(bucket)
            for bi in range(x.shape[0]):
                for hi in range(x.shape[1]):
                    order = sorted(range(n), key=lambda i: (int(bucket[bi, hi, i]), i))
                    for rank, i in enumerate(order):
                        ranks[bi, hi, i] = rank
            return ranks // pattern.chunk

        cq = chunk_of(q)
        ck = chunk_of(k).repeat_interleave(r, 1)
        diff = cq[..., :, None] - ck[..., None, :]
        mask = (diff == 0) | (diff == 1)
        kk, vv = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        s = (q @ kk.transpose(-1, -2)) * d**-0.5
        s = s.masked_fill(~mask, -math.inf)
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.softmax(s, -1) @ vv)
    lse = torch.stack(lses)
    total = torch.logsumexp(lse, 0)
    return sum(torch.exp(l - total)[..., None] * o for l, o in zip(lse, outs)), total


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("pattern,heads", [(LSH(8, 1, 3, 16), (2, 2)), (reformer(4, 2, 16, seed=1), (4, 2))])
def test_lsh_matches_definition(pattern, heads, backend):
    torch.manual_seed(0)
    n, d = 75, 16
    h, hk = heads
    q = torch.randn(2, h, n, d)
    k, v = torch.randn(2, hk, n, d), torch.randn(2, hk, n, d)
    layout = build_layout(pattern, (n,), 16, 16)
    dout = torch.randn(2, h, n, d)

    def run(fn, *xs):
        xs = [x.clone().requires_grad_(True) for x in xs]
        out, lse = fn(*xs)
        out.backward(dout.to(out.dtype))
        return [out.detach(), lse.detach()] + [x.grad for x in xs]

    truth = run(lambda *x: dense_lsh(*x, pattern), *(t.double() for t in (q, k, v)))
    got = run(lambda *x: sparse_attention(*x, layout, backend=backend, return_lse=True), q, k, v)
    for name, g, t in zip(("out", "lse", "dq", "dk", "dv"), got, truth):
        assert (g.double() - t).abs().max() < 2e-5, name


def test_lsh_buckets_deterministic_and_local():
    x = torch.randn(1, 1, 50, 8)
    p = LSH(16, 1, seed=4)
    assert torch.equal(lsh_buckets(x, p, 0), lsh_buckets(x, p, 0))
    assert not torch.equal(lsh_buckets(x, p, 0), lsh_buckets(x, LSH(16, 1, seed=5), 0))
    # a vector and a slightly perturbed copy almost always share a bucket
    y = x + 1e-3 * torch.randn_like(x)
    assert (lsh_buckets(x, p, 0) == lsh_buckets(y, p, 0)).float().mean() > 0.9


def test_lsh_is_not_composable_and_validates():
    with pytest.raises(ValueError, match="cannot be combined"):
        LSH() | Local(3)
    with pytest.raises(ValueError, match="even buckets"):
        build_layout(LSH(buckets=7), (64,))
