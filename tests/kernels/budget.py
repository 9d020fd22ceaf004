"""What the kernel tests share: random inputs, gradients through (out, lse), and the error budget.

Budget (docs/conventions.md, item 3): a kernel's error against the float64 truth is at most twice the
error of the same attention computed densely in the input dtype, plus a floor per dtype.
"""

from __future__ import annotations

import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def inputs(shape, n, d, seed):
    """q (B, H, N, D), k, v (B, Hk, N, D), dout (B, H, N, D), dlse (B, H, N) on the CPU, float32."""
    b, h, hk = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, n, d, generator=gen) for x in (h, hk, hk))
    return q, k, v, torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, generator=gen)


def grads(fn, q, k, v, dout, dlse, dtype):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) in `dtype`, with the loss
    sum(out * dout) + sum(lse * dlse), so the LSE's gradient is checked as well."""
    q, k, v = (t.to(DEV, dtype).detach().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * dout.to(DEV).double()).sum() + (lse.double() * dlse.to(DEV).double()).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def check_budget(got, low, truth, dtype):
    for name, g, lo, t in zip(("out", "lse", "dq", "dk", "dv"), got, low, truth):
        assert not torch.isnan(g).any(), f"{name}: NaN (an unwritten element)"
        err = (g.double() - t.double()).abs().max().item()
        base = (lo.double() - t.double()).abs().max().item()
        assert err <= 2 * base + FLOOR[dtype], f"{name}: {err:.3e} > 2 x {base:.3e} + {FLOOR[dtype]}"
