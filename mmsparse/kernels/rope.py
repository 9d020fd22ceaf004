"""Fused QKV split + rotary embedding: one Triton pass from the qkv projection to q, k, v.

Legend: B batch, N tokens, H heads, D head dim (even), P = D / 2 rotary pairs.

An attention layer's projection gives qkv (B, N, 3, H, D); the attention kernels want q, k, v
as (B, H, N, D), q and k rotated. In PyTorch that is a permute, an unbind, and per q and k a
float32 upcast of both halves, four multiplies, two adds, a cat and a cast back, each a full
pass over memory, and the same again in the backward (plus the stack that rebuilds dqkv). On
the E1 captioner (bench/model.py) those passes were a fifth of the sparse training step at
512 to 1,024 frames (bench/NOTES.md v7, 2026-11-28). Here one program reads a tile of
tokens of one (head, q | k | v) from qkv, rotates it in float32 registers and writes it to its
(B, H, N, D) place; the backward reads dq, dk, dv and writes dqkv in the projection's layout,
rotating by the negative angle (the rotation's transpose).

Rotation (GPT-NeoX layout, `apply_rope`, which mmsparse.encoders re-exports): pairs (x[j], x[j + P]),
    y[j] = x[j] cos - x[j + P] sin,   y[j + P] = x[j] sin + x[j + P] cos,
with (cos, sin) (N, P) float32 per token; the result is cast back to the input dtype.

Layers (CONVENTIONS.md item 1):
1. `qkv_rope_ref`: the PyTorch composition it replaces.
2. `_qkv_rope_kernel`: one tile of tokens of one (batch, head, q | k | v), either direction.
3. The autograd function and the public `qkv_rope`; `fused_rope_available` says when the
   model layers take this path (a CUDA tensor, or the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import DTYPES, block_counts, interpreting, pool_blocks
from .options import kernel_options

# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) -> rotated x, same shape and dtype; cos / sin (N, D / 2).

    Pairs are (x[..., j], x[..., j + D / 2]) (the GPT-NeoX layout: two contiguous halves).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos.to(x.device), sin.to(x.device)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


def qkv_rope_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor | None = None,
                 n_out: int | None = None, pooled_tails: tuple | None = None):
    """qkv (B, N, 3, H, D) -> q, k, v (B, H, N, D), q and k rotated by `apply_rope`; cos / sin
    (N, D / 2): the model layers' PyTorch path. rows (N,): qkv holds packed rows (B, R, 3, H, D),
    rows[n] the one of stream position n, -1 at gaps (zeros there). n_out: each output has n_out
    >= N positions, zeros after the N-th; pooled_tails (block, start, valid): k's and v's rows
    start.. hold `pool_blocks` of their first N rows, and `live` is returned fourth."""
    if rows is not None:
        full = qkv.new_zeros(qkv.shape[0], rows.shape[0], *qkv.shape[2:])
        real = rows >= 0
        full[:, real] = qkv[:, rows[real].long()]
        qkv = full
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
    if n_out is None:
        return out
    n = out[0].shape[2]
    if pooled_tails is None:
        return tuple(torch.nn.functional.pad(x, (0, 0, 0, n_out - n)) for x in out)
    block, start, valid = pooled_tails
    wide = [torch.nn.functional.pad(out[0], (0, 0, 0, n_out - n))]
    for x in out[1:]:
        pooled, live = pool_blocks(x, block, valid)
        c = pooled.shape[2]
        wide.append(torch.cat([x, x.new_zeros(*x.shape[:2], start - n, x.shape[3]), pooled.to(x.dtype),
                               x.new_zeros(*x.shape[:2], n_out - start - c, x.shape[3])], 2))
    return (*wide, live)


# ---------------------------------------------------------------------------------------------
# 2. Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _qkv_rope_kernel(
    SRC, DST, COS, SIN, ROWS, N, H, WHICH0,
    s_b, s_w, s_h, s_n,  # SRC strides: batch, q|k|v, head, token (D contiguous)
    d_b, d_w, d_h, d_n,  # DST strides, same order
    stride_cn,  # COS / SIN token stride (P contiguous)
    SCALE, stride_sb, TAIL0, POOL,  # pooled tails (TAIL_ON): (B, N) float32 weights, first tail row, block
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr, INVERSE: tl.constexpr,
    ROWS_ON: tl.constexpr, TAIL_ON: tl.constexpr,
):
    """Program (token tile, batch x head, w): copies SRC[b, w, h, tile, :] to
    DST[b, WHICH0 + w, h, tile, :], rotated when WHICH0 + w is q (0) or k (1); INVERSE rotates
    by the negative angle (the backward). The tile is of stream positions n (the rotation's);
    ROWS_ON 1 / 2: SRC / DST holds packed rows instead, ROWS[n] (-1: a gap, which reads zeros /
    is not written). TAIL_ON (the backward of k and v with pooled tails): position n's gradient
    also takes SCALE[b, n] times the gradient of row TAIL0 + n // POOL of SRC, its block's mean."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    w = tl.program_id(2)
    which = WHICH0 + w
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, HALF_PAD)
    in_n = offs_n < N
    tok_src = offs_n.to(tl.int64)
    tok_dst = offs_n.to(tl.int64)
    if ROWS_ON != 0:
        row = tl.load(ROWS + offs_n, mask=in_n, other=-1)
        in_n = in_n & (row >= 0)
        if ROWS_ON == 1:
            tok_src = row.to(tl.int64)
        else:
            tok_dst = row.to(tl.int64)
    mask = in_n[:, None] & (offs_p < HALF)[None, :]
    src = SRC + b * s_b + w.to(tl.int64) * s_w + h * s_h + tok_src[:, None] * s_n + offs_p[None, :]
    dst = DST + b * d_b + which.to(tl.int64) * d_w + h * d_h + tok_dst[:, None] * d_n + offs_p[None, :]
    f1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    f2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if TAIL_ON:
        if which > 0:  # k, v: plus the share of the block mean's gradient (a linear map: before the rotation)
            sc = tl.load(SCALE + b * stride_sb + offs_n, mask=in_n, other=0.0)[:, None]
            tail = SRC + b * s_b + w.to(tl.int64) * s_w + h * s_h + (TAIL0 + offs_n // POOL).to(tl.int64)[:, None] * s_n
            f1 += sc * tl.load(tail + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
            f2 += sc * tl.load(tail + offs_p[None, :] + HALF, mask=mask, other=0.0).to(tl.float32)
    if which < 2:
        trig = offs_n[:, None] * stride_cn + offs_p[None, :]
        c = tl.load(COS + trig, mask=mask, other=0.0)
        s = tl.load(SIN + trig, mask=mask, other=0.0)
        if INVERSE:
            s = -s
        y1 = (f1 * c - f2 * s).to(DST.dtype.element_ty)
        y2 = (f1 * s + f2 * c).to(DST.dtype.element_ty)
    else:
        y1 = f1.to(DST.dtype.element_ty)
        y2 = f2.to(DST.dtype.element_ty)
    # a gap's row (ROWS_ON 1) is written too, with zeros; with ROWS_ON 2 it is not written
    keep = mask if ROWS_ON == 2 else (offs_n < N)[:, None] & (offs_p < HALF)[None, :]
    tl.store(dst, y1, mask=keep)
    tl.store(dst + HALF, y2, mask=keep)


_BLOCK_N = 64


def _alloc(shape, like: torch.Tensor) -> torch.Tensor:
    """Output buffers (tests replace this with a NaN-filled allocation to catch unwritten elements)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _launch(src, dst, cos, sin, b, n, h, which0, src_strides, dst_strides, count, inverse, rows=None,
            rows_on=None, tails=None):
    """src / dst strides (batch, q|k|v, head, token); `count` of q|k|v from src starting at
    which0 in dst; n stream positions; rows (n,) int32: src (forward) or dst (inverse), or the
    side `rows_on` names (1 src, 2 dst), holds packed rows, rows[i] the one of position i (-1: none).
    tails (scale (B, n) float32, first tail row, block): the pooled tails' gradient (kernel doc)."""
    half = cos.shape[-1]
    grid = (triton.cdiv(n, _BLOCK_N), b * h, count)
    if rows_on is None:
        rows_on = 0 if rows is None else (2 if inverse else 1)
    scale, tail0, pool = (cos, 0, 1) if tails is None else tails
    _qkv_rope_kernel[grid](
        src, dst, cos, sin, cos if rows is None else rows, n, h, which0, *src_strides, *dst_strides,
        cos.stride(0), scale, scale.stride(0), tail0, pool, HALF=half, HALF_PAD=triton.next_power_of_2(half),
        BLOCK_N=_BLOCK_N, INVERSE=inverse, ROWS_ON=rows_on, TAIL_ON=tails is not None, num_warps=4,
    )


# ---------------------------------------------------------------------------------------------
# 3. Autograd and the public functional
# ---------------------------------------------------------------------------------------------


class _QKVRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, rows, n_out, tails):
        b, r, _, h, d = qkv.shape
        n = cos.shape[0]
        ctx.set_materialize_grads(False)
        ctx.shape = qkv.shape
        if n_out is None:
            ctx.save_for_backward(cos, sin, rows)
            out = _alloc((3, b, h, n, d), qkv)  # q, k, v
            # qkv (B, R, 3, H, D) -> out (3, B, H, N, D): strides as (batch, q|k|v, head, token)
            _launch(qkv, out, cos, sin, b, n, h, 0,
                    (qkv.stride(0), qkv.stride(2), qkv.stride(3), qkv.stride(1)),
                    (out.stride(1), out.stride(0), out.stride(2), out.stride(3)), 3, False, rows)
            return out[0], out[1], out[2]
        # n_out positions each, in buffers of their own (not views of one), so that a caller may
        # write rows >= N in place under autograd
        outs = tuple(_alloc((b, h, n_out, d), qkv) for _ in range(3))
        for which, o in enumerate(outs):
            src = qkv[:, :, which]  # (B, R, H, D)
            _launch(src, o, cos, sin, b, n, h, which, (src.stride(0), 0, src.stride(2), src.stride(1)),
                    (o.stride(0), 0, o.stride(1), o.stride(2)), 1, False, rows)
            o[:, :, n:].zero_()
        if tails is None:
            ctx.save_for_backward(cos, sin, rows)
            return outs
        block, start, valid = tails
        count = block_counts(valid, b, n, block, qkv.device)
        for o in outs[1:]:  # the block means of k and v into their tails
            pooled, live = pool_blocks(o[:, :, :n], block, valid, count)
            o[:, :, start:start + pooled.shape[2]] = pooled.to(o.dtype)
        # d(mean of block j) / d(position n of it): valid[b, n] / count[b, j] (count >= 1)
        scale = count.clamp(min=1).reciprocal().repeat_interleave(block, 1)[:, :n]
        if valid is not None:
            scale = scale * valid
        ctx.save_for_backward(cos, sin, rows, scale.contiguous())
        ctx.tails = (start, block)
        ctx.mark_non_differentiable(live)
        return (*outs, live)

    @staticmethod
    def backward(ctx, dq, dk, dv, *_live):
        cos, sin, rows, *scale = ctx.saved_tensors
        b, r, _, h, d = ctx.shape
        n = cos.shape[0]
        like = next(g for g in (dq, dk, dv) if g is not None)
        dqkv = _alloc(ctx.shape, like)
        for which, g in enumerate((dq, dk, dv)):
            if g is None:
                dqkv[:, :, which] = 0
                continue
            if g.stride(-1) != 1:
                g = g.contiguous()
            # g (B, H, N or n_out, D; rows >= N read only as pooled tails) -> dqkv[:, :, which]
            # (B, R, H, D): every packed row is some position's, so each is written once (no atomics)
            tails = (scale[0], *ctx.tails) if scale and which else None
            _launch(g, dqkv, cos, sin, b, n, h, which,
                    (g.stride(0), 0, g.stride(1), g.stride(2)),
                    (dqkv.stride(0), dqkv.stride(2), dqkv.stride(3), dqkv.stride(1)), 1, True, rows, tails=tails)
        return dqkv, None, None, None, None, None


class _HeadsToRows(torch.autograd.Function):
    """o (B, H, N, D) -> (B, R, H, D): the packed rows' heads side by side; backward: the
    gradient back at the stream positions, zeros at the gaps. The kernel's copy path (w = v:
    no rotation), so cos / sin only give it the head dim."""

    @staticmethod
    def forward(ctx, o, rows, r, trig):
        b, h, n, d = o.shape
        if o.stride(-1) != 1:
            o = o.contiguous()
        out = _alloc((b, r, h, d), o)
        _launch(o, out, trig, trig, b, n, h, 2, (o.stride(0), 0, o.stride(1), o.stride(2)),
                (out.stride(0), 0, out.stride(2), out.stride(1)), 1, False, rows, rows_on=2)
        ctx.save_for_backward(rows, trig)
        ctx.shape = o.shape
        return out

    @staticmethod
    def backward(ctx, g):
        rows, trig = ctx.saved_tensors
        b, h, n, d = ctx.shape
        if g.stride(-1) != 1:
            g = g.contiguous()
        do = _alloc((b, h, n, d), g)
        _launch(g, do, trig, trig, b, n, h, 2, (g.stride(0), 0, g.stride(2), g.stride(1)),
                (do.stride(0), 0, do.stride(1), do.stride(2)), 1, False, rows, rows_on=1)
        return do, None, None, None


def heads_to_rows(o: torch.Tensor, rows: torch.Tensor, r: int) -> torch.Tensor:
    """An attention output o (B, H, N, D) over N stream positions -> (B, R, H, D), the R packed
    rows (`rows` (N,) int32: the row of each position, -1 at gaps) with their heads side by side
    (a view as (B, R, H D) feeds the output projection). One copy each way, no atomics; the
    backward writes zeros at the gaps. What `o.transpose(1, 2)[:, index]` gives."""
    if o.dim() != 4 or rows.shape != (o.shape[2],) or rows.dtype != torch.int32 or rows.device != o.device:
        raise ValueError(f"heads_to_rows needs o (B, H, N, D) and rows (N,) int32 on its device; got o "
                         f"{tuple(o.shape)} and rows {tuple(rows.shape)} {rows.dtype} on {rows.device}")
    if not _runs_on(o):
        raise ValueError(f"heads_to_rows needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU) of float16, "
                         f"bfloat16 or float32; got {o.dtype} on {o.device}")
    d = o.shape[-1]
    if d % 2:
        raise ValueError(f"heads_to_rows needs an even head dim, got D={d}")
    # the kernel walks the head dim in two halves of the tables' width; this path reads no table
    trig = torch.zeros(1, device=o.device, dtype=torch.float32).expand(o.shape[2], d // 2)
    return _HeadsToRows.apply(o, rows.contiguous(), int(r), trig)


def fused_rope_available(x: torch.Tensor) -> bool:
    """Whether the model layers take `qkv_rope` for x: a CUDA tensor of float16, bfloat16 or
    float32. KernelOptions.fused_rope (MMSPARSE_FUSED_ROPE) "0" turns it off; "1" also takes
    it on the CPU under TRITON_INTERPRET=1 (tests: the interpreter runs it ~10x slower than
    PyTorch's rotation)."""
    mode = kernel_options().fused_rope
    return mode != "0" and _runs_on(x) and (x.is_cuda or mode == "1")


def _runs_on(x: torch.Tensor) -> bool:
    """The kernel's own limits: a CUDA tensor, or the CPU under the interpreter; a dtype it has."""
    return x.dtype in DTYPES and (x.is_cuda or (x.device.type == "cpu" and interpreting()))


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor | None = None,
             n_out: int | None = None, pooled_tails: tuple | None = None):
    """Split a QKV projection into heads and rotate q and k, in one Triton pass each way.

    Args:
        qkv: (B, N, 3, H, D), D even, the head dim contiguous (a view of the (B, N, 3 H D)
            output of the projection); with `rows`, (B, R, 3, H, D) packed rows.
        cos, sin: (N, D / 2) float32 rotary tables (moved to qkv's device if needed).
        rows: optional (N,) int32 on qkv's device: the packed row of each stream position, -1 at
            gaps; every one of the R rows must appear once (`mmsparse.models.layers.packed_rows`).
        n_out: optional >= N: each output has n_out positions, zeros after the N-th, in a buffer
            of its own, so rows >= N may be written in place (the compressed branch's wide
            inputs, `mmsparse.attention.compressed.wide_length`, take their pooled keys there
            through `pooled_tails` instead, with no copy to widen them).
        pooled_tails: optional (block, start, valid), with n_out: k's and v's rows start.. hold
            the means of their blocks of `block` positions (`pool_blocks(x[:, :, :N], block,
            valid)`, valid (B, N) bool or None; the compressed branch's pooled keys, written
            here so that the backward adds each mean's gradient to its block in the same pass
            as the rotation, with no copy of the gradient).

    Returns:
        q, k, v, each (B, H, N or n_out, D) contiguous in qkv's dtype; q and k rotated; zeros at
        gaps; with pooled_tails also live (B, C) bool, the blocks that hold a valid position.
        Differentiable in qkv. Equal to `qkv_rope_ref` up to the float32 rounding of the rotation.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D), got shape {tuple(qkv.shape)}")
    b, r, _, h, d = qkv.shape
    n = r if rows is None else rows.shape[0]
    if d % 2:
        raise ValueError(f"the head dim must be even for rotary pairs, got D={d}")
    if cos.shape != (n, d // 2) or sin.shape != (n, d // 2):
        raise ValueError(f"cos and sin must be (N, D / 2) = ({n}, {d // 2}), got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if n_out is not None and n_out < n:
        raise ValueError(f"n_out must be >= the N = {n} stream positions, got {n_out}")
    if pooled_tails is not None:
        block, start, valid = pooled_tails
        c = -(-n // block) if block >= 1 else 0
        if n_out is None or block < 1 or start < n or start + c > n_out:
            raise ValueError(f"pooled_tails (block, start, valid) needs n_out, block >= 1 and its {c} rows at "
                             f"start >= N = {n} inside n_out = {n_out}; got block {block}, start {start}")
        if valid is not None and (tuple(valid.shape) != (b, n) or valid.dtype != torch.bool):
            raise ValueError(f"pooled_tails' valid must be (B, N) = ({b}, {n}) bool, got {tuple(valid.shape)} "
                             f"{valid.dtype}")
    if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int32 or rows.device != qkv.device):
        raise ValueError(f"rows must be (N,) int32 on {qkv.device}, got {tuple(rows.shape)} {rows.dtype} "
                         f"on {rows.device}")
    if not _runs_on(qkv):
        raise ValueError(f"qkv_rope needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU) of float16, "
                         f"bfloat16 or float32; got {qkv.dtype} on {qkv.device}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos = cos.to(device=qkv.device, dtype=torch.float32).contiguous()
    sin = sin.to(device=qkv.device, dtype=torch.float32).contiguous()
    if pooled_tails is not None:
        block, start, valid = pooled_tails
        pooled_tails = (int(block), int(start), None if valid is None else valid.to(qkv.device))
    return _QKVRope.apply(qkv, cos, sin, None if rows is None else rows.contiguous(),
                          None if n_out is None else int(n_out), pooled_tails)
