"""Every backend against an independent dense float64 computation, forward and backward.

Error budget (docs/conventions.md, item 3): a backend's error against the float64 truth is at most
twice the error of plain dense attention run in the same low-precision dtype, plus a small
absolute floor for float32 round-off.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from mmsparse.attention import (
    AVSync, Axial, Global, Local, Segment, StreamLayout, Tiled, bigbird, build_layout, longformer,
    sliding_window_with_sinks, sparse_attention, sparse_transformer,
)
from tests.attention.oracle import oracle_mask

AV = StreamLayout.concat(
    Segment("video", (3, 4, 5), seconds=0.5, order=(1, 2, 5)), Segment("audio", (2, 13), seconds=0.12), n_global=2
)
CASES = [
    ("local3d", Local((3, 3, 5)), (3, 5, 7)),
    ("tiled_order", Tiled((2, 2, 4), 1), StreamLayout.from_grid((4, 5, 9), order=(2, 2, 4))),
    ("axial", Axial(1), (4, 6, 5)),
    ("longformer", longformer(15, 3), (97,)),
    ("bigbird", bigbird(9, 2, 2, 8, seed=5), (101,)),
    ("strided", sparse_transformer(8), (90,)),
    ("sinks_causal", sliding_window_with_sinks(12, 2), (77,)),
    ("multimodal", Local((3, 3, 3), modality="video") | AVSync(0.5) | Global(2), AV),
]
BACKENDS = ["reference", "sdpa"]


def dense_attention(q, k, v, mask, scale):
    """Plain dense masked attention in the inputs' dtype (GQA by repeating heads)."""
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,pattern,layout", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_dense_truth(name, pattern, layout, backend, dtype):
    # a seed per case that every process agrees on (hash() of a str changes with PYTHONHASHSEED:
    # a failure could not be reproduced)
    torch.manual_seed(zlib.crc32(f"{name}/{backend}/{dtype}".encode()))
    bl = build_layout(pattern, layout, block_q=16, block_k=32)
    n, b, h, hk, d = bl.n, 2, 4, 2, 24
    mask = oracle_mask(pattern, layout)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    dout = torch.randn(b, h, n, d)
    scale = d**-0.5
    truth = grads(lambda *x: dense_attention(*x, mask, scale), *(t.double() for t in (q, k, v)), dout.double())
    low = grads(lambda *x: dense_attention(*x, mask, scale), *(t.to(dtype) for t in (q, k, v)), dout.to(dtype))
    got = grads(lambda *x: sparse_attention(*x, bl, backend=backend), *(t.to(dtype) for t in (q, k, v)), dout.to(dtype))
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for name_t, g, lo, t in zip(("out", "dq", "dk", "dv"), got, low, truth):
        assert g.dtype == dtype and g.shape == t.shape
        assert torch.isfinite(g).all(), name_t
        assert max_err(g, t) <= 2 * max_err(lo, t) + floor, (name_t, max_err(g, t), max_err(lo, t))


@pytest.mark.parametrize("name,pattern,layout", CASES, ids=[c[0] for c in CASES])
def test_flex_forward_matches_reference(name, pattern, layout):
    # torch FlexAttention has no CPU backward: forward and log-sum-exp only here (GPU: both).
    torch.manual_seed(0)
    bl = build_layout(pattern, layout, block_q=16, block_k=16)
    q, k, v = (torch.randn(1, 2, bl.n, 16) for _ in range(3))
    with torch.no_grad():
        ref, ref_lse = sparse_attention(q, k, v, bl, backend="reference", return_lse=True)
        out, lse = sparse_attention(q, k, v, bl, backend="flex", return_lse=True)
    assert max_err(out, ref) < 1e-5 and max_err(lse, ref_lse) < 1e-5


def test_lse_matches_dense():
    torch.manual_seed(1)
    bl = build_layout(longformer(15, 3), (97,), 16, 16)
    q, k, v = (torch.randn(1, 2, 97, 8) for _ in range(3))
    mask = oracle_mask(longformer(15, 3), (97,))
    s = (q.double() @ k.double().transpose(-1, -2)) * 8**-0.5
    truth = torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
    for backend in BACKENDS:
        _, lse = sparse_attention(q, k, v, bl, backend=backend, return_lse=True)
        assert lse.dtype == torch.float32 and max_err(lse, truth) < 1e-5, backend


def test_rows_without_keys_give_zeros_in_reference():
    from mmsparse.attention import BlockSparse

    bl = build_layout(BlockSparse(((0,), ()), (8, 8)), (16,), 8, 8)
    q, k, v = (torch.randn(1, 1, 16, 4) for _ in range(3))
    out, lse = sparse_attention(q, k, v, bl, backend="reference", return_lse=True)
    assert torch.equal(out[0, 0, 8:], torch.zeros(8, 4)) and torch.isinf(lse[0, 0, 8:]).all()


def test_auto_picks_reference_on_cpu_and_env_overrides(monkeypatch):
    bl = build_layout(Local(5), (40,), 16, 16)
    q = torch.randn(1, 1, 40, 8)
    ref = sparse_attention(q, q, q, bl, backend="reference")
    assert torch.equal(sparse_attention(q, q, q, bl), ref)
    monkeypatch.setenv("MMSPARSE_ATTENTION_BACKEND", "sdpa")
    assert max_err(sparse_attention(q, q, q, bl), ref) < 1e-5
    monkeypatch.setenv("MMSPARSE_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match="MMSPARSE_ATTENTION_BACKEND"):
        sparse_attention(q, q, q, bl)


def test_reference_runs_65536_tokens_with_a_3d_window():
    """N = 65,536 on the CPU, memory O(N k): spot-check rows against dense attention."""
    torch.manual_seed(2)
    grid = (16, 64, 64)
    pattern = Local((3, 5, 5))
    bl = build_layout(pattern, grid)
    n, d = bl.n, 16
    q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
    with torch.no_grad():
        out = sparse_attention(q, k, v, bl, backend="reference")
    rows = torch.tensor([0, 1, 4159, 33000, n - 1])
    qi = rows[:, None]
    ki = torch.arange(n)[None, :]
    mask = bl.program.evaluate(qi, ki)
    assert (mask.sum(1) == 75).all()  # 3 x 5 x 5 keys per query, borders included
    s = (q[0, 0, rows] @ k[0, 0].T) * d**-0.5
    expected = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v[0, 0]
    assert max_err(out[0, 0, rows], expected) < 1e-5


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("backend", ["flex", "sdpa", "reference"])
@pytest.mark.parametrize("name,pattern,layout", [
    ("local3d", Local((3, 5, 5)), (8, 16, 24)),
    ("tiled_order", Tiled((2, 4, 8), 1), StreamLayout.from_grid((8, 16, 24), order=(2, 4, 8))),
    ("longformer", longformer(129, 16), (3000,)),
    ("bigbird", bigbird(65, 16, 2, 64), (3000,)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_gpu_backends_bf16(name, pattern, layout, backend):
    """On the GPU, at real sizes, bf16, forward and backward, within the error budget."""
    torch.manual_seed(0)
    dev = "cuda"
    bl = build_layout(pattern, layout, device=dev)
    n, b, h, hk, d = bl.n, 2, 4, 2, 64
    mask = bl.dense_mask().to(dev)
    q, k, v, dout = (torch.randn(b, x, n, d, device=dev) for x in (h, hk, hk, h))
    scale = d**-0.5
    truth = grads(lambda *x: dense_attention(*x, mask, scale), q, k, v, dout)
    low = grads(lambda *x: dense_attention(*x, mask, scale), *(t.bfloat16() for t in (q, k, v, dout)))
    got = grads(lambda *x: sparse_attention(*x, bl, backend=backend), *(t.bfloat16() for t in (q, k, v, dout)))
    for name_t, g, lo, t in zip(("out", "dq", "dk", "dv"), got, low, truth):
        assert max_err(g, t) <= 2 * max_err(lo, t) + 1e-3, (name_t, max_err(g, t), max_err(lo, t))


@cuda
def test_gpu_layout_equals_cpu_layout():
    pattern, grid = Local((7, 13, 13)), (32, 48, 48)
    gpu = build_layout(pattern, grid, device="cuda")
    cpu = build_layout(pattern, grid)
    for name in ("q_full_ptr", "q_full_idx", "q_part_ptr", "q_part_idx", "k_part_ptr", "k_part_idx"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient(backend):
    """lse is differentiable (d lse / d s = p): needed to merge attention results (LSH rounds)."""
    torch.manual_seed(3)
    pattern, grid = Local((3, 3, 5)), (3, 5, 7)
    bl = build_layout(pattern, grid, 16, 16)
    mask = oracle_mask(pattern, grid)
    q, k, v = (torch.randn(1, 2, bl.n, 8, dtype=torch.float64) for _ in range(3))
    w = torch.randn(1, 2, bl.n, dtype=torch.float64)

    def truth_fn(q, k, v):
        s = (q @ k.transpose(-1, -2)) * 8**-0.5
        return torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)

    qt, kt = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    (truth_fn(qt, kt, v) * w).sum().backward()
    qg, kg, vg = (t.float().requires_grad_(True) for t in (q, k, v))
    _, lse = sparse_attention(qg, kg, vg, bl, backend=backend, return_lse=True)
    (lse * w.float()).sum().backward()
    assert max_err(qg.grad, qt.grad) < 1e-5 and max_err(kg.grad, kt.grad) < 1e-5
    assert vg.grad is None or vg.grad.abs().max() < 1e-6


def test_backend_counts_records_what_ran_nested():
    """backend_counts: the backends sparse_attention ran while the block was open, auto's
    choice resolved (the reference off CUDA), "dense" for calls without a layout; an inner block
    counts its own calls and the outer one all of them; nothing is counted after the block."""
    from mmsparse.attention import Local, build_layout
    from mmsparse.attention.backends import backend_counts, sparse_attention

    layout = build_layout(Local(5), (40,), 16, 16)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with backend_counts() as outer:
        sparse_attention(q, k, v, layout)
        with backend_counts() as inner:
            sparse_attention(q, k, v, layout, backend="sdpa")
            sparse_attention(q, k, v, None)
    sparse_attention(q, k, v, layout)
    assert inner == {"sdpa": 1, "dense": 1}
    assert outer == {"reference": 1, "sdpa": 1, "dense": 1}
