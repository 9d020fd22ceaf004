"""The axial Triton kernels (lines read in place) against a float64 truth, forward and backward.

CPU: TRITON_INTERPRET=1 (conftest.py), float32 / float16 at small grids; GPU: bf16 at real sizes.
Error budget as in test_block_sparse_attention.py (CONVENTIONS.md item 3); every output buffer
is poisoned with NaN, so an unwritten element fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.attention import Axial, Local, Segment, StreamLayout, build_layout, sparse_attention
from mmsparse.attention.backends.reference import reference_attention
from mmsparse.attention.backends.triton_kernels import axial_geometry
from mmsparse.kernels import axial_attention as ax
from tests.kernels.budget import CUDA, DEV, check_budget, grads, inputs

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


# (grid, axes): time (stride H * W), a middle axis, the last axis (stride 1), two trailing axes
# (a frame: stride 1, L = H * W) and a line longer than one tile with a ragged end
if CUDA:
    GRIDS = [((32, 24, 40), 0), ((32, 24, 40), 1), ((32, 24, 40), 2), ((8, 12, 20), (1, 2)), ((150, 4, 6), 0)]
    DTYPES, SHAPE = (torch.bfloat16,), (2, 4, 2)
else:
    GRIDS = [((5, 3, 4), 0), ((5, 3, 4), 1), ((5, 3, 4), 2), ((2, 3, 7), (1, 2)), ((37, 2, 2), 0)]
    DTYPES, SHAPE = (torch.float32, torch.float16), (1, 2, 1)
RUNS = [(g, a, t) for g, a in GRIDS for t in DTYPES]


@pytest.mark.parametrize("grid,axes,dtype", RUNS, ids=[f"{g}-{a}-{str(t)[6:]}" for g, a, t in RUNS])
def test_matches_truth_through_sparse_attention_layout(grid, axes, dtype):
    """The geometry comes from the layout of an Axial pattern; compared with the reference
    backend on the same layout (float64 truth, dtype-level error as the budget)."""
    layout = build_layout(Axial(axes), grid, 16, 16)
    geometry = axial_geometry(layout)
    assert geometry is not None and math.prod(geometry) == layout.n
    d = 40
    q, k, v, dout, dlse = inputs(SHAPE, layout.n, d, seed=sum(grid) + len(str(axes)))
    truth = grads(lambda q, k, v: reference_attention(q.double(), k.double(), v.double(), layout.to(DEV), d**-0.5),
                   q, k, v, dout, dlse, torch.float64)
    low = grads(lambda q, k, v: ax.axial_attention_ref(q, k, v, geometry, d**-0.5) if dtype == torch.float32
                 else _low_precision_ref(q, k, v, geometry, d**-0.5), q, k, v, dout, dlse, dtype)
    got = grads(lambda q, k, v: ax.axial_attention(q, k, v, geometry, d**-0.5), q, k, v, dout, dlse, dtype)
    check_budget(got, low, truth, dtype)


def _low_precision_ref(q, k, v, geometry, scale):
    """Dense attention on the lines in the input dtype (float32 softmax, as SDPA's math path)."""
    outer, length, inner = geometry
    g = q.shape[1] // k.shape[1]
    ql, kl, vl = (ax.lines_view(t, outer, length, inner) for t in (q, k, v))
    kl, vl = kl.repeat_interleave(g, 1), vl.repeat_interleave(g, 1)
    s = (ql @ kl.transpose(-1, -2)).float() * scale
    out = torch.softmax(s, -1).to(q.dtype) @ vl
    lse = torch.logsumexp(s, -1)
    return (ax.tokens_view(out, outer, length, inner),
            ax.tokens_view(lse.unsqueeze(-1), outer, length, inner).squeeze(-1))


def test_poisoned_buffers_are_all_written():
    geometry = (3, 19, 5)
    q, k, v, dout, dlse = (t.to(DEV) for t in inputs(SHAPE, math.prod(geometry), 24, seed=11))
    nan = lambda t: torch.full_like(t, math.nan)
    out, lse_lines = ax.axial_forward(q, k, v, geometry, 0.2, out=nan(q))
    dq, dk, dv = ax.axial_backward(q, k, v, out, lse_lines, dout, geometry, 0.2, dlse=dlse, dq=nan(q), dk=nan(k), dv=nan(v))
    for name, t in (("out", out), ("lse", lse_lines), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), name


def test_tiles_shorter_than_the_line(monkeypatch):
    """Lines of 37 run as three 16-tiles (online softmax across tiles, ragged last tile)."""
    for kernel in ("fwd", "dq", "dkdv"):
        monkeypatch.setitem(ax.FORCED, kernel, (16, 16, 4, 1))
    geometry = (2, 37, 3)
    q, k, v, dout, dlse = inputs(SHAPE, math.prod(geometry), 32, seed=12)
    truth = grads(lambda q, k, v: ax.axial_attention_ref(q, k, v, geometry, 0.25), q, k, v, dout, dlse, torch.float64)
    got = grads(lambda q, k, v: ax.axial_attention(q, k, v, geometry, 0.25), q, k, v, dout, dlse, torch.float32)
    for name, g, t in zip(("out", "lse", "dq", "dk", "dv"), got, truth):
        assert (g.double() - t).abs().max().item() < 1e-4, name  # float32 (tf32x3 on a GPU)


def test_geometry_only_for_exact_axial_layouts():
    """Tile order, global tokens, a second segment, a modality filter that misses, or axes that
    are not consecutive keep the block-sparse path."""
    assert axial_geometry(build_layout(Axial(0), (4, 6, 8), 16, 16)) == (1, 4, 48)
    assert axial_geometry(build_layout(Axial((1, 2)), (4, 6, 8), 16, 16)) == (4, 48, 1)
    assert axial_geometry(build_layout(Axial(-1), (4, 6, 8), 16, 16)) == (24, 8, 1)
    assert axial_geometry(build_layout(Axial((0, 2)), (4, 6, 8), 16, 16)) is None
    assert axial_geometry(build_layout(Axial(0), StreamLayout.from_grid((4, 8, 8), order=(2, 4, 4)), 16, 16)) is None
    assert axial_geometry(build_layout(Axial(0), StreamLayout.from_grid((4, 6, 8), n_global=2), 16, 16)) is None
    two = StreamLayout.concat(Segment("video", (4, 6, 8)), Segment("audio", (2, 16)))
    assert axial_geometry(build_layout(Axial(0, modality="video"), two, 16, 16)) is None
    assert axial_geometry(build_layout(Axial(0) | Local(3), (4, 6, 8), 16, 16)) is None


def test_bad_geometry_raises():
    q = torch.randn(1, 2, 60, 16, device=DEV)
    with pytest.raises(ValueError, match="geometry"):
        ax.axial_attention(q, q, q, (2, 5, 7))
    with pytest.raises(ValueError, match="4D"):
        ax.axial_attention(q[0], q, q, (2, 5, 6))


@pytest.mark.skipif(not CUDA, reason="backend='triton' of sparse_attention needs CUDA tensors")
def test_sparse_attention_triton_takes_the_axial_path():
    layout = build_layout(Axial(0), (16, 12, 20), device="cuda")
    q, k, v = (torch.randn(1, 4, layout.n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = sparse_attention(q, k, v, layout, backend="triton")
    ref = sparse_attention(q, k, v, layout, backend="reference")
    assert (out.float() - ref.float()).abs().max().item() < 3e-2
