"""Compressed branch: every query also attends the mean-pooled keys of every block of the stream.

Legend: B batch, H query heads, Hk key heads, N tokens, D head dim, C = ceil(N / c) pooled
blocks of c tokens.

A sparse pattern gives each token a small neighbourhood; what lies outside it reaches the token
only through many layers (local windows) or a few shared tokens (global). The compressed branch
(NSA, VideoNSA) gives every query a coarse view of the whole stream at O(N^2 / c) cost: keys and
values are averaged over consecutive blocks of c stream positions (in the stream's storage
order, so a block of a tile-ordered video segment is a compact spatio-temporal tile), and the
query attends all C pooled keys as C more keys of its softmax. Two equal forms:
``sparse_with_pooled_keys`` appends the pooled keys after the stream as key blocks every query
block attends fully (``pooled_keys_layout``), so the sparse kernel runs one softmax over both;
``compressed_attention`` + ``merge_lse`` computes the pooled part apart in PyTorch and merges
by log-sum-exp (the reference, and the form for layouts whose keys are sorted per clip). Positions
that are not real tokens (alignment gaps, padding of shorter clips) are left out of the means;
a block with no real token is never attended.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from mmsparse.kernels.common import merge_lse, pool_blocks  # noqa: F401  (re-exported: the merge of the
# two branches, the block means)


def compressed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, scale: float | None = None,
                         valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, H, N, D) over the block means of k, v (B, Hk, N, D).

    Returns out (B, H, N, D) in q's dtype and lse (B, H, N) float32, float64 for float64 inputs
    (natural log; -inf where no block has a real token). GQA when Hk divides H. Queries go in
    chunks of at most ``CHUNK_SCORES`` scores, each recomputed in the backward pass, so memory
    stays O(N D) plus one chunk at any length."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q must be (B, H, N, D) and k, v (B, Hk, N, D) alike; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key heads {k.shape[1]}")
    if valid is not None and tuple(valid.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"valid must be (B, N) = ({q.shape[0]}, {q.shape[2]}), got {tuple(valid.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kc, live = pool_blocks(k, block, valid)
    vc, _ = pool_blocks(v, block, valid)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        kc, vc = kc.repeat_interleave(rep, 1), vc.repeat_interleave(rep, 1)
    bias = torch.zeros(live.shape, dtype=torch.float32, device=q.device).masked_fill(~live, -math.inf)[:, None, None]
    b, h, n, _ = q.shape
    rows = max(1, CHUNK_SCORES // max(1, b * h * kc.shape[2]))  # query rows per chunk
    if rows >= n:
        return _dense_part(q, kc, vc, bias, scale)
    outs, lses = [], []
    for i in range(0, n, rows):
        part = q[:, :, i:i + rows]
        if torch.is_grad_enabled():
            # scores of a chunk are recomputed in the backward pass: memory O(rows C), not O(N C)
            o, l = torch.utils.checkpoint.checkpoint(_dense_part, part, kc, vc, bias, scale, use_reentrant=False)
        else:
            o, l = _dense_part(part, kc, vc, bias, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)


# score elements (B x H x rows x C) a chunk of queries may hold at once (float32: 4 bytes each)
CHUNK_SCORES = 1 << 27


def _dense_part(q, kc, vc, bias, scale: float):
    s = torch.matmul(q, kc.transpose(-1, -2))  # (B, H, rows, C)
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * scale + bias  # softmax in float32 (or float64)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, rows)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(p.to(vc.dtype), vc).to(q.dtype), lse


# -- the pooled keys inside the sparse kernel -----------------------------------------------------
def pooled_keys_layout(layout, n_pooled: int):
    """`layout` widened so that every query block of its N positions also attends ``n_pooled``
    more keys fully, after the stream (``blocklayout.with_full_keys``): (wide layout, K0), K0
    the first pooled position. Cached on `layout` per ``n_pooled``."""
    from .blocklayout import with_full_keys

    cache = layout.__dict__.setdefault("_pooled_keys", {})
    if n_pooled not in cache:
        cache[n_pooled] = with_full_keys(layout, n_pooled)
    return cache[n_pooled]


def pooled_key_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, block: int,
                      valid: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                      live: torch.Tensor | None = None):
    """The inputs of one sparse attention call over `layout` and the block means of k, v:
    (q, k, v widened to the wide layout's positions, the wide layout, its key padding mask
    (B, N') or None). Shapes as in ``sparse_with_pooled_keys``; or q, k, v already at the wide
    layout's N' positions with the pooled keys in k's and v's rows K0.. and `live` (B, C) the
    blocks that have a real position (``qkv_rope(..., n_out, pooled_tails)`` writes them as
    ``pooled_tails`` plans), used as they are: no copy to widen them.

    The mask is None, so that backends which evaluate no mask in full blocks (flash) can run the
    call, where nothing needs it: no key_padding_mask, a stream that ends on a key block, and no
    pooled block without a real token, which the host knows when `valid` is None or is the
    positions of ``layout.stream`` that are not alignment gaps (``all_blocks_real``; the models'
    ``real``). Otherwise it masks the padding keys, the positions between the stream and K0 and
    the pooled blocks with no real token."""
    b, h, nq, d = q.shape
    hk, n = k.shape[1], layout.n
    c = math.ceil(n / block)  # pooled keys, as pool_blocks makes them
    wide, k0 = pooled_keys_layout(layout, c)
    nw = wide.n
    if nq == n:
        kc, live = pool_blocks(k, block, valid)
        vc, _ = pool_blocks(v, block, valid)

        def widen(x, pooled):  # [stream | gap to K0 | pooled | gap to N']
            return torch.cat([x, x.new_zeros(b, hk, k0 - n, d), pooled.to(x.dtype), x.new_zeros(b, hk, nw - k0 - c, d)],
                             2)

        qw, kw, vw = torch.cat([q, q.new_zeros(b, h, nw - n, d)], 2), widen(k, kc), widen(v, vc)
    elif nq == nw and live is not None:  # widened at the source, the pooled keys in place
        qw, kw, vw = q, k, v
    else:
        raise ValueError(f"q, k, v must have the layout's N = {n} positions, or the wide layout's {nw} with the "
                         f"pooled keys written and `live` given (qkv_rope's pooled_tails); got {nq} positions, "
                         f"live {'given' if live is not None else 'None'}")
    pad = None
    if key_padding_mask is not None or k0 != n or not (valid is None or all_blocks_real(layout, block)):
        pad = torch.ones(b, nw, dtype=torch.bool, device=q.device)
        pad[:, :n] = False if key_padding_mask is None else key_padding_mask.to(q.device)
        pad[:, k0:k0 + c] = ~live
    return qw, kw, vw, wide, pad


def wide_length(layout, compress: int, compress_keys: int = 0) -> int | None:
    """N', the positions of the widened inputs that ``layer_attention`` also takes for `layout`
    with the compressed branch of `compress` / `compress_keys` (its N stream positions, then the
    pooled keys' rows, padded to the wide layout's blocks), or None where it takes N positions
    only: no branch, dense (layout None), or an LSH layout (branches merged apart)."""
    wide = _wide_layout(layout, compress, compress_keys)
    return None if wide is None else wide[0].n


def _wide_layout(layout, compress: int, compress_keys: int):
    """``pooled_keys_layout``'s (wide layout, K0) for the branch of `compress` / `compress_keys`,
    or None where ``layer_attention`` widens nothing (no branch, dense, LSH)."""
    from .patterns import LSH

    if layout is None or not compress or isinstance(layout.pattern, LSH):
        return None
    return pooled_keys_layout(layout, pooled_keys(layout.n, compress, compress_keys))


class PooledTails(NamedTuple):
    """Where an encoder layer's compressed branch takes its pooled keys when q, k, v are made at
    the wide length (``pooled_tails``): n_out positions, the means of blocks of `block` stream
    positions over `valid` (B, N) (None: all) in k's and v's rows start.."""

    n_out: int
    block: int
    start: int
    valid: torch.Tensor | None


def pooled_tails(layout, compress: int, batch: int, compress_keys: int = 0, real: torch.Tensor | None = None,
                 key_padding_mask: torch.Tensor | None = None) -> PooledTails | None:
    """The wide inputs ``layer_attention`` takes for `layout` with the compressed branch of
    `compress` / `compress_keys` over `batch` clips (``PooledTails``; its arguments `real` and
    `key_padding_mask` as there), or None where it takes N positions only: no branch, dense
    (layout None), or an LSH layout (branches merged apart)."""
    wide = _wide_layout(layout, compress, compress_keys)
    if wide is None:
        return None
    block, valid = _branch_block(layout.n, batch, compress, compress_keys, real, key_padding_mask)
    return PooledTails(wide[0].n, block, wide[1], valid)


def _branch_block(n: int, b: int, compress: int, compress_keys: int, real, key_padding_mask):
    """(the pooled block, the positions it pools (B, N) bool or None: all) of a layer's branch."""
    valid = None if real is None else real.expand(b, n)
    if key_padding_mask is not None:
        valid = ~key_padding_mask if valid is None else valid & ~key_padding_mask
    return pooled_block(n, compress, compress_keys), valid


def all_blocks_real(layout, block: int) -> bool:
    """Whether every block of ``block`` positions of `layout`'s stream holds a position that is
    not an alignment gap of ``layout.stream`` (False when the layout has no stream): computed on
    the host once per layout and block, so the pooled keys need no mask of dead blocks and no
    device sync to find out. Callers pass as `valid` exactly those positions (the models'
    ``real``); a `valid` with fewer real positions needs a key_padding_mask."""
    from .stream import gap_positions

    cache = layout.__dict__.setdefault("_all_blocks_real", {})
    if block not in cache:
        stream = layout.stream
        if stream is None or stream.length != layout.n:
            cache[block] = False
        else:
            real = ~gap_positions(stream)
            c = math.ceil(layout.n / block)
            real = torch.nn.functional.pad(real, (0, c * block - layout.n))
            cache[block] = bool(real.view(c, block).any(1).all())
    return cache[block]


def sparse_with_pooled_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, block: int,
                            valid: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                            backend: str = "auto", scale: float | None = None,
                            live: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse attention over `layout` and the block means of k, v (``compressed_attention``'s
    keys) in one softmax: the same result as ``merge_lse`` of the two branches, at the cost of
    ceil(C / block_k) more full key blocks per query block. q (B, H, N, D), k, v (B, Hk, N, D),
    or all three at the wide layout's N' positions with the pooled keys and `live`
    (``pooled_key_inputs``); valid (B, N) the real positions (None: all), key_padding_mask
    (B, N) True at keys the sparse branch must not attend. Returns (B, H, N, D)."""
    from .backends import sparse_attention

    qw, kw, vw, wide, pad = pooled_key_inputs(q, k, v, layout, block, valid, key_padding_mask, live)
    return sparse_attention(qw, kw, vw, wide, backend=backend, scale=scale, key_padding_mask=pad)[:, :, :layout.n]


def pooled_block(n: int, block: int, max_keys: int = 0) -> int:
    """The pooled block of an `n`-position stream: `block`, or, where more than `max_keys` blocks
    would cover the stream, the least whole multiple of `block` with at most `max_keys` of them
    (0: no bound). Bounded, the branch costs N x max_keys pairs a layer, linear in N like the
    sparse layout, not N^2 / block; a multiple of `block` keeps whole video tiles together."""
    if block < 1 or max_keys < 0:
        raise ValueError(f"block must be >= 1 and max_keys >= 0 (0: no bound), got {block}, {max_keys}")
    if not max_keys:
        return block
    return block * max(1, math.ceil(math.ceil(n / block) / max_keys))


def pooled_keys(n: int, block: int, max_keys: int = 0) -> int:
    """How many pooled keys an `n`-position stream has: ceil(n / ``pooled_block(n, block, max_keys)``)."""
    return math.ceil(n / pooled_block(n, block, max_keys))


def layer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, compress: int = 0,
                    backend: str = "auto", key_padding_mask: torch.Tensor | None = None,
                    real: torch.Tensor | None = None, compress_keys: int = 0,
                    live: torch.Tensor | None = None) -> torch.Tensor:
    """An encoder layer's attention: dense (layout None), the sparse layout, or, with `compress`
    > 0, the sparse layout and its compressed branch: the pooled keys inside the layout's softmax
    (``sparse_with_pooled_keys``), or, for LSH layouts (buckets sorted per clip, no fixed block
    lists to widen), the two branches merged by log-sum-exp. real (N,) or (B, N) bool: the
    positions that are tokens (not alignment gaps), which the block means pool together with the
    keys `key_padding_mask` (B, N) does not mask; None: all. compress_keys > 0 bounds the pooled
    keys (``pooled_block``). q, k, v have N positions, or, where ``pooled_tails`` is not None,
    its n_out with the pooled keys in k's and v's tails and `live` given; the output has N."""
    from .backends import sparse_attention
    from .patterns import LSH

    if layout is None or not compress:
        return sparse_attention(q, k, v, layout, backend=backend, key_padding_mask=key_padding_mask)
    compress, valid = _branch_block(layout.n, q.shape[0], compress, compress_keys, real, key_padding_mask)
    if isinstance(layout.pattern, LSH):
        out, lse = sparse_attention(q, k, v, layout, backend=backend, key_padding_mask=key_padding_mask,
                                    return_lse=True)
        out_c, lse_c = compressed_attention(q, k, v, compress, valid=valid)
        return merge_lse(out, lse, out_c, lse_c)[0]
    return sparse_with_pooled_keys(q, k, v, layout, compress, valid=valid, key_padding_mask=key_padding_mask,
                                   backend=backend, live=live)
