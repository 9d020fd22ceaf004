"""The flex backend: torch FlexAttention with a BlockMask built from the layout's CSR lists and
its mask program as mask_mod; compiled on CUDA, unfused eager mode on the CPU (small N, and no
backward there)."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from mmsparse.kernels.block_sparse.lists import rows_of

from ..blocklayout import BlockLayout


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """Why flex cannot run here (a backward on the CPU), or None."""
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return ("backend='flex' has no backward on the CPU (torch FlexAttention); use it under "
                "torch.no_grad() there, or the 'reference' backend for training")
    return None


def _kv_table(mq: int, mk: int, *lists):
    """Per query block, the key blocks of the CSR lists (ptr, idx) one after the other, as
    BlockMask.from_kv_blocks takes them: (counts (1, 1, Mq), table (1, 1, Mq, Mk)) int32."""
    dev = lists[0][0].device
    table = torch.zeros(mq, mk, dtype=torch.int32, device=dev)
    filled = torch.zeros(mq, dtype=torch.long, device=dev)
    for ptr, idx in lists:
        rows = rows_of(ptr).long()
        slot = torch.arange(idx.numel(), device=dev) - ptr[:-1].long()[rows] + filled[rows]
        table[rows, slot] = idx.to(torch.int32)
        filled += (ptr[1:] - ptr[:-1]).long()
    return filled.to(torch.int32)[None, None], table[None, None]


def flex_block_mask(layout: BlockLayout):
    """The FlexAttention BlockMask of a BlockLayout (same full and partial blocks)."""
    cached = getattr(layout, "_flex_mask", None)
    if cached is not None:
        return cached
    mq, mk = layout.num_q_blocks, layout.num_k_blocks
    program = layout.program

    def mask_mod(b, h, q_idx, kv_idx):
        return program.evaluate(q_idx, kv_idx)

    num, idx = _kv_table(mq, mk, (layout.q_part_ptr, layout.q_part_idx))
    full_num, full_idx = _kv_table(mq, mk, (layout.q_full_ptr, layout.q_full_idx))
    mask = BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx,
        BLOCK_SIZE=(layout.block_q, layout.block_k), mask_mod=mask_mod, seq_lengths=(layout.n, layout.n),
    )
    layout._flex_mask = mask
    return mask


def _padded_mask(layout: BlockLayout, kpm: torch.Tensor):
    """The layout's blocks as a BlockMask for padded keys: flex skips mask_mod in full blocks,
    so every listed block is partial here and mask_mod also reads the padding flags kpm[b, kv].
    Built once per layout; the flags of the current call sit in a holder that mask_mod reads."""
    cached = getattr(layout, "_flex_padded", None)
    if cached is None:
        num, table = _kv_table(layout.num_q_blocks, layout.num_k_blocks,
                               (layout.q_full_ptr, layout.q_full_idx), (layout.q_part_ptr, layout.q_part_idx))
        holder: dict = {}
        program = layout.program

        def mask_mod(b, h, q_idx, kv_idx):
            return program.evaluate(q_idx, kv_idx) & ~holder["kpm"][b, kv_idx]

        mask = BlockMask.from_kv_blocks(
            num, table,
            BLOCK_SIZE=(layout.block_q, layout.block_k), mask_mod=mask_mod, seq_lengths=(layout.n, layout.n),
        )
        cached = layout._flex_padded = (mask, holder)
    mask, holder = cached
    holder["kpm"] = kpm
    return mask


_compiled_flex = None


def run(q, k, v, layout: BlockLayout, scale, key_padding_mask=None):
    global _compiled_flex
    reason = can_run(q, k, v, layout)
    if reason:
        raise ValueError(reason)
    fn = flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    else:  # eager FlexAttention: no autograd here (can_run refused the cases that need it)
        q, k, v = q.detach(), k.detach(), v.detach()
    gqa = q.shape[1] != k.shape[1]
    kpm = key_padding_mask
    block_mask = flex_block_mask(layout) if kpm is None else _padded_mask(layout, kpm)
    out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return out, aux.lse
