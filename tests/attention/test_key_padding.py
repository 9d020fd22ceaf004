"""Key padding (clips of different lengths in one batch): every backend and both Triton kernels
against a float64 dense truth, forward and backward.

Sample 0 has no padding; sample 1 has padded frames at the end of its video segment (inside
the stream, before the audio) and some padded audio, so a query whose whole window is padding
attends nothing (zeros, LSE -inf) while others lose only part of their keys. Padding keys
must get exactly zero dk / dv.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.attention import (
    LSH, Axial, Local, Segment, StreamLayout, build_layout, sparse_attention,
)
from mmsparse.attention.backends.triton_kernels import axial_geometry, block_lists
from mmsparse.kernels import axial_attention as ax
from mmsparse.kernels import block_sparse as bsa

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

_STREAM = StreamLayout.concat(Segment("video", (4, 3, 5)), Segment("audio", (2, 11)))
_PATTERN = Local((1, 3, 3), modality="video") | Local((1, 5), modality="audio")  # frame-wise video windows


def _padding(n: int) -> torch.Tensor:
    """(2, N): sample 1 loses its last video frame (15 tokens inside the stream) and 4 audio steps."""
    video, audio = _STREAM.segments
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, video.offset + 3 * 15: video.offset + 4 * 15] = True
    pad[1, audio.offset: audio.offset + audio.numel].view(2, 11)[:, 7:] = True
    return pad


def _inputs(n, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(2, 2, n, d, generator=gen) for _ in range(4))
    dlse = torch.randn(2, 2, n, generator=gen)
    return [t.to(DEV, dtype) for t in (q, k, v)], dout.to(DEV), dlse.to(DEV)


def _run(fn, qkv, dout, dlse, grad=True):
    qkv = [t.detach().requires_grad_(grad) for t in qkv]
    out, lse = fn(*qkv)
    if not grad:
        return out.detach(), lse.detach()
    finite = torch.isfinite(lse)
    loss = (out.double() * dout.double()).sum() + (torch.where(finite, lse, 0.0).double() * dlse.double()).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, qkv))


def _check(got, truth, tol, pad):
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, t in zip(names, got, truth):
        assert not torch.isnan(g).any(), name
        if name == "lse":
            assert torch.equal(torch.isinf(g), torch.isinf(t)), "lse -inf exactly where a row attends nothing"
            g, t = torch.where(torch.isinf(t), 0.0, g.double()), torch.where(torch.isinf(t), 0.0, t.double())
        assert (g.double() - t.double()).abs().max().item() < tol, name
        if name in ("dk", "dv"):
            assert g[pad[:, None, :].expand(-1, g.shape[1], -1).to(g.device)].abs().max().item() == 0.0, name


@pytest.fixture(scope="module")
def case():
    layout = build_layout(_PATTERN, _STREAM, 16, 16)
    pad = _padding(layout.n)
    qkv, dout, dlse = _inputs(layout.n)
    truth = _run(lambda q, k, v: bsa.block_sparse_attention_ref(q.double(), k.double(), v.double(), layout.dense_mask(),
                                                                 0.25, key_padding_mask=pad),
                 [t.double() for t in qkv], dout, dlse)
    # the case means what it says: some rows attend nothing, and padding changes the result
    assert torch.isinf(truth[1][1]).any() and not torch.isinf(truth[1][0]).any()
    plain = bsa.block_sparse_attention_ref(*(t.double() for t in qkv), layout.dense_mask(), 0.25)[0]
    assert (plain[1] - truth[0][1]).abs().max() > 1e-3 and torch.allclose(plain[0], truth[0][0])
    return layout, pad, qkv, dout, dlse, truth


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_backends_forward_and_backward(case, backend):
    layout, pad, qkv, dout, dlse, truth = case
    got = _run(lambda q, k, v: sparse_attention(q, k, v, layout.to(DEV), backend=backend, scale=0.25,
                                                return_lse=True, key_padding_mask=pad.to(DEV)), qkv, dout, dlse)
    _check(got, truth, 1e-4, pad)


def test_flex_forward(case):
    layout, pad, qkv, dout, dlse, truth = case
    if CUDA:  # flex's GPU kernels take no 16-token blocks; the same pattern in 128-blocks
        layout = build_layout(_PATTERN, _STREAM, 128, 128)
    with torch.no_grad():
        out, lse = sparse_attention(*qkv, layout.to(DEV), backend="flex", scale=0.25, return_lse=True,
                                    key_padding_mask=pad.to(DEV))
    finite = torch.isfinite(truth[1])
    assert (out.double() - truth[0]).abs().max().item() < 1e-4
    assert torch.allclose(torch.where(finite, lse.double(), 0.0), torch.where(finite, truth[1].double(), 0.0), atol=1e-4)


def test_triton_block_sparse_kernel(case):
    layout, pad, qkv, dout, dlse, truth = case
    got = _run(lambda q, k, v: bsa.block_sparse_attention(q, k, v, block_lists(layout.to(DEV)), 0.25, key_padding_mask=pad.to(DEV)),
               qkv, dout, dlse)
    _check(got, truth, 1e-4, pad)


def test_triton_block_sparse_kernel_split_rows(case, set_options):
    """Rows split into chunks of 2 blocks, of which some see only padding, merge right."""
    layout, pad, qkv, dout, dlse, truth = case
    set_options(split_chunk=2)
    got = _run(lambda q, k, v: bsa.block_sparse_attention(q, k, v, block_lists(layout.to(DEV)), 0.25, key_padding_mask=pad.to(DEV)),
               qkv, dout, dlse)
    _check(got, truth, 1e-4, pad)


def test_triton_axial_kernel():
    """Time lines of sample 1 lose their padded frames; a line of padding only is empty."""
    grid = (6, 3, 4)
    layout = build_layout(Axial(0), grid, 16, 16)
    geometry = axial_geometry(layout)
    pad = torch.zeros(2, layout.n, dtype=torch.bool)
    pad[1, 4 * 12:] = True  # frames 4 and 5 of sample 1
    qkv, dout, dlse = _inputs(layout.n, seed=1)
    truth = _run(lambda q, k, v: ax.axial_attention_ref(q, k, v, geometry, 0.25, key_padding_mask=pad),
                 [t.double() for t in qkv], dout, dlse)
    got = _run(lambda q, k, v: ax.axial_attention(q, k, v, geometry, 0.25, key_padding_mask=pad.to(DEV)), qkv, dout, dlse)
    _check(got, truth, 1e-4, pad)
    # and the same layout through the block-sparse reference
    ref = sparse_attention(*qkv, layout.to(DEV), backend="reference", scale=0.25, key_padding_mask=pad.to(DEV))
    assert (ref.double() - truth[0]).abs().max().item() < 1e-4


def test_bad_key_padding_mask_raises():
    layout = build_layout(Local(3), (20,), 16, 16)
    q = torch.randn(2, 1, 20, 8, device=DEV)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        sparse_attention(q, q, q, layout, backend="reference", key_padding_mask=torch.zeros(2, 20, device=DEV))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, N\)"):
        sparse_attention(q, q, q, layout, backend="reference", key_padding_mask=torch.zeros(2, 19, dtype=torch.bool))
    lsh = build_layout(LSH(buckets=4, chunk=8), (32,), 16, 16)
    q = torch.randn(2, 1, 32, 8, device=DEV)
    with pytest.raises(ValueError, match="LSH"):
        sparse_attention(q, q, q, lsh, backend="reference", key_padding_mask=torch.zeros(2, 32, dtype=torch.bool))
