"""The compressed branch (mean-pooled keys of every block) and its log-sum-exp merge with a
sparse layout, against plain softmax over explicitly listed keys, forward and backward."""

from __future__ import annotations

import math
import os

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


@pytest.mark.parametrize("n,block,masked", [(97, 8, False), (97, 8, True), (40, 40, True), (7, 16, False)])
def test_pool_blocks_gradient(n, block, masked):
    """Whole blocks and a ragged last one, with and without `valid`: the means' gradient in x is
    the loop's (float64)."""
    g = torch.Generator().manual_seed(7 * n + block)
    x = torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(2, n, generator=g) > 0.3 if masked else None
    got, live = pool_blocks(x, block, valid)
    want, want_live = _pool_loop(x, block, torch.ones(2, n, dtype=torch.bool) if valid is None else valid)
    assert torch.equal(live, want_live)
    sel = want_live[:, None, :, None].expand_as(want)
    torch.testing.assert_close(got[sel], want[sel])
    gout = torch.randn_like(got)
    (dx,) = torch.autograd.grad(got[sel].mul(gout[sel]).sum(), x)
    (dx_want,) = torch.autograd.grad(want[sel].mul(gout[sel]).sum(), x)
    torch.testing.assert_close(dx, dx_want)


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


def _branches_merged(q, k, v, layout, block, valid, kpm):
    out_s, lse_s = sparse_attention(q, k, v, layout, backend="reference", key_padding_mask=kpm, return_lse=True)
    out_c, lse_c = compressed_attention(q, k, v, block, valid=valid)
    return merge_lse(out_s, lse_s, out_c, lse_c)[0]


def _inputs(grid, b, h, hk, d, seed):
    from mmsparse.attention import Local

    layout = build_layout(Local((3, 3, 3)), grid, block_q=32, block_k=32)  # partial blocks: odd grid
    n = math.prod(grid)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g).requires_grad_()
    k, v = (torch.randn(b, hk, n, d, generator=g).requires_grad_() for _ in range(2))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[-1, n - n // 3:] = False  # the last clip is shorter: padding keys
    return layout, q, k, v, valid, g


@pytest.mark.parametrize("grid,block,hk,backend", [((3, 5, 7), 16, 2, "reference"), ((4, 6, 9), 64, 1, "reference"),
                                                   ((3, 4, 11), 5, 2, "reference"), ((3, 5, 7), 16, 2, "sdpa"),
                                                   ((3, 4, 11), 5, 1, "flex")])
def test_pooled_keys_in_the_kernel_equal_the_merged_branches(grid, block, hk, backend):
    """One softmax over the wide layout (sparse keys + pooled key blocks) is merge_lse of the
    sparse and compressed branches: forward and backward, odd N, padding, GQA; the backends that
    read the layout's blocks (reference, sdpa) and the one that reads its mask program (flex)."""
    from mmsparse.attention.compressed import sparse_with_pooled_keys

    layout, q, k, v, valid, g = _inputs(grid, 2, 2, hk, 16, sum(grid) + block)
    want = _branches_merged(q, k, v, layout, block, valid, ~valid)
    flex_on_cpu = backend == "flex" and not torch.cuda.is_available()  # torch's flex has no CPU backward
    with torch.set_grad_enabled(not flex_on_cpu):
        got = sparse_with_pooled_keys(q, k, v, layout, block, valid=valid, key_padding_mask=~valid, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if flex_on_cpu:
        return
    gout = torch.randn(want.shape, generator=g)
    for a, w in zip(torch.autograd.grad((got * gout).sum(), (q, k, v)),
                    torch.autograd.grad((want * gout).sum(), (q, k, v))):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_keys", [7, 64, 70])
def test_pooled_keys_layout_lists_every_pooled_block_for_the_stream_rows_only(n_keys):
    """Every stream query block lists the added key blocks as full blocks; the wide layout ends
    at K0 + n_keys (a ragged last block where 32 does not divide n_keys), so no key follows them."""
    from mmsparse.attention import Local
    from mmsparse.attention.compressed import pooled_keys_layout

    layout = build_layout(Local((3, 3, 3)), (3, 5, 7), block_q=32, block_k=32)  # N = 105
    wide, k0 = pooled_keys_layout(layout, n_keys)
    nw = k0 + n_keys
    assert k0 == 128 and wide.n == nw and wide.num_q_blocks == wide.num_k_blocks == math.ceil(nw / 32)
    assert wide.num_full - layout.num_full == math.ceil(n_keys / 32) * layout.num_q_blocks
    assert wide.num_partial == layout.num_partial
    mask = wide.dense_mask()
    # rows 105-127 share the stream's last query block (their outputs are dropped); the rows of
    # the blocks past the stream attend nothing
    assert bool(mask[:105, 128:].all()) and not bool(mask[128:].any())
    assert torch.equal(mask[:105, :105], layout.dense_mask())
    # the mask program says the same at token level (flex reads it on every pair)
    qi, ki = torch.arange(nw)[:, None], torch.arange(nw)[None, :]
    prog = wide.program.evaluate(qi, ki)
    assert bool(prog[:105, 128:].all())
    assert torch.equal(prog[:105, :105], layout.dense_mask())
    assert pooled_keys_layout(layout, n_keys)[0] is wide  # cached
    with pytest.raises(ValueError, match="n_keys"):
        pooled_keys_layout(layout, 0)


def test_pooled_keys_through_the_triton_kernels():
    """The block-sparse Triton kernels (interpreted on CPU) on the wide layout: the merged branches,
    forward and backward."""
    from mmsparse.attention.backends.triton_kernels import block_lists
    from mmsparse.attention.compressed import pooled_key_inputs
    from mmsparse.kernels.block_sparse import block_sparse_attention

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layout, q, k, v, valid, g = _inputs((3, 5, 7), 2, 2, 1, 16, 11)
    want = _branches_merged(q, k, v, layout, 16, valid, ~valid)
    qd, kd, vd = (x.detach().to(dev).requires_grad_() for x in (q, k, v))
    qw, kw, vw, wide, pad = pooled_key_inputs(qd, kd, vd, layout.to(dev), 16, valid.to(dev), ~valid.to(dev))
    got = block_sparse_attention(qw, kw, vw, block_lists(wide), None, pad)
    got = (got[0] if isinstance(got, tuple) else got)[:, :, :q.shape[2]]
    torch.testing.assert_close(got.cpu(), want, rtol=2e-4, atol=2e-5)
    gout = torch.randn(want.shape, generator=g)
    for a, w in zip(torch.autograd.grad((got * gout.to(dev)).sum(), (qd, kd, vd)),
                    torch.autograd.grad((want * gout).sum(), (q, k, v))):
        torch.testing.assert_close(a.cpu(), w, rtol=1e-3, atol=1e-4)


def test_sparse_layer_with_compress_is_the_merged_branches():
    """SparseSelfAttention(compress=c) on a layout with padding: qkv, the sparse keys and the
    pooled keys in one softmax, proj; forward and backward through the layer."""
    from mmsparse.models.layers import SparseSelfAttention

    layout, _, _, _, valid, g = _inputs((3, 5, 7), 2, 2, 2, 16, 5)
    torch.manual_seed(5)
    attn = SparseSelfAttention(32, 2, backend="reference", compress=16)
    b, n = valid.shape
    x = torch.randn(b, n, 32, generator=g, requires_grad=True)
    got = attn(x, layout, None, ~valid)
    q, k, v = attn.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    heads = _branches_merged(q, k, v, layout, 16, valid, ~valid)
    want = attn.proj(heads.transpose(1, 2).reshape(b, n, 32))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    gout = torch.randn(want.shape, generator=g)
    params = (x, attn.qkv.weight, attn.proj.weight)
    for a, w in zip(torch.autograd.grad((got * gout).sum(), params), torch.autograd.grad((want * gout).sum(), params)):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)


def _gapped_stream():
    """A model-like stream of N = 96: 2 global tokens, a video segment in tile slots padded to 8
    (2 x 6 tile padding), a gap to the audio segment at 64, 10 audio tokens, a gap to the end."""
    from mmsparse.attention import Segment, StreamLayout

    video = Segment("video", (4, 3, 3), offset=2, order=(2, 3, 3), tile_align=8)
    audio = Segment("audio", (2, 5), offset=64, order=(2, 5), seconds=0.1)
    return StreamLayout((video, audio), n_global=2, length=96)


@pytest.mark.parametrize("block,masked", [(32, False), (24, False), (16, True)])
def test_pooled_keys_of_a_gapped_stream_need_a_mask_only_for_blocks_of_gaps(block, masked):
    """On a stream that ends on a key block, with its gaps as `valid` and no padding of shorter
    clips, the pooled keys' call needs no key padding mask (so the flash backend can run its full
    blocks) unless a pooled block holds gaps alone ([80, 96) at block 16), which the host knows
    from the stream; either way it is the merged branches, forward and backward, and the Triton
    kernels (interpreted on CPU) agree."""
    from mmsparse.attention import Tiled
    from mmsparse.attention.compressed import all_blocks_real, pooled_key_inputs, sparse_with_pooled_keys
    from mmsparse.attention.stream import gap_positions
    from mmsparse.models.schedule import Gaps

    stream = _gapped_stream()
    layout = build_layout(Tiled((2, 3, 3)) | Gaps(), stream, 16, 16)
    real = ~gap_positions(stream)
    assert all_blocks_real(layout, block) is not masked
    g = torch.Generator().manual_seed(block)
    b, h, n, d = 2, 2, stream.length, 16
    q = torch.randn(b, h, n, d, generator=g).requires_grad_()
    k, v = (torch.randn(b, 1, n, d, generator=g).requires_grad_() for _ in range(2))
    valid = real.expand(b, n)
    *_, wide, pad = pooled_key_inputs(q, k, v, layout, block, valid)
    assert (pad is None) is not masked and wide.n == 96 + math.ceil(96 / block)
    want = _branches_merged(q, k, v, layout, block, valid, None)
    got = sparse_with_pooled_keys(q, k, v, layout, block, valid=valid, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    gout = torch.randn(want.shape, generator=g)
    grads = torch.autograd.grad((want * gout).sum(), (q, k, v))
    for a, w in zip(torch.autograd.grad((got * gout).sum(), (q, k, v)), grads):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return
    from mmsparse.attention.backends.triton_kernels import block_lists
    from mmsparse.kernels.block_sparse import block_sparse_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    qd, kd, vd = (x.detach().to(dev).requires_grad_() for x in (q, k, v))
    qw, kw, vw, wide, pad = pooled_key_inputs(qd, kd, vd, layout.to(dev), block, valid.to(dev))
    out = block_sparse_attention(qw, kw, vw, block_lists(wide), None, pad)
    out = (out[0] if isinstance(out, tuple) else out)[:, :, :n]
    torch.testing.assert_close(out.cpu(), want, rtol=2e-4, atol=2e-5)
    for a, w in zip(torch.autograd.grad((out * gout.to(dev)).sum(), (qd, kd, vd)), grads):
        torch.testing.assert_close(a.cpu(), w, rtol=1e-3, atol=1e-4)


def test_all_blocks_real_needs_the_layouts_stream():
    from mmsparse.attention.compressed import all_blocks_real

    plain = build_layout(Local((3, 3, 3)), (3, 5, 7), block_q=32, block_k=32)  # a grid: no gaps
    assert all_blocks_real(plain, 16) is (plain.stream is not None)
    assert all_blocks_real(plain, 16) is all_blocks_real(plain, 16)  # cached per block


def test_pooled_block_bounds_the_pooled_keys_by_whole_blocks():
    from mmsparse.attention.compressed import pooled_block

    assert pooled_block(105, 16) == pooled_block(105, 16, 0) == 16  # no bound: 7 keys
    assert pooled_block(105, 16, 7) == 16 and pooled_block(105, 16, 6) == 32  # 4 keys of 32
    assert pooled_block(105, 16, 2) == 64 and pooled_block(105, 16, 1) == 112
    for n in (1, 127, 128, 129, 107_904):
        for keys in (1, 3, 256):
            blk = pooled_block(n, 128, keys)
            assert blk % 128 == 0 and math.ceil(n / blk) <= keys
            assert blk == 128 or math.ceil(n / (blk - 128)) > keys  # the least such multiple
    with pytest.raises(ValueError, match="max_keys"):
        pooled_block(10, 4, -1)


def test_bounded_pooled_keys_are_the_branch_of_the_grown_block():
    """SparseSelfAttention(compress=16, compress_keys=2) on N = 105 pools blocks of 64 (2 keys):
    the layer of compress=64, forward and backward; unbounded it is compress=16's."""
    from mmsparse.models.layers import SparseSelfAttention

    layout, _, _, _, valid, g = _inputs((3, 5, 7), 2, 2, 2, 16, 9)
    b, n = valid.shape
    x = torch.randn(b, n, 32, generator=g, requires_grad=True)
    outs = {}
    for key, (block, keys) in {"bounded": (16, 2), "grown": (64, 0), "plain": (16, 0), "loose": (16, 7)}.items():
        torch.manual_seed(3)
        attn = SparseSelfAttention(32, 2, backend="reference", compress=block, compress_keys=keys)
        outs[key] = attn(x, layout, None, ~valid)
    torch.testing.assert_close(outs["bounded"], outs["grown"], rtol=0, atol=0)
    torch.testing.assert_close(outs["loose"], outs["plain"], rtol=0, atol=0)
    assert not torch.allclose(outs["bounded"], outs["plain"])
    gb, gg = (torch.autograd.grad(outs[k].square().sum(), x) for k in ("bounded", "grown"))
    torch.testing.assert_close(gb, gg, rtol=0, atol=0)
    with pytest.raises(ValueError, match="compress_keys"):
        SparseSelfAttention(32, 2, compress=16, compress_keys=-1)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("grid,block,hk", [((3, 5, 7), 16, 2), ((3, 4, 11), 5, 1), ((4, 4, 8), 32, 1)])
def test_inputs_widened_at_the_source_equal_the_widening_copies(grid, block, hk, masked):
    """q, k, v given at the wide layout's N' positions with the pooled keys in k's and v's rows
    K0.. (what qkv_rope's pooled_tails writes, as `pooled_tails` plans it; zero-padding and
    pool_blocks stand for it here) are used as they are: output and gradients are those of the
    N-position inputs, padding keys included; any other length, or wide inputs without `live`,
    is refused by name."""
    from mmsparse.attention.compressed import pool_blocks, pooled_key_inputs, pooled_tails, sparse_with_pooled_keys

    layout, q, k, v, valid, g = _inputs(grid, 2, 2, hk, 16, sum(grid) * block)
    valid = valid if masked else None  # padding keys weighted out of the means, or none
    kpm = None if valid is None else ~valid
    n = layout.n
    plan = pooled_tails(layout, block, q.shape[0], key_padding_mask=kpm)
    nw = plan.n_out
    assert plan.block == block and plan.start >= n and nw == pooled_key_inputs(q, k, v, layout, block, valid)[3].n > n
    assert (plan.valid is None) == (valid is None) and (valid is None or torch.equal(plan.valid, valid))
    want = sparse_with_pooled_keys(q, k, v, layout, block, valid=valid, key_padding_mask=kpm, backend="reference")

    def widen(x):  # [stream | zeros | block means | zeros]
        pooled, live = pool_blocks(x, block, valid)
        c = pooled.shape[2]
        zeros = lambda m: x.new_zeros(*x.shape[:2], m, x.shape[3])  # noqa: E731
        return torch.cat([x, zeros(plan.start - n), pooled, zeros(nw - plan.start - c)], 2), live

    (kw, live), (vw, _) = widen(k), widen(v)
    qw = torch.nn.functional.pad(q, (0, 0, 0, nw - n))
    got = sparse_with_pooled_keys(qw, kw, vw, layout, block, valid=valid, key_padding_mask=kpm, backend="reference",
                                  live=live)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gout = torch.randn(want.shape, generator=g)
    for a, w in zip(torch.autograd.grad((got * gout).sum(), (q, k, v)),
                    torch.autograd.grad((want * gout).sum(), (q, k, v))):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        pooled_key_inputs(qw[:, :, :-1], kw[:, :, :-1], vw[:, :, :-1], layout, block, valid, live=live)
    with pytest.raises(ValueError, match="live"):
        pooled_key_inputs(qw, kw, vw, layout, block, valid)
