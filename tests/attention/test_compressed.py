"""The compressed branch (mean-pooled keys of every block) and its log-sum-exp merge with a
sparse layout, against plain softmax over explicitly listed keys, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.attention import Local, build_layout, sparse_attention
from mmsparse.attention.compressed import compressed_attention, merge_lse, pool_blocks


def _pool_loop(x, block, valid):
    b, h, n, d = x.shape
    c = math.ceil(n / block)
    out = torch.zeros(b, h, c, d, dtype=torch.float64)
    live = torch.zeros(b, c, dtype=torch.bool)
    for i in range(b):
        for j in range(c):
            idx = [t for t in range(j * block, min(n, (j + 1) * block)) if valid[i, t]]
            if idx:
                out[i, :, j] = x[i, :, idx].double().mean(1)
                live[i, j] = True
    return out, live


def _softmax_over(q, keys, vals, allowed, scale):
    """q (B, H, N, D); keys / vals (B, H, N, M, D) per query; allowed (B, H, N, M) -> out, lse."""
    s = torch.einsum("bhnd,bhnmd->bhnm", q, keys) * scale
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("bhnm,bhnmd->bhnd", p, vals), lse


@pytest.mark.parametrize("n,block", [(97, 8), (64, 16), (33, 40)])
def test_pool_blocks_matches_loop(n, block):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, 5, generator=g)
    valid = torch.rand(2, n, generator=g) > 0.3
    valid[1, : min(n, block)] = False  # a block with no real token
    got, live = pool_blocks(x, block, valid)
    want, want_live = _pool_loop(x, block, valid)
    assert torch.equal(live, want_live)
    torch.testing.assert_close(got.double()[want_live[:, None, :, None].expand_as(want)],
                               want[want_live[:, None, :, None].expand_as(want)], rtol=1e-5, atol=1e-6)


def test_compressed_attention_fwd_bwd_gqa():
    g = torch.Generator().manual_seed(1)
    b, h, hk, n, d, block = 2, 4, 2, 45, 8, 7
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hk, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hk, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(b, n, generator=g) > 0.2
    out, lse = compressed_attention(q, k, v, block, valid=valid)
    # reference: explicit block means, every query over all live blocks
    kc, live = pool_blocks(k, block, valid)
    vc, _ = pool_blocks(v, block, valid)
    kc, vc = kc.repeat_interleave(h // hk, 1), vc.repeat_interleave(h // hk, 1)
    c = kc.shape[2]
    keys = kc[:, :, None].expand(b, h, n, c, d)
    vals = vc[:, :, None].expand(b, h, n, c, d)
    want, want_lse = _softmax_over(q, keys, vals, live[:, None, None, :].expand(b, h, n, c), d ** -0.5)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse.double(), want_lse)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad((out * gout).sum() + lse.sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * gout).sum() + want_lse.sum(), (q, k, v))
    for a, w in zip(grads, want_grads):
        torch.testing.assert_close(a, w)


def test_chunked_queries_match_one_pass(monkeypatch):
    """Long streams go in query chunks recomputed in the backward pass: same values and gradients."""
    import mmsparse.attention.compressed as comp

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 50, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.rand(2, 50, generator=g) > 0.1
    out, lse = comp.compressed_attention(q, k, v, 6, valid=valid)
    want = torch.autograd.grad((out.sum() + lse.sum()), (q, k, v))
    monkeypatch.setattr(comp, "CHUNK_SCORES", 2 * 2 * 9 * 7)  # 7 query rows a chunk (9 blocks)
    out2, lse2 = comp.compressed_attention(q, k, v, 6, valid=valid)
    got = torch.autograd.grad((out2.sum() + lse2.sum()), (q, k, v))
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(lse2, lse)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


def test_compressed_attention_rejects_bad_shapes():
    q = torch.randn(1, 3, 10, 4)
    k = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="multiple of key heads"):
        compressed_attention(q, k, k, 4)
    with pytest.raises(ValueError, match="block must be"):
        compressed_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="valid must be"):
        compressed_attention(q, q, q, 4, valid=torch.ones(1, 9, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sparse_plus_compressed_equals_union_softmax(backend):
    """merge_lse(sparse, compressed) is one softmax over the layout's keys and the pooled keys."""
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the triton backend takes CUDA tensors (its kernels' LSE gradient is tested in tests/kernels)")
    grid, block = (3, 5, 7), 16
    layout = build_layout(Local((3, 3, 3)), grid, block_q=32, block_k=32)
    n = math.prod(grid)
    g = torch.Generator().manual_seed(3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, h, d = 1, 2, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dev).requires_grad_() for _ in range(3))
    out_s, lse_s = sparse_attention(q, k, v, layout, backend=backend, return_lse=True)
    out_c, lse_c = compressed_attention(q, k, v, block)
    out, lse = merge_lse(out_s, lse_s, out_c, lse_c)

    mask = layout.dense_mask().to(dev)  # (N, N) bool
    kc, _ = pool_blocks(k, block)
    vc, _ = pool_blocks(v, block)
    c = kc.shape[2]
    keys = torch.cat([k[:, :, None].expand(b, h, n, n, d), kc[:, :, None].expand(b, h, n, c, d)], 3)
    vals = torch.cat([v[:, :, None].expand(b, h, n, n, d), vc[:, :, None].expand(b, h, n, c, d)], 3)
    allowed = torch.cat([mask[None, None].expand(b, h, n, n), torch.ones(b, h, n, c, dtype=torch.bool, device=dev)], 3)
    want, want_lse = _softmax_over(q, keys, vals, allowed, d ** -0.5)
    torch.testing.assert_close(out, want, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(lse, want_lse, rtol=2e-4, atol=2e-5)
    gout = torch.randn(out.shape, generator=g).to(dev)
    got = torch.autograd.grad((out * gout).sum(), (q, k, v))
    ref = torch.autograd.grad((want * gout).sum(), (q, k, v))
    for a, w in zip(got, ref):
        torch.testing.assert_close(a, w, rtol=1e-3, atol=1e-4)


def test_merge_lse_empty_rows():
    out = torch.ones(1, 1, 2, 3)
    ninf = torch.full((1, 1, 2), -math.inf)
    merged, lse = merge_lse(out, ninf, out * 2, ninf)
    assert torch.equal(merged, torch.zeros_like(out)) and torch.isinf(lse).all()
    lse_b = torch.tensor([[[0.0, -math.inf]]])
    merged, _ = merge_lse(out, ninf, out * 2, lse_b)
    assert torch.equal(merged[0, 0, 0], torch.full((3,), 2.0)) and torch.equal(merged[0, 0, 1], torch.zeros(3))
