"""Fused QKV split + rotary kernel (mmsparse/kernels/rope.py) against the PyTorch composition it
replaces (`qkv_rope_ref`: `mmsparse.encoders.apply_rope` on the permuted projection), forward
and backward."""

from __future__ import annotations

import pytest
import torch

from mmsparse.encoders import rope_cos_sin
from mmsparse.kernels import rope as rope_kernel
from mmsparse.kernels.rope import fused_rope_available, heads_to_rows, qkv_rope, qkv_rope_ref

from .budget import DEV

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Outputs start as NaN: an element the kernel does not write fails the comparison."""
    monkeypatch.setattr(rope_kernel, "_alloc", lambda shape, like: torch.full(
        shape, float("nan"), device=like.device, dtype=like.dtype))


def _tables(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 50, (n, 3), generator=gen).float()  # (t, h, w) of each token
    return rope_cos_sin(coords, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,n,h,d", [(1, 64, 1, 32), (2, 77, 3, 64), (1, 130, 2, 80), (2, 33, 2, 96)])
def test_qkv_rope_matches_reference(b, n, h, d, dtype):
    seed = hash((b, n, h, d, str(dtype))) % 2**31
    gen = torch.Generator().manual_seed(seed)
    cos, sin = _tables(n, d, seed)
    x = torch.randn(b, n, 3, h, d, generator=gen).to(DEV, dtype)
    grads = [torch.randn(b, h, n, d, generator=gen).to(DEV, dtype) for _ in range(3)]
    cos, sin = cos.to(DEV), sin.to(DEV)

    a = x.clone().requires_grad_(True)
    got = qkv_rope(a, cos, sin)
    r = x.clone().requires_grad_(True)
    want = qkv_rope_ref(r, cos, sin)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == (b, h, n, d) and g.dtype == dtype and g.is_contiguous(), name
        assert not torch.isnan(g).any(), f"{name}: NaN (an unwritten element)"
        err = (g.float() - w.float()).abs().max().item()
        assert err <= TOL[dtype] * (1 + w.float().abs().max().item()), f"{name}: {err:.3e}"
    (ga,) = torch.autograd.grad(got, a, grads)
    (gr,) = torch.autograd.grad(want, r, grads)
    err = (ga.float() - gr.float()).abs().max().item()
    assert err <= TOL[dtype] * (1 + gr.float().abs().max().item()), f"dqkv: {err:.3e}"


def _rows(n, seed):
    """(N,) int32 packed row of each stream position, -1 at about a third of them (gaps)."""
    gen = torch.Generator().manual_seed(seed)
    gap = torch.rand(n, generator=gen) < 0.35
    gap[0] = False
    rows = torch.full((n,), -1, dtype=torch.int32)
    rows[~gap] = torch.arange(int((~gap).sum()), dtype=torch.int32)
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,h,d", [(1, 64, 1, 32), (2, 77, 3, 64), (1, 130, 2, 80)])
def test_packed_rows_match_reference(b, n, h, d, dtype):
    """rows: qkv holds only the real rows (B, R, 3, H, D); q, k, v come out at their stream
    positions with zeros at the gaps, and the gradient goes back to the packed rows."""
    seed = hash(("rows", b, n, h, d, str(dtype))) % 2**31
    gen = torch.Generator().manual_seed(seed)
    cos, sin = (t.to(DEV) for t in _tables(n, d, seed))
    rows = _rows(n, seed).to(DEV)
    r = int((rows >= 0).sum())
    x = torch.randn(b, r, 3, h, d, generator=gen).to(DEV, dtype)
    grads = [torch.randn(b, h, n, d, generator=gen).to(DEV, dtype) for _ in range(3)]
    a = x.clone().requires_grad_(True)
    got = qkv_rope(a, cos, sin, rows=rows)
    ref = x.clone().requires_grad_(True)
    want = qkv_rope_ref(ref, cos, sin, rows=rows)
    gaps = rows < 0
    for name, g, w in zip("qkv", got, want):
        assert g.shape == (b, h, n, d) and not torch.isnan(g).any(), f"{name}: NaN (an unwritten element)"
        assert (g[:, :, gaps] == 0).all(), f"{name}: a gap is not zero"
        err = (g.float() - w.float()).abs().max().item()
        assert err <= TOL[dtype] * (1 + w.float().abs().max().item()), f"{name}: {err:.3e}"
    (ga,) = torch.autograd.grad(got, a, grads)
    (gr,) = torch.autograd.grad(want, ref, grads)
    assert ga.shape == x.shape and not torch.isnan(ga).any(), "dqkv: an unwritten packed row"
    err = (ga.float() - gr.float()).abs().max().item()
    assert err <= TOL[dtype] * (1 + gr.float().abs().max().item()), f"dqkv: {err:.3e}"


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("b,n,h,d,extra", [(1, 64, 1, 32, 64), (2, 77, 3, 64, 51), (1, 130, 2, 80, 0)])
def test_wide_outputs_pad_with_zeros_and_take_writes_in_place(b, n, h, d, extra, packed):
    """n_out: q, k, v of n_out positions, the reference's after the N-th padded with zeros, each
    its own buffer; rows >= N written in place under autograd send their gradient to the written
    values, and the gradient of qkv is the reference's."""
    dtype = torch.float32
    seed = hash(("wide", b, n, h, d, extra, packed)) % 2**31
    gen = torch.Generator().manual_seed(seed)
    cos, sin = (t.to(DEV) for t in _tables(n, d, seed))
    rows = _rows(n, seed).to(DEV) if packed else None
    r = n if rows is None else int((rows >= 0).sum())
    x = torch.randn(b, r, 3, h, d, generator=gen).to(DEV, dtype)
    tail = torch.randn(b, h, max(extra, 1), d, generator=gen).to(DEV, dtype)
    grads = [torch.randn(b, h, n + extra, d, generator=gen).to(DEV, dtype) for _ in range(3)]

    def run(fn, inp):
        q, k, v = fn(inp, cos, sin, rows=rows, n_out=n + extra)
        w = tail.clone().requires_grad_(True)
        k[:, :, n:] = w[:, :, :extra] * 2  # in place into the padding rows
        return (q, k, v), w

    a, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, wa = run(qkv_rope, a)
    want, wr = run(qkv_rope_ref, ref)
    assert len({t.data_ptr() for t in got}) == 3
    for name, g, w in zip("qkv", got, want):
        assert g.shape == (b, h, n + extra, d) and not torch.isnan(g).any(), f"{name}: NaN (an unwritten element)"
        if name != "k":
            assert (g[:, :, n:] == 0).all(), f"{name}: the padding is not zero"
        assert torch.allclose(g, w, atol=TOL[dtype], rtol=0), name
    ga, gwa = torch.autograd.grad(got, (a, wa), grads)
    gr, gwr = torch.autograd.grad(want, (ref, wr), grads)
    assert torch.allclose(ga, gr, atol=TOL[dtype], rtol=0) and torch.equal(gwa, gwr)
    assert torch.equal(gwa[:, :, :extra], 2 * grads[1][:, :, n:])
    with pytest.raises(ValueError, match="n_out"):
        qkv_rope(x, cos, sin, rows=rows, n_out=n - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,h,d,block,masked,packed", [(2, 77, 3, 64, 16, True, False),
                                                         (1, 130, 2, 32, 32, False, False),
                                                         (2, 100, 1, 80, 7, True, True),
                                                         (2, 64, 2, 32, 64, False, True)])
def test_pooled_tails_hold_the_block_means_and_send_their_gradient_back(b, n, h, d, block, masked, packed, dtype):
    """pooled_tails (block, start, valid): k's and v's rows start.. hold the means of their
    blocks (ragged last block, weighted by `valid`, packed rows' gaps left out), `live` says
    which blocks have a valid position, and the gradient of qkv, the means' included, is the
    reference's (which concatenates pool_blocks' output); bad plans are refused by name."""
    seed = hash(("tails", b, n, h, d, block, masked, packed)) % 2**31
    gen = torch.Generator().manual_seed(seed)
    cos, sin = (t.to(DEV) for t in _tables(n, d, seed))
    rows = _rows(n, seed).to(DEV) if packed else None
    r = n if rows is None else int((rows >= 0).sum())
    x = torch.randn(b, r, 3, h, d, generator=gen).to(DEV, dtype)
    c = -(-n // block)
    start = n + 3
    n_out = start + c + 5
    valid = torch.rand(b, n, generator=gen) > 0.3 if masked else None
    if packed:
        real = rows.cpu() >= 0
        valid = real.expand(b, n).clone() if valid is None else valid & real
    if valid is not None:
        valid[0, :block] = False  # a block with no valid position: not live
        valid = valid.to(DEV)
    a, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = qkv_rope(a, cos, sin, rows=rows, n_out=n_out, pooled_tails=(block, start, valid))
    want = qkv_rope_ref(ref, cos, sin, rows=rows, n_out=n_out, pooled_tails=(block, start, valid))
    assert len(got) == 4 and torch.equal(got[3], want[3]) and got[3].shape == (b, c)
    assert valid is None or not got[3][0, 0]
    for name, g, w in zip("qkv", got[:3], want[:3]):
        assert g.shape == (b, h, n_out, d) and not torch.isnan(g).any(), f"{name}: NaN (an unwritten element)"
        err = (g.float() - w.float()).abs().max().item()
        assert err <= TOL[dtype] * (1 + w.float().abs().max().item()), f"{name}: {err:.3e}"
    grads = [torch.randn(b, h, n_out, d, generator=gen).to(DEV, dtype) for _ in range(3)]
    (ga,) = torch.autograd.grad(got[:3], a, grads)
    (gr,) = torch.autograd.grad(want[:3], ref, grads)
    err = (ga.float() - gr.float()).abs().max().item()
    assert err <= TOL[dtype] * (1 + gr.float().abs().max().item()), f"dqkv: {err:.3e}"
    if dtype == torch.float32:  # the means' share is there: without it k's and v's gradients are far off
        (g0,) = torch.autograd.grad(qkv_rope(a, cos, sin, rows=rows, n_out=n_out)[:3], a, grads)
        share = (g0[:, :, 1:] - gr[:, :, 1:]).abs().max().item()
        assert share > 100 * err and share > 1e-3, (share, err)
    for bad in ((block, n - 1, valid), (0, start, valid), (block, n_out - c + 1, valid)):
        with pytest.raises(ValueError, match="pooled_tails"):
            qkv_rope(x, cos, sin, rows=rows, n_out=n_out, pooled_tails=bad)
    with pytest.raises(ValueError, match="pooled_tails"):
        qkv_rope(x, cos, sin, rows=rows, pooled_tails=(block, start, valid))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,h,d", [(1, 64, 1, 32), (2, 77, 3, 64), (1, 130, 2, 80)])
def test_heads_to_rows_gathers_the_real_rows(b, n, h, d, dtype):
    """heads_to_rows: o (B, H, N, D) -> (B, R, H, D), what o.transpose(1, 2)[:, real] gives,
    bit for bit (a copy); the gradient lands at the real positions, zeros at the gaps."""
    seed = hash(("heads", b, n, h, d, str(dtype))) % 2**31
    gen = torch.Generator().manual_seed(seed)
    rows = _rows(n, seed).to(DEV)
    real = rows >= 0
    r = int(real.sum())
    o = torch.randn(b, h, n, d, generator=gen).to(DEV, dtype).requires_grad_(True)
    got = heads_to_rows(o, rows, r)
    assert got.shape == (b, r, h, d) and torch.equal(got, o.detach().transpose(1, 2)[:, real])
    g = torch.randn(b, r, h, d, generator=gen).to(DEV, dtype)
    (go,) = torch.autograd.grad(got, o, g)
    assert not torch.isnan(go).any(), "an unwritten gradient element"
    assert torch.equal(go.transpose(1, 2)[:, real], g) and (go[:, :, ~real] == 0).all()
    with pytest.raises(ValueError, match="rows"):
        heads_to_rows(o, rows[:-1], r)


def test_qkv_rope_rotates_by_the_angle():
    """Independent of apply_rope: a pair (1, 0) at angle a becomes (cos a, sin a) in q and k;
    v is copied; the backward rotates by -a."""
    n, d = 5, 4
    ang = torch.linspace(0.1, 2.0, n * 2).reshape(n, 2)
    cos, sin = ang.cos().to(DEV), ang.sin().to(DEV)
    x = torch.zeros(1, n, 3, 1, d, device=DEV)
    x[..., 0] = 1.0  # x[j] = 1 for pair 0, x[j + P] = 0
    x[:, :, 2] = 7.0
    x.requires_grad_(True)
    q, k, v = qkv_rope(x, cos, sin)
    for t in (q, k):
        torch.testing.assert_close(t[0, 0, :, 0], cos[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(t[0, 0, :, 2], sin[:, 0], rtol=0, atol=1e-6)
        assert (t[0, 0, :, [1, 3]] == 0).all()
    assert (v == 7.0).all()
    gq = torch.zeros_like(q)
    gq[..., 0], gq[..., 2] = cos[:, 0], sin[:, 0]  # the rotated unit vector rotates back to (1, 0)
    (g,) = torch.autograd.grad(q, x, gq)
    torch.testing.assert_close(g[0, :, 0, 0, 0], torch.ones(n, device=DEV), rtol=0, atol=1e-6)
    assert g[0, :, 0, 0, 2].abs().max() < 1e-6 and (g[:, :, 1:] == 0).all()


def test_unused_output_gets_zero_gradient():
    n, h, d = 40, 2, 32
    cos, sin = (t.to(DEV) for t in _tables(n, d, 1))
    x = torch.randn(1, n, 3, h, d, device=DEV, requires_grad=True)
    q, k, v = qkv_rope(x, cos, sin)
    (g,) = torch.autograd.grad(q.sum() + v.sum(), x)
    assert (g[:, :, 1] == 0).all() and (g[:, :, 2] == 1).all()


def test_bad_inputs_name_the_argument():
    cos, sin = (t.to(DEV) for t in _tables(8, 32, 0))
    with pytest.raises(ValueError, match="qkv must be"):
        qkv_rope(torch.randn(1, 8, 2, 1, 32, device=DEV), cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        qkv_rope(torch.randn(1, 9, 3, 1, 32, device=DEV), cos, sin)
    with pytest.raises(ValueError, match="even"):
        qkv_rope(torch.randn(1, 8, 3, 1, 31, device=DEV), cos[:, :15], sin[:, :15])
    with pytest.raises(ValueError, match="rows must be"):
        qkv_rope(torch.randn(1, 5, 3, 1, 32, device=DEV), cos, sin, rows=torch.arange(8, device=DEV))
    with pytest.raises(ValueError, match="cos and sin"):  # rows name the N stream positions
        qkv_rope(torch.randn(1, 5, 3, 1, 32, device=DEV), cos, sin, rows=_rows(9, 0).to(DEV))


def test_availability_follows_the_switch(monkeypatch):
    x = torch.randn(2, 2, device=DEV)
    assert fused_rope_available(x) == (DEV == "cuda")  # auto: CUDA only
    monkeypatch.setenv("MMSPARSE_FUSED_ROPE", "1")  # and the CPU under the interpreter
    assert fused_rope_available(x)
    assert not fused_rope_available(torch.zeros(2, dtype=torch.int32, device=DEV))
    monkeypatch.setenv("MMSPARSE_FUSED_ROPE", "0")
    assert not fused_rope_available(x)
    monkeypatch.setenv("MMSPARSE_FUSED_ROPE", "yes")
    with pytest.raises(ValueError, match="MMSPARSE_FUSED_ROPE"):
        fused_rope_available(x)


@pytest.mark.parametrize("schedule", ["tiled", "dense"])
def test_model_layers_give_the_same_output_fused_or_not(monkeypatch, schedule):
    """The encoder layers' fused path (SparseSelfAttention -> qkv_rope) against their PyTorch
    path on a tiny model: same logits within float32 rounding."""
    from mmsparse.models import CaptionTokenizer, create_model

    tok = CaptionTokenizer.train(["a red square moves left", "a low tone plays"], vocab_size=300)
    torch.manual_seed(0)
    model = create_model("captioner_tiny", tokenizer=tok, schedule=schedule, backend="reference").to(DEV).eval()
    gen = torch.Generator().manual_seed(1)
    batch = {"video": torch.randn(2, 8, 3, 32, 32, generator=gen).to(DEV),
             "audio": torch.randn(2, 128, 200, generator=gen).to(DEV),
             "caption": ["a red square moves left", "a low tone plays"]}
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MMSPARSE_FUSED_ROPE", mode)
        with torch.no_grad():
            outs[mode] = model(batch).float()
    assert (outs["0"] - outs["1"]).abs().max().item() < 1e-4
    assert outs["0"].abs().max().item() > 1e-2  # not trivially zero
