"""What every kernel op shares on the host: dtype and head-dim limits, input checks, small
tensor helpers, the block means of the compressed branch (`pool_blocks`; here so that the fused
rotary kernel writes them too), the log-sum-exp merge of two attention results over disjoint
keys, and the one autograd shell the attention ops (and the PyTorch reference) run in.

Legend: B batch, H query heads, Hk key/value heads (GQA: H = Hk * G), N tokens, D head dim,
Dp = D padded to a power of two (>= 16).
"""

from __future__ import annotations

import math
import os

import torch
import triton

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1: the kernels on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dims(x: torch.Tensor) -> tuple[int, int]:
    """(D, Dp) of a (..., D) tensor."""
    d = x.shape[-1]
    return d, max(16, triton.next_power_of_2(d))


def dot_prec(dtype) -> str:
    """tl.dot's input precision: float32 inputs keep float32 accuracy, three tf32 products on
    the GPU (plain tf32 would spend the error budget, "ieee" runs on the FMA units and spills),
    exact in the interpreter; ignored for 16-bit operands."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if interpreting() else "tf32x3"


def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def padding_flags(key_padding, q):
    """key_padding (B, N) bool or None -> (int8 flags or a dummy pointer, batch stride, HAS_KPM)."""
    if key_padding is None:
        return q, 0, False
    flags = key_padding.to(device=q.device, dtype=torch.int8).contiguous()
    return flags, flags.stride(0), True


def tensor_unsupported_reason(q) -> str | None:
    """Why the Triton kernels cannot run on q (device, dtype, head dim), or None when they can."""
    if q.device.type != "cuda" and not interpreting():
        return f"the Triton kernels need CUDA tensors (got {q.device}; TRITON_INTERPRET=1 runs them on the CPU)"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} is above the kernels' limit of {MAX_HEAD_DIM}"
    if q.shape[-1] < 1:
        return "head_dim must be positive"
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] < 8:
        return "bfloat16 needs compute capability 8.0 or newer"
    return None


def check_qkv(q, k, v, dtypes=None) -> None:
    """ValueError unless q (B, H, N, D) and k, v (B, Hk, N, .) are 4D tensors of one dtype
    (among `dtypes` when given) on one device, q and k of one head dim, H a multiple of Hk."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4D tensor (B, H, N, D), got {shape}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (B, Hk, N), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q (B, H, N, D)={tuple(q.shape)} and k (B, Hk, N, D)={tuple(k.shape)} must agree in B, N and D"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for GQA")


def check_key_padding_mask(kpm, q) -> None:
    """ValueError unless kpm is None or a bool (B, N) tensor matching q (B, H, N, D)."""
    if kpm is None:
        return
    if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be a bool tensor (B, N), got {getattr(kpm, 'dtype', type(kpm).__name__)}")
    if tuple(kpm.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, N) = ({q.shape[0]}, {q.shape[2]}), got {tuple(kpm.shape)}")


def check_kernel_inputs(q, k, v, op: str, key_padding_mask=None) -> None:
    """The checks every Triton op runs on its inputs: shapes, the kernels' limits, padding."""
    check_qkv(q, k, v)
    if v.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: v must have q's head dim D={q.shape[3]}, got {tuple(v.shape)}")
    reason = tensor_unsupported_reason(q)
    if reason:
        raise ValueError(f"{op}: {reason}")
    check_key_padding_mask(key_padding_mask, q)


def pool_blocks(x: torch.Tensor, block: int, valid: torch.Tensor | None = None,
                count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, Hk, N, D) -> (mean over each block of `block` positions (B, Hk, C, D), block has a
    real token (B, C) bool). valid (B, N) bool marks the real positions (None: all); count, when
    given, is ``block_counts`` of that `valid` (a caller pooling k and v counts once).

    One read of x and no temporary of its size: the whole blocks are a view of x, summed (no
    `valid`) or weighted by `valid` as a batched (1 x block) @ (block x D) product, and a ragged
    last block is pooled apart (no padded copy of x); the backward pass writes x's gradient once.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    b, hk, n, d = x.shape
    whole, rest = divmod(n, block)
    w = None if valid is None else valid.to(x.dtype)

    def pooled_sum(part, weights, blocks, size):  # (B, Hk, blocks x size, D) -> (B, Hk, blocks, D)
        part = part.reshape(b, hk, blocks, size, d)
        if weights is None:
            return part.sum(3)
        return torch.matmul(weights.reshape(b, 1, blocks, 1, size), part)[:, :, :, 0]

    sums = []
    if whole:
        sums.append(pooled_sum(x[:, :, :whole * block], None if w is None else w[:, :whole * block], whole, block))
    if rest:
        sums.append(pooled_sum(x[:, :, whole * block:], None if w is None else w[:, whole * block:], 1, rest))
    total = sums[0] if len(sums) == 1 else torch.cat(sums, 2)  # (B, Hk, C, D)
    if count is None:
        count = block_counts(valid, b, n, block, x.device)
    return total / count.clamp(min=1)[:, None, :, None].to(total.dtype), count > 0


def block_counts(valid: torch.Tensor | None, b: int, n: int, block: int, device) -> torch.Tensor:
    """(B, C) float32: the real positions (`valid`; None: all n) in each block of `block`
    positions; float32 so that counts past 256 stay exact (bf16 holds integers only to 256)."""
    real = torch.ones(b, n, device=device) if valid is None else valid.float()
    return torch.nn.functional.pad(real, (0, (-n) % block)).view(b, -1, block).sum(2)


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of two disjoint key sets from each set's output (B, H, N, D)
    and log-sum-exp (B, H, N): out = (out_a e^lse_a + out_b e^lse_b) / (e^lse_a + e^lse_b).
    A row that attends nothing in either (-inf) gets zeros and lse -inf."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    wa, wb = torch.exp(lse_a - m_safe), torch.exp(lse_b - m_safe)  # (B, H, N), 0 where -inf
    total = wa + wb
    norm = torch.where(total > 0, total, 1.0)
    out = (out_a.float() * (wa / norm)[..., None] + out_b.float() * (wb / norm)[..., None]).to(out_a.dtype)
    return out, torch.where(total > 0, m_safe + torch.log(norm), -math.inf)


# ---------------------------------------------------------------------------------------------
# The autograd shell
# ---------------------------------------------------------------------------------------------


class AttentionFunction(torch.autograd.Function):
    """(out, lse) = op.forward(...) with op.backward for the gradients, for every attention op.

    `op` gives `forward(q, k, v, scale, key_padding) -> (out, lse, saved)`, where saved is the
    tuple of tensors its backward needs, and `backward(saved, dout, dlse, scale, key_padding)
    -> (dq, dk, dv)`. An output nobody differentiates (the LSE, in a model) arrives as None
    in the backward instead of a tensor of zeros: no allocation, no delta correction; a None
    dout becomes zeros here."""

    @staticmethod
    def forward(ctx, op, q, k, v, scale, key_padding):
        out, lse, saved = op.forward(q, k, v, scale, key_padding)
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        ctx.op, ctx.scale, ctx.key_padding = op, scale, key_padding
        ctx.out_like = (out.shape, out.dtype, out.device)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None:
            shape, dtype, device = ctx.out_like
            dout = torch.zeros(shape, dtype=dtype, device=device)
        dq, dk, dv = ctx.op.backward(ctx.saved_tensors, dout, dlse, ctx.scale, ctx.key_padding)
        return None, dq, dk, dv, None, None


def run_attention(op, q, k, v, scale: float, key_padding=None):
    """(out, lse) of `op` (see AttentionFunction), differentiable in q, k, v."""
    return AttentionFunction.apply(op, q, k, v, scale, key_padding)
