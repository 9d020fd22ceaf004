"""The reference backend: block-sparse attention in plain PyTorch, on any device.

Legend: B batch, H query heads, Hk key/value heads (GQA: H = Hk * R), N tokens, D head dim,
G query blocks processed together, bq / bk block sizes, L keys gathered for a query block
(its listed key blocks times bk), Np = N padded to whole blocks.

It walks the BlockLayout exactly as a kernel does: for each query block, the keys of its
full blocks (no mask) and of its partial blocks (mask program), online in float32. Memory is
O(N x keys per query), never O(N^2): the forward keeps only the output and the log-sum-exp,
and the backward recomputes the probabilities chunk by chunk (as FlashAttention does).
Rows that attend no key output zeros with a log-sum-exp of -inf.
"""

from __future__ import annotations

import math

import torch

from mmsparse.kernels.block_sparse.lists import rows_of
from mmsparse.kernels.common import run_attention

from ..blocklayout import BlockLayout

_CHUNK_ELEMENTS = 1 << 24  # score elements per chunk of query blocks


class _KeyLists:
    """Per query block: its key blocks (full first, then partial), padded per chunk."""

    def __init__(self, layout: BlockLayout):
        dev = layout.device
        rows = torch.cat([rows_of(layout.q_full_ptr), rows_of(layout.q_part_ptr)]).long()
        cols = torch.cat([layout.q_full_idx, layout.q_part_idx]).long()
        partial = torch.cat(
            [torch.zeros(layout.num_full, dtype=torch.bool, device=dev),
             torch.ones(layout.num_partial, dtype=torch.bool, device=dev)]
        )
        order = torch.argsort(rows, stable=True)  # full blocks stay first in each row
        self.cols, self.partial = cols[order], partial[order]
        counts = torch.bincount(rows, minlength=layout.num_q_blocks)
        self.ptr = torch.zeros(layout.num_q_blocks + 1, dtype=torch.long, device=dev)
        self.ptr[1:] = torch.cumsum(counts, 0)
        self.counts = counts.tolist()

    def chunks(self, layout: BlockLayout, heads: int):
        """Yield (q0, q1, kidx (G, L), slot_partial (G, L), slot_valid (G, L))."""
        mq, bk = layout.num_q_blocks, layout.block_k
        q0 = 0
        while q0 < mq:
            # grow the chunk while the padded score tensor stays under the budget
            q1, width = q0, 0
            while q1 < mq:
                w = max(width, self.counts[q1])
                if q1 > q0 and (q1 - q0 + 1) * w * bk * layout.block_q * heads > _CHUNK_ELEMENTS:
                    break
                width, q1 = w, q1 + 1
            g = q1 - q0
            width = max(width, 1)
            slot = torch.arange(width, device=self.ptr.device)
            start = self.ptr[q0:q1, None]
            valid_blk = slot[None, :] < (self.ptr[q0 + 1 : q1 + 1, None] - start)
            flat = (start + slot[None, :]).clamp(max=max(self.cols.numel() - 1, 0))
            if self.cols.numel():
                kb = torch.where(valid_blk, self.cols[flat], 0)
                part = self.partial[flat] & valid_blk
            else:
                kb = torch.zeros(g, width, dtype=torch.long, device=self.ptr.device)
                part = torch.zeros_like(valid_blk)
            tok = (kb[:, :, None] * bk + torch.arange(bk, device=kb.device)).reshape(g, width * bk)
            yield q0, q1, tok, part.repeat_interleave(bk, 1), valid_blk.repeat_interleave(bk, 1) & (tok < layout.n)
            q0 = q1


def _key_lists(layout: BlockLayout) -> _KeyLists:
    cached = getattr(layout, "_key_lists", None)
    if cached is None:
        cached = _KeyLists(layout)
        layout._key_lists = cached
    return cached


def _chunk_mask(layout, q0, q1, tok, part, valid, key_padding=None):
    """(G, bq, L) bool: which gathered keys each query of the chunk attends; with
    key_padding (B, N) bool, (B, 1, 1, G, bq, L) (padding keys never attend)."""
    bq, n = layout.block_q, layout.n
    qi = (torch.arange(q0 * bq, q1 * bq, device=tok.device).view(q1 - q0, bq, 1)).clamp(max=n - 1)
    ki = tok.clamp(max=n - 1)[:, None, :]
    partial_ok = layout.program.evaluate(qi, ki)
    mask = valid[:, None, :] & (~part[:, None, :] | partial_ok)
    if key_padding is not None:
        mask = mask & ~key_padding[:, tok.clamp(max=n - 1)][:, None, None, :, None, :]
    return mask


def _pad_tokens(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, n_pad - x.shape[2]))


def _forward(q, k, v, layout: BlockLayout, scale: float, key_padding=None):
    """q (B, H, N, D), k / v (B, Hk, N, D) -> out (B, H, N, D) float32, lse (B, H, N) float32."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    r = h // hk
    bq = layout.block_q
    n_pad = layout.num_q_blocks * bq
    qf = _pad_tokens(q.float(), n_pad).view(b, hk, r, layout.num_q_blocks, bq, d)
    kf, vf = k.float(), v.float()
    out = torch.zeros(b, hk, r, layout.num_q_blocks, bq, v.shape[-1], device=q.device)
    lse = torch.full((b, hk, r, layout.num_q_blocks, bq), -math.inf, device=q.device)
    for q0, q1, tok, part, valid in _key_lists(layout).chunks(layout, b * h):
        mask = _chunk_mask(layout, q0, q1, tok, part, valid, key_padding)  # (G, bq, L)
        kg = kf[:, :, tok.clamp(max=n - 1)]  # (B, Hk, G, L, D)
        vg = vf[:, :, tok.clamp(max=n - 1)]
        s = torch.einsum("bhrgqd,bhgkd->bhrgqk", qf[:, :, :, q0:q1], kg) * scale
        s = s.masked_fill(~mask, -math.inf)
        m = s.amax(-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m_safe)
        l = p.sum(-1, keepdim=True)
        out[:, :, :, q0:q1] = torch.einsum("bhrgqk,bhgkd->bhrgqd", p, vg) / l.clamp(min=1e-30)
        lse[:, :, :, q0:q1] = torch.where(l > 0, m_safe + torch.log(l), -math.inf).squeeze(-1)
    out = out.view(b, h, n_pad, -1)[:, :, :n]
    return out, lse.view(b, h, n_pad)[:, :, :n]


def _backward(q, k, v, out, lse, dout, dlse, layout: BlockLayout, scale: float, key_padding=None):
    """Gradients of (out, lse); dlse (B, H, N) or None. d lse / d s = p, so dlse shifts delta."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    r = h // hk
    bq, mq = layout.block_q, layout.num_q_blocks
    n_pad = mq * bq
    shape6 = (b, hk, r, mq, bq)
    qf = _pad_tokens(q.float(), n_pad).view(*shape6, d)
    do = _pad_tokens(dout.float(), n_pad).view(*shape6, -1)
    of = _pad_tokens(out.float(), n_pad).view(*shape6, -1)
    lse = torch.nn.functional.pad(lse, (0, n_pad - n), value=-math.inf).view(shape6)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    delta = (do * of).sum(-1)  # (B, Hk, R, Mq, bq)
    if dlse is not None:
        delta = delta - torch.nn.functional.pad(dlse.float(), (0, n_pad - n)).view(shape6)
    kf, vf = k.float(), v.float()
    dq = torch.zeros_like(qf)
    dk = torch.zeros(b, hk, n + 1, d, device=q.device)  # slot n collects padding
    dv = torch.zeros(b, hk, n + 1, v.shape[-1], device=q.device)
    for q0, q1, tok, part, valid in _key_lists(layout).chunks(layout, b * h):
        mask = _chunk_mask(layout, q0, q1, tok, part, valid, key_padding)
        safe_tok = tok.clamp(max=n - 1)
        kg, vg = kf[:, :, safe_tok], vf[:, :, safe_tok]  # (B, Hk, G, L, D)
        qc = qf[:, :, :, q0:q1]
        s = torch.einsum("bhrgqd,bhgkd->bhrgqk", qc, kg) * scale
        p = torch.where(mask, torch.exp(s - lse_safe[:, :, :, q0:q1, :, None]), 0.0)
        doc = do[:, :, :, q0:q1]
        dp = torch.einsum("bhrgqd,bhgkd->bhrgqk", doc, vg)
        ds = p * (dp - delta[:, :, :, q0:q1, :, None]) * scale
        dq[:, :, :, q0:q1] = torch.einsum("bhrgqk,bhgkd->bhrgqd", ds, kg)
        dest = torch.where(valid, tok, n).flatten()  # (G * L,)
        dv.index_add_(2, dest, torch.einsum("bhrgqk,bhrgqd->bhgkd", p, doc).flatten(2, 3))
        dk.index_add_(2, dest, torch.einsum("bhrgqk,bhrgqd->bhgkd", ds, qc).flatten(2, 3))
    dq = dq.view(b, h, n_pad, d)[:, :, :n]
    return dq, dk[:, :, :n], dv[:, :, :n]


class ReferenceOp:
    """The PyTorch walk as an op of the kernels' shared autograd shell: it keeps its float32
    output for the backward and returns it in q's dtype."""

    def __init__(self, layout: BlockLayout):
        self.layout = layout

    def forward(self, q, k, v, scale, key_padding):
        out, lse = _forward(q, k, v, self.layout, scale, key_padding)
        return out.to(q.dtype), lse, (q, k, v, out, lse)

    def backward(self, saved, dout, dlse, scale, key_padding):
        q, k, v, out, lse = saved
        if dlse is not None:
            dlse = torch.where(torch.isfinite(lse), dlse, 0.0)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, self.layout, scale, key_padding)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_attention(q, k, v, layout: BlockLayout, scale: float, key_padding_mask=None):
    """out (B, H, N, D) in q's dtype, lse (B, H, N) float32; both differentiable in q, k, v.
    key_padding_mask (B, N) bool: True where a key is padding (never attended)."""
    return run_attention(ReferenceOp(layout), q, k, v, scale, key_padding_mask)


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """The reference runs everything (any device, any N): never a reason not to."""
    return None


run = reference_attention
