"""Attention backends behind `sparse_attention`, and the entry point itself.

Legend: B batch, H query heads, Hk key/value heads (H % Hk == 0, GQA), N tokens, D head dim.

Backends (all compute the same function of q, k, v and the BlockLayout; tests prove it):
- `reference`: plain PyTorch, chunked by query block, O(N k) memory, any device.
- `sdpa`: torch's scaled_dot_product_attention with the dense boolean mask of the layout;
  small N only (the mask is N x N).
- `flex`: torch FlexAttention with a BlockMask built from the same CSR lists and the mask
  program as mask_mod; compiled on CUDA, unfused eager mode on the CPU (small N).
- `triton`: the Triton kernels (mmsparse.kernels), CUDA only: block-sparse, with exactly-axial
  layouts on the axial kernels and `rest | Strided(s)` layouts split into both (strided_attention).

`auto` picks triton on CUDA when the kernels are importable, else flex on CUDA, and the
reference on the CPU; the environment variable MMSPARSE_ATTENTION_BACKEND overrides it.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

from .blocklayout import BlockLayout, _rows_of
from .lsh import lsh_attention
from .patterns import LSH
from .reference import reference_attention

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "sdpa", "flex", "triton")
SDPA_MAX_TOKENS = int(os.environ.get("MMSPARSE_SDPA_MAX_TOKENS", 16384))
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4D tensor (B, H, N, D), got {shape}")
        if t.dtype not in _FLOAT_TYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (B, Hk, N), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q (B, H, N, D)={tuple(q.shape)} and k (B, Hk, N, D)={tuple(k.shape)} must agree in B, N and D"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for GQA")
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"block_layout must be a BlockLayout (see build_layout), got {type(layout).__name__}")
    if q.shape[2] != layout.n:
        raise ValueError(f"q has N={q.shape[2]} tokens but block_layout was built for N={layout.n}")


def _choose_backend(q, k, v, layout) -> str:
    forced = os.environ.get("MMSPARSE_ATTENTION_BACKEND")
    if forced:
        if forced not in BACKENDS[1:]:
            raise ValueError(f"MMSPARSE_ATTENTION_BACKEND must be one of {BACKENDS[1:]}, got {forced!r}")
        log.debug("sparse_attention: backend %s forced by MMSPARSE_ATTENTION_BACKEND", forced)
        return forced
    if q.device.type == "cuda":
        if not _triton_available():
            _log_once("sparse_attention: auto -> flex (CUDA tensors, Triton kernels not importable)")
            return "flex"
        from mmsparse.kernels.block_sparse_attention import unsupported_reason

        reason = unsupported_reason(q, k, v, layout)
        if reason is None:
            log.debug("sparse_attention: auto -> triton (CUDA tensors)")
            return "triton"
        _log_once(f"sparse_attention: auto -> flex because {reason}")
        return "flex"
    log.debug("sparse_attention: auto -> reference (%s tensors)", q.device.type)
    return "reference"


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


def _triton_available() -> bool:
    try:
        from mmsparse.kernels import block_sparse_attention  # noqa: F401
    except ImportError:
        return False
    return True


def sparse_attention(q, k, v, block_layout: BlockLayout, backend: str = "auto", scale: float | None = None,
                     return_lse: bool = False, key_padding_mask: torch.Tensor | None = None):
    """Block-sparse attention.

    Args:
        q: (B, H, N, D) queries; k, v: (B, Hk, N, D) keys and values, H a multiple of Hk.
        block_layout: from `build_layout(pattern, layout)`, built for these N tokens.
        backend: "auto", "reference", "sdpa", "flex" or "triton".
        scale: softmax scale, default 1 / sqrt(D).
        return_lse: also return the log-sum-exp (B, H, N) float32 (natural log).
        key_padding_mask: (B, N) bool, True where a token is padding (clips of different
            lengths in one batch): such keys are never attended, by any query. A query whose
            keys are all padding outputs zeros (LSE -inf), as for any row that attends nothing.

    Returns:
        out (B, H, N, D) in q's dtype, and lse when asked.
    """
    _check_inputs(q, k, v, block_layout)
    check_key_padding_mask(key_padding_mask, q)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _choose_backend(q, k, v, block_layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    layout = block_layout.to(q.device)
    kpm = None if key_padding_mask is None else key_padding_mask.to(q.device)
    if isinstance(layout.pattern, LSH):
        if kpm is not None:
            raise ValueError("key_padding_mask is not supported with the LSH pattern (its buckets sort "
                             "tokens per batch element); drop padding before LSH attention")
        out, lse = lsh_attention(q, k, v, layout, lambda q, k, v, l: _dispatch(q, k, v, l, backend, scale, True))
    else:
        out, lse = _dispatch(q, k, v, layout, backend, scale, return_lse, kpm)
    return (out, lse) if return_lse else out


def _dispatch(q, k, v, layout, backend, scale, return_lse, kpm=None):
    if backend == "reference":
        out, lse = reference_attention(q, k, v, layout, scale, kpm)
    elif backend == "sdpa":
        out, lse = _sdpa(q, k, v, layout, scale, return_lse, kpm)
    elif backend == "flex":
        out, lse = _flex(q, k, v, layout, scale, kpm)
    else:
        out, lse = _triton(q, k, v, layout, scale, kpm)
    return out, lse


def check_key_padding_mask(kpm, q):
    """ValueError unless kpm is None or a bool (B, N) tensor matching q (B, H, N, D); shared
    with the Triton kernels' own entry points."""
    if kpm is None:
        return
    if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be a bool tensor (B, N), got {getattr(kpm, 'dtype', type(kpm).__name__)}")
    if tuple(kpm.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, N) = ({q.shape[0]}, {q.shape[2]}), got {tuple(kpm.shape)}")


# ---------------------------------------------------------------------------------------------


def _sdpa(q, k, v, layout: BlockLayout, scale, return_lse, kpm=None):
    if layout.n > SDPA_MAX_TOKENS:
        raise ValueError(
            f"backend='sdpa' builds a dense N x N mask and takes N <= {SDPA_MAX_TOKENS} "
            f"(MMSPARSE_SDPA_MAX_TOKENS); got N={layout.n}: use 'reference', 'flex' or 'triton'"
        )
    mask = _dense_mask(layout)
    if kpm is not None:
        mask = mask & ~kpm[:, None, None, :]  # (B, 1, N, N)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if kpm is not None:  # rows left with no key: SDPA gives NaN, the contract says 0
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    lse = None
    if return_lse:
        kr = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
    return out, lse


def _dense_mask(layout: BlockLayout) -> torch.Tensor:
    cached = getattr(layout, "_dense", None)
    if cached is None:
        cached = layout._dense = layout.dense_mask(SDPA_MAX_TOKENS)
    return cached


def _kv_table(mq: int, mk: int, *lists):
    """Per query block, the key blocks of the CSR lists (ptr, idx) one after the other, as
    BlockMask.from_kv_blocks takes them: (counts (1, 1, Mq), table (1, 1, Mq, Mk)) int32."""
    dev = lists[0][0].device
    table = torch.zeros(mq, mk, dtype=torch.int32, device=dev)
    filled = torch.zeros(mq, dtype=torch.long, device=dev)
    for ptr, idx in lists:
        rows = _rows_of(ptr).long()
        slot = torch.arange(idx.numel(), device=dev) - ptr[:-1].long()[rows] + filled[rows]
        table[rows, slot] = idx.to(torch.int32)
        filled += (ptr[1:] - ptr[:-1]).long()
    return filled.to(torch.int32)[None, None], table[None, None]


def flex_block_mask(layout: BlockLayout):
    """The FlexAttention BlockMask of a BlockLayout (same full and partial blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

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


_compiled_flex = None


def _flex(q, k, v, layout: BlockLayout, scale, kpm=None):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    global _compiled_flex
    fn = flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    elif any(t.requires_grad for t in (q, k, v)):
        if torch.is_grad_enabled():
            raise ValueError(
                "backend='flex' has no backward on the CPU (torch FlexAttention); use it under "
                "torch.no_grad() there, or the 'reference' backend for training"
            )
        q, k, v = q.detach(), k.detach(), v.detach()
    gqa = q.shape[1] != k.shape[1]
    block_mask = flex_block_mask(layout) if kpm is None else _flex_padded_mask(layout, kpm)
    out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _flex_padded_mask(layout: BlockLayout, kpm: torch.Tensor):
    """The layout's blocks as a BlockMask for padded keys: flex skips mask_mod in full blocks,
    so every listed block is partial here and mask_mod also reads the padding flags kpm[b, kv].
    Built once per layout; the flags of the current call sit in a holder that mask_mod reads."""
    from torch.nn.attention.flex_attention import BlockMask

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


def _triton(q, k, v, layout: BlockLayout, scale, kpm=None):
    if q.device.type != "cuda":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {q.device}")
    try:
        from mmsparse.kernels.axial_attention import axial_attention, axial_geometry
        from mmsparse.kernels.block_sparse_attention import block_sparse_attention
        from mmsparse.kernels.strided_attention import strided_attention, strided_split
    except ImportError as err:
        raise ValueError(f"backend='triton' is unavailable: {err}") from err
    geometry = axial_geometry(layout)
    if geometry is not None:  # lines read in place: no per-block waste, no permuted copies
        return axial_attention(q, k, v, geometry, scale, key_padding_mask=kpm)
    if strided_split(layout) is not None:  # strided keys as axial lines, the rest block-sparse
        return strided_attention(q, k, v, layout, scale, key_padding_mask=kpm)
    return block_sparse_attention(q, k, v, layout, scale, key_padding_mask=kpm)
