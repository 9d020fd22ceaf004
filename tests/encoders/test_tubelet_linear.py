"""TubeletEmbed computes its Conv3d (kernel == stride) as patchify + F.linear: same tokens, grid
and gradients as the convolution it replaced, which is the reference here (``F.conv3d`` on the
(B, C, T, H, W) video, T zero-padded with ``F.pad``), computed independently of the module's
forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmsparse.encoders import TubeletEmbed, normalize_pixels

MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)

# (tubelet, T, H, W): kt = 1, 2, 3; kh != kw and H != W so that a swapped axis cannot pass;
# T not a multiple of kt (padded), a multiple, and shorter than one tubelet
CASES = [
    ((2, 16, 16), 5, 32, 48),
    ((2, 16, 16), 4, 48, 32),
    ((1, 8, 8), 3, 16, 24),
    ((3, 4, 8), 7, 12, 24),
    ((3, 4, 8), 6, 8, 16),
    ((3, 4, 8), 2, 8, 16),
]


def _conv_tokens(video: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tubelet):
    """The old computation: Conv3d on the T-padded (B, C, T, H, W) video -> (B, n, D), grid."""
    x = video.permute(0, 2, 1, 3, 4)
    x = F.pad(x, (0, 0, 0, 0, 0, -x.shape[2] % tubelet[0]))
    y = F.conv3d(x, weight, bias, stride=tubelet)  # (B, D, t, h, w)
    return y.flatten(2).transpose(1, 2), tuple(y.shape[2:])


def _assert_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """max |a - b| <= rel * max |b|, with b a non-trivial reference."""
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(b.detach().abs().max())
    assert scale > 0
    err = float((a.detach().float() - b.detach().float()).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


def _embed(tubelet, dim=24, seed=0) -> TubeletEmbed:
    torch.manual_seed(seed)
    tub = TubeletEmbed(tubelet, 3, dim)
    with torch.no_grad():  # a bias of the weights' size, so that a dropped bias shows
        tub.proj.bias.normal_()
    return tub


@pytest.mark.parametrize("tubelet,T,H,W", CASES)
def test_forward_equals_conv3d(tubelet, T, H, W):
    tub = _embed(tubelet)
    video = torch.randn(2, T, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, grid = tub(video)
        ref, ref_grid = _conv_tokens(video, tub.proj.weight, tub.proj.bias, tubelet)
    assert grid == ref_grid == (-(-T // tubelet[0]), H // tubelet[1], W // tubelet[2])
    assert out.dtype == torch.float32
    _assert_rel(out, ref, 1e-5)
    # the batch elements are not mixed: each alone gives its own rows
    with torch.no_grad():
        _assert_rel(tub(video[1:])[0], ref[1:], 1e-5)


def test_non_contiguous_frames():
    """Frames that are a view (here of a (B, C, T, H, W) buffer) give the same tokens."""
    tubelet = (2, 8, 8)
    tub = _embed(tubelet)
    video = torch.randn(2, 3, 5, 16, 24).permute(0, 2, 1, 3, 4)  # (B, T, C, H, W), not contiguous
    assert not video.is_contiguous()
    with torch.no_grad():
        _assert_rel(tub(video)[0], _conv_tokens(video, tub.proj.weight, tub.proj.bias, tubelet)[0], 1e-5)


@pytest.mark.parametrize("T", [5, 6])
def test_uint8_pixels_equal_conv3d(T):
    tubelet = (2, 8, 8)
    tub = _embed(tubelet)
    g = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (2, T, 3, 16, 24), dtype=torch.uint8, generator=g)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        out, grid = tub(pixels, norm=(MEAN, STD), mask=mask)
        frames = normalize_pixels(pixels, (MEAN, STD), mask)
        ref, ref_grid = _conv_tokens(frames, tub.proj.weight, tub.proj.bias, tubelet)
    assert grid == ref_grid
    _assert_rel(out, ref, 1e-5)


@pytest.mark.parametrize("tubelet,T,H,W", CASES)
def test_gradients_equal_conv3d(tubelet, T, H, W):
    tub = _embed(tubelet)
    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, T, 3, H, W, generator=g)
    v1 = video.clone().requires_grad_()
    out, _ = tub(v1)
    up = torch.randn(out.shape, generator=g)  # a random upstream gradient
    out.backward(up)
    w = tub.proj.weight.detach().clone().requires_grad_()
    b = tub.proj.bias.detach().clone().requires_grad_()
    v2 = video.clone().requires_grad_()
    ref, _ = _conv_tokens(v2, w, b, tubelet)
    ref.backward(up)
    _assert_rel(tub.proj.weight.grad, w.grad, 1e-5)
    _assert_rel(tub.proj.bias.grad, b.grad, 1e-5)
    _assert_rel(v1.grad, v2.grad, 1e-5)


def test_gradients_uint8_pixels():
    tubelet = (3, 4, 8)
    tub = _embed(tubelet)
    g = torch.Generator().manual_seed(4)
    pixels = torch.randint(0, 256, (2, 7, 3, 8, 16), dtype=torch.uint8, generator=g)
    out, _ = tub(pixels, norm=(MEAN, STD))
    up = torch.randn(out.shape, generator=g)
    out.backward(up)
    w = tub.proj.weight.detach().clone().requires_grad_()
    b = tub.proj.bias.detach().clone().requires_grad_()
    ref, _ = _conv_tokens(normalize_pixels(pixels, (MEAN, STD)), w, b, tubelet)
    ref.backward(up)
    _assert_rel(tub.proj.weight.grad, w.grad, 1e-5)
    _assert_rel(tub.proj.bias.grad, b.grad, 1e-5)


@pytest.mark.parametrize("tubelet,T,H,W", [CASES[0], CASES[3], CASES[4]])
def test_cpu_autocast_bf16(tubelet, T, H, W):
    tub = _embed(tubelet, dim=32)
    g = torch.Generator().manual_seed(5)
    video = torch.randn(2, T, 3, H, W, generator=g)
    with torch.no_grad():
        ref, ref_grid = _conv_tokens(video, tub.proj.weight, tub.proj.bias, tubelet)  # float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grid = tub(video)
    assert grid == ref_grid and out.dtype == torch.bfloat16
    _assert_rel(out, ref, 3e-2)  # bf16: 8 bits of mantissa on inputs, weights and output

    # gradients under autocast: the parameters' (float32), near the float32 conv's
    up = torch.randn(ref.shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = tub(video)
    out.float().backward(up)
    w = tub.proj.weight.detach().clone().requires_grad_()
    b = tub.proj.bias.detach().clone().requires_grad_()
    ref, _ = _conv_tokens(video, w, b, tubelet)
    ref.backward(up)
    assert tub.proj.weight.grad.dtype == torch.float32
    _assert_rel(tub.proj.weight.grad, w.grad, 3e-2)
    _assert_rel(tub.proj.bias.grad, b.grad, 3e-2)


class _Writes(TorchDispatchMode):
    """(op, dtype, elements) of each op that writes tensor data (no views, allocations, matmuls),
    leaving out the casts of the weight and bias (``skip``: their element counts)."""

    QUIET = {"aten._unsafe_view.default", "aten.new_empty.default", "aten.empty.memory_format",
             "aten.empty_strided.default", "aten.lift_fresh.default", "aten.addmm.default",
             "aten.mm.default", "aten.bmm.default"}

    def __init__(self, skip):
        super().__init__()
        self.skip, self.ops = set(skip), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and str(func) not in self.QUIET:
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.numel() not in self.skip:
                    self.ops.append((str(func), o.dtype, o.numel()))
        return out


@pytest.mark.parametrize("T", [4, 5])
@pytest.mark.parametrize("autocast", [False, True])
def test_one_copy_of_the_video(T, autocast):
    """The frames are copied once, into patch order (T padding included); under autocast they
    are cast to bf16 first, so that copy is in bf16 and nothing video-sized is float32."""
    tubelet = (2, 8, 8)
    tub = _embed(tubelet, dim=10)
    video = torch.randn(2, T, 3, 16, 24, requires_grad=True)
    padded = 2 * (-(-T // 2) * 2) * 3 * 16 * 24  # B * t * kt * C * H * W
    with _Writes({tub.proj.weight.numel(), tub.proj.bias.numel()}) as rec, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tub(video)
    ops = rec.ops
    if autocast:
        assert ops[0] == ("aten._to_copy.default", torch.bfloat16, video.numel()), ops
        ops = ops[1:]
    dtype = torch.bfloat16 if autocast else torch.float32
    assert all(d == dtype for _, d, _ in ops), ops
    assert sum(n for _, _, n in ops) == padded, ops


def test_bf16_weights_without_autocast():
    """Outside autocast the frames are cast to the weight's dtype, as before."""
    tubelet = (2, 8, 8)
    tub = _embed(tubelet)
    video = torch.randn(2, 5, 3, 16, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, _ = _conv_tokens(video, tub.proj.weight, tub.proj.bias, tubelet)
        out, _ = tub.to(torch.bfloat16)(video)
    assert out.dtype == torch.bfloat16
    _assert_rel(out, ref, 3e-2)


def test_checkpoint_of_the_conv_loads():
    """proj stays a Conv3d: a state dict of a plain Conv3d embed loads and gives its tokens."""
    tubelet = (2, 16, 16)
    tub = TubeletEmbed(tubelet, 3, 24)
    assert isinstance(tub.proj, nn.Conv3d)
    assert {k: tuple(v.shape) for k, v in tub.state_dict().items()} == {
        "proj.weight": (24, 3, 2, 16, 16), "proj.bias": (24,)}
    torch.manual_seed(7)
    conv = nn.Conv3d(3, 24, kernel_size=tubelet, stride=tubelet)
    tub.load_state_dict({f"proj.{k}": v for k, v in conv.state_dict().items()})
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        y = conv(video.permute(0, 2, 1, 3, 4))
        _assert_rel(tub(video)[0], y.flatten(2).transpose(1, 2), 1e-5)
