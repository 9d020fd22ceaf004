"""Strided layouts (`rest | Strided(s)`) split into block-sparse + axial kernels merged by LSE,
against a float64 truth on the whole layout, forward and backward.

CPU: TRITON_INTERPRET=1, float32 / float16 at small N; GPU: bf16 at real sizes. Error budget as
in the other kernel tests (CONVENTIONS.md item 3): at most twice the error of the dense masked
attention computed in the input dtype, plus a floor.
"""

from __future__ import annotations

import pytest
import torch

from mmsparse.attention import Global, Local, Strided, build_layout, sparse_attention
from mmsparse.attention.patterns import sparse_transformer
from mmsparse.attention.backends.triton_kernels import strided_split
from mmsparse.kernels.block_sparse import block_sparse_attention_ref
from mmsparse.kernels.strided_attention import strided_attention
from tests.kernels.budget import CUDA, DEV, check_budget, grads, inputs

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

BLOCK = 64 if CUDA else 16

# (name, pattern, N): N a multiple of the stride or not, a band narrower than the stride (the
# overlap is the diagonal: the merge kernels remove it), a band wider than it and global tokens
# (the diagonal and pairs off it: PyTorch removes those), the strided part alone, global tokens
# without a band (only the global rows' diagonal: every overlap pair through PyTorch)
if CUDA:
    CASES = [("st128", sparse_transformer(128), 4096), ("st64-ragged", sparse_transformer(64), 3000),
             ("wide+global", Local(97) | Global(40) | Strided(32), 2500), ("alone", Strided(100), 2048),
             ("global-only", Global(64) | Strided(128), 4000)]
    DTYPES, SHAPE = (torch.bfloat16,), (2, 4, 2)
else:
    CASES = [("st8", sparse_transformer(8), 64), ("st8-ragged", sparse_transformer(8), 61),
             ("wide+global", Local(13) | Global(3) | Strided(5), 53), ("alone", Strided(7), 45),
             ("global-only", Global(3) | Strided(5), 47)]
    DTYPES, SHAPE = (torch.float32, torch.float16), (1, 2, 1)
RUNS = [(c, t) for c in CASES for t in DTYPES]


@pytest.mark.parametrize("case,dtype", RUNS, ids=[f"{c[0]}-{str(t)[6:]}" for c, t in RUNS])
def test_matches_truth(case, dtype):
    name, pattern, n = case
    layout = build_layout(pattern, (n,), BLOCK, BLOCK, device=DEV)
    split = strided_split(layout)
    assert split is not None
    assert split.diag == (name not in ("alone", "global-only"))
    assert (split.xq.numel() > 0) == (name in ("wide+global", "global-only"))
    d = 24
    q, k, v, dout, dlse = inputs(SHAPE, n, d, seed=n)
    ref = lambda up: (lambda q, k, v: block_sparse_attention_ref(q, k, v, layout.dense_mask(), d**-0.5, upcast=up))
    truth = grads(ref(True), q, k, v, dout, dlse, torch.float64)
    low = grads(ref(False), q, k, v, dout, dlse, dtype)
    got = grads(lambda q, k, v: strided_attention(q, k, v, split, d**-0.5), q, k, v, dout, dlse, dtype)
    check_budget(got, low, truth, dtype)


def test_key_padding():
    """Padding keys are never attended by either part, and the overlap removes none of them."""
    n, d = (3000, 64) if CUDA else (59, 16)
    pattern = Local(97) | Global(40) | Strided(32) if CUDA else Local(13) | Global(3) | Strided(5)
    layout = build_layout(pattern, (n,), BLOCK, BLOCK, device=DEV)
    split = strided_split(layout)
    q, k, v, dout, dlse = inputs(SHAPE, n, d, seed=5)
    kpm = torch.zeros(SHAPE[0], n, dtype=torch.bool)
    kpm[0, n // 3: n // 2] = True
    kpm[-1, 1] = True  # a global token is padding
    kpm[:, -7:] = True  # the ragged tail
    kpm = kpm.to(DEV)
    dtype = torch.bfloat16 if CUDA else torch.float32
    ref = lambda up: (lambda q, k, v: block_sparse_attention_ref(q, k, v, layout.dense_mask(), d**-0.5, upcast=up,
                                                                 key_padding_mask=kpm))
    truth = grads(ref(True), q, k, v, dout, dlse, torch.float64)
    low = grads(ref(False), q, k, v, dout, dlse, dtype)
    got = grads(lambda q, k, v: strided_attention(q, k, v, split, d**-0.5, key_padding_mask=kpm),
                 q, k, v, dout, dlse, dtype)
    check_budget(got, low, truth, dtype)
    for b in range(SHAPE[0]):  # padding keys get no gradient from either part or the overlap
        assert got[3][b][:, kpm[b]].abs().max() == 0 and got[4][b][:, kpm[b]].abs().max() == 0


def test_overlap_pairs_are_exactly_the_intersection():
    n, s = 50, 6
    layout = build_layout(Local(9) | Global(2) | Strided(s), (n,), 16, 16)
    split = strided_split(layout)
    got = set(zip(split.oq.tolist(), split.ok.tolist()))
    rest = build_layout(Local(9) | Global(2), (n,), 16, 16).dense_mask()
    want = {(a, b) for a in range(n) for b in range(n) if (a - b) % s == 0 and rest[a, b]}
    assert got == want and len(got) > n  # the diagonal and the global tokens' strided keys


def test_only_strided_unions_split():
    assert strided_split(build_layout(Local(9), (64,), 16, 16)) is None
    assert strided_split(build_layout(Local(9) | Strided(8, causal=True), (64,), 16, 16)) is None
    assert strided_split(build_layout(Local(9) | Strided(8) | Strided(4), (64,), 16, 16)) is None
    assert strided_split(build_layout(Strided(64), (64,), 16, 16)) is None  # the diagonal alone
    assert strided_split(build_layout(Strided(8), (64,), 16, 16)).rest is None
    q = torch.randn(1, 1, 64, 16, device=DEV)
    with pytest.raises(ValueError, match="StridedSplit"):
        strided_attention(q, q, q, build_layout(Local(9), (64,), 16, 16, device=DEV))
    with pytest.raises(ValueError, match="N=50"):
        strided_attention(q, q, q, strided_split(build_layout(Local(9) | Strided(8), (50,), 16, 16, device=DEV)))


@pytest.mark.skipif(not CUDA, reason="backend='triton' of sparse_attention needs CUDA tensors")
def test_sparse_attention_triton_takes_the_strided_path():
    layout = build_layout(sparse_transformer(128), (8192,), device="cuda")
    q, k, v = (torch.randn(1, 4, layout.n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = sparse_attention(q, k, v, layout, backend="triton")
    assert strided_split(layout) is not None
    ref = sparse_attention(q, k, v, layout, backend="flex")
    assert (out.float() - ref.float()).abs().max().item() < 3e-2
