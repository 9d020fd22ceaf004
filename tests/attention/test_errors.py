"""Bad arguments raise ValueError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from mmsparse.attention import AVSync, Axial, BlockSparse, Global, Local, Tiled, build_layout, sparse_attention


@pytest.fixture
def layout():
    return build_layout(Local(5), (40,), 16, 16)


def qkv(b=1, h=2, n=40, d=8, hk=None, dtype=torch.float32):
    return torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, hk or h, n, d, dtype=dtype), torch.randn(b, hk or h, n, d, dtype=dtype)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 40, 8),) + qkv()[1:], "q must be a 4D tensor"),
        (lambda: qkv(n=39), "N=39"),
        (lambda: (qkv()[0], qkv(d=4)[1], qkv()[2]), "must agree in B, N and D"),
        (lambda: qkv(h=3, hk=2), "multiple of k/v heads"),
        (lambda: (qkv()[0].double(),) + qkv()[1:], "float16, bfloat16 or float32"),
        (lambda: (qkv()[0].half(),) + qkv()[1:], "share one dtype"),
        (lambda: (qkv()[0], qkv()[1], torch.randn(1, 2, 40, 8, device="meta")), "one device"),
        (lambda: (qkv()[0], qkv()[1], torch.randn(1, 2, 41, 8)), "k and v must agree"),
    ],
)
def test_bad_tensors(layout, make, match):
    with pytest.raises(ValueError, match=match):
        sparse_attention(*make(), layout)


def test_bad_backend_and_layout(layout):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention(q, k, v, layout, backend="cuda")
    with pytest.raises(ValueError, match="block_layout must be a BlockLayout"):
        sparse_attention(q, k, v, torch.ones(40, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs CUDA"):
        sparse_attention(q, k, v, layout, backend="triton")


def test_sdpa_refuses_large_n(monkeypatch, layout):
    monkeypatch.setenv("MMSPARSE_SDPA_MAX_TOKENS", "32")
    with pytest.raises(ValueError, match="N <= 32"):
        sparse_attention(*qkv(), layout, backend="sdpa")


def test_flex_backward_on_cpu_is_refused(layout):
    q, k, v = (t.requires_grad_() for t in qkv())
    with pytest.raises(ValueError, match="no backward on the CPU"):
        sparse_attention(q, k, v, layout, backend="flex")


@pytest.mark.parametrize(
    "pattern,grid,match",
    [
        (Local((3, 9, 3)), (4, 5, 6), "larger than the grid"),
        (Local((2, 2), dilation=(3, 1)), (5, 6), "larger than the grid"),
        (Local((3, 3, 3)), (50,), "does not fit the layout"),
        (Local(3, modality="audio"), (50,), "modality 'audio'"),
        (Tiled((2, 2), radius=-1), (4, 4), "radius >= 0"),
        (Axial(3), (4, 4, 4), "fit no segment"),
        (Global(60), (50,), "0 < n <= N=50"),
        (AVSync(0.5), (50,), "two timed modalities"),
        (BlockSparse(((0,),), (16, 16)), (50,), "needs 4"),
    ],
)
def test_bad_patterns(pattern, grid, match):
    with pytest.raises(ValueError, match=match):
        build_layout(pattern, grid)


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        build_layout(Local(3), (10,), block_q=0)
    with pytest.raises(ValueError, match="Pattern"):
        build_layout("local", (10,))
    with pytest.raises(ValueError, match="2D bool"):
        BlockSparse.from_mask(torch.ones(3))
