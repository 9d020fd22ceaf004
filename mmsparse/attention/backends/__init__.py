"""Attention backends behind `sparse_attention`, and the entry point itself.

Legend: B batch, H query heads, Hk key/value heads (H % Hk == 0, GQA), N tokens, D head dim.

Backends (all compute the same function of q, k, v and the BlockLayout; tests prove it), one
module each with `can_run(q, k, v, layout) -> reason or None` and `run(...)`:
- `reference`: plain PyTorch, chunked by query block, O(N k) memory, any device.
- `sdpa`: torch's scaled_dot_product_attention with the dense boolean mask of the layout;
  small N only (the mask is N x N).
- `flex`: torch FlexAttention with a BlockMask built from the same CSR lists and the mask
  program as mask_mod; compiled on CUDA, unfused eager mode on the CPU (small N).
- `triton_kernels`: the Triton kernels (mmsparse.kernels), CUDA only: block-sparse, with
  exactly-axial layouts on the axial kernels and `rest | Strided(s)` layouts split into both.
- `flash`: the layout's full blocks on FlashAttention-4's block-sparse kernels, its partial
  blocks on the Triton kernels, merged by log-sum-exp; CUDA only, an optional install.

`auto` picks, on CUDA, flash where it can run the inputs and the layout's full blocks hold at
least `KernelOptions.flash_min_full_share` of its computed pairs, else triton when it can run
the inputs, else flex (logging why, once); on the CPU the reference. Every choice is logged
with its reason; `KernelOptions.attention_backend` (MMSPARSE_ATTENTION_BACKEND) overrides it.
"""

from __future__ import annotations

import collections
import contextlib
import logging

import torch

from mmsparse.kernels.common import DTYPES, check_key_padding_mask, check_qkv
from mmsparse.kernels.options import kernel_options

from ..blocklayout import BlockLayout
from ..lsh import lsh_attention
from ..patterns import LSH
from . import flash, flex, reference, sdpa, triton_kernels
from .flex import flex_block_mask
from .sdpa import dense_attention

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "sdpa", "flex", "triton", "flash")
_MODULES = {"reference": reference, "sdpa": sdpa, "flex": flex, "triton": triton_kernels, "flash": flash}


def check_inputs(q, k, v, layout) -> None:
    """ValueError unless q, k, v are attention inputs (shapes, dtypes, devices) for `layout`."""
    check_qkv(q, k, v, DTYPES)
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"block_layout must be a BlockLayout (see build_layout), got {type(layout).__name__}")
    if q.shape[2] != layout.n:
        raise ValueError(f"q has N={q.shape[2]} tokens but block_layout was built for N={layout.n}")


def choose_backend(q, k, v, layout) -> str:
    """The `auto` choice: forced by the options; else on CUDA flash where it can run the inputs
    and the layout is mostly full blocks (`flash.auto_reason`), else triton where it can run
    them, else flex (the reason logged once); the reference off CUDA."""
    forced = kernel_options().attention_backend
    if forced:
        log.debug("sparse_attention: backend %s forced by the kernel options", forced)
        return forced
    if q.device.type == "cuda":
        not_flash = flash.auto_reason(q, k, v, layout)
        if not_flash is None:
            log.debug("sparse_attention: auto -> flash (full blocks hold %.1f %% of the computed pairs)",
                      100 * flash.full_share(layout))
            return "flash"
        reason = triton_kernels.can_run(q, k, v, layout)
        if reason is None:
            log.debug("sparse_attention: auto -> triton (CUDA tensors; not flash: %s)", not_flash)
            return "triton"
        _log_once(f"sparse_attention: auto -> flex because {reason}")
        return "flex"
    log.debug("sparse_attention: auto -> reference (%s tensors; the triton and flash backends need CUDA)",
              q.device.type)
    return "reference"


_LOGGED: set[str] = set()
_COUNTING: list[collections.Counter] = []


@contextlib.contextmanager
def backend_counts():
    """Counts the backends that `sparse_attention` runs (auto's choices resolved) while the
    block is open: ``with backend_counts() as c: step()`` -> c == Counter({"triton": 24});
    "dense" counts the calls without a layout (SDPA). Benchmarks record it beside their
    timings, so a result says what ran."""
    counts: collections.Counter = collections.Counter()
    _COUNTING.append(counts)
    try:
        yield counts
    finally:
        _COUNTING[:] = [c for c in _COUNTING if c is not counts]


def _count(backend: str) -> None:
    for counts in _COUNTING:
        counts[backend] += 1


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


def triton_available() -> bool:
    """Whether the Triton kernels can run here at all (a CUDA device)."""
    return torch.cuda.is_available()


def sparse_attention(q, k, v, block_layout: BlockLayout | None, backend: str = "auto", scale: float | None = None,
                     return_lse: bool = False, key_padding_mask: torch.Tensor | None = None):
    """Block-sparse attention.

    Args:
        q: (B, H, N, D) queries; k, v: (B, Hk, N, D) keys and values, H a multiple of Hk.
        block_layout: from `build_layout(pattern, layout)`, built for these N tokens; None runs
            dense attention (SDPA; `backend` and `return_lse` do not apply).
        backend: "auto", "reference", "sdpa", "flex", "triton" or "flash".
        scale: softmax scale, default 1 / sqrt(D).
        return_lse: also return the log-sum-exp (B, H, N) float32 (natural log).
        key_padding_mask: (B, N) bool, True where a token is padding (clips of different
            lengths in one batch): such keys are never attended, by any query. A query whose
            keys are all padding outputs zeros (LSE -inf), as for any row that attends nothing.

    Returns:
        out (B, H, N, D) in q's dtype, and lse when asked.
    """
    if block_layout is None:
        if return_lse:
            raise ValueError("return_lse needs a block_layout (dense attention through SDPA gives no LSE)")
        _count("dense")
        return dense_attention(q, k, v, key_padding_mask)
    check_inputs(q, k, v, block_layout)
    check_key_padding_mask(key_padding_mask, q)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = choose_backend(q, k, v, block_layout)
    _count(backend)
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
    if backend == "sdpa":
        return sdpa.run(q, k, v, layout, scale, kpm, return_lse)
    return _MODULES[backend].run(q, k, v, layout, scale, kpm)


__all__ = ["BACKENDS", "backend_counts", "check_inputs", "check_key_padding_mask", "choose_backend",
           "flex_block_mask", "sparse_attention", "triton_available"]
