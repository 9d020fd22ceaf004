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

import torch
import torch.utils.checkpoint

from mmsparse.kernels.common import merge_lse  # noqa: F401  (re-exported: the merge of the two branches)


def pool_blocks(x: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, Hk, N, D) -> (mean over each block of `block` positions (B, Hk, C, D), block has a
    real token (B, C) bool). valid (B, N) bool marks the real positions (None: all).

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
    count = _block_counts(valid, b, n, block, x.device)
    return total / count.clamp(min=1)[:, None, :, None].to(total.dtype), count > 0


def _block_counts(valid: torch.Tensor | None, b: int, n: int, block: int, device) -> torch.Tensor:
    """(B, C) float32: the real positions (`valid`; None: all n) in each block of `block`
    positions; float32 so that counts past 256 stay exact (bf16 holds integers only to 256)."""
    real = torch.ones(b, n, device=device) if valid is None else valid.float()
    return torch.nn.functional.pad(real, (0, (-n) % block)).view(b, -1, block).sum(2)


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


class _PooledIntoTail(torch.autograd.Function):
    """x[:, :, start:start + C] = ``pool_blocks(x[:, :, :n], block, valid)``, in place, for x at
    the wide length whose rows >= n come from ``qkv_rope(..., n_out=N')`` (zeros whose gradient
    its backward never reads). Returns (x, live). Backward: x's gradient whole, plus each
    written row's gradient spread back over its block's real rows (the mean's gradient), in one
    copy of the gradient and one in-place pass; autograd's slices and in-place write would
    materialise and add the gradient several times."""

    @staticmethod
    def forward(ctx, x, n, block, valid, start):
        with torch.no_grad():
            pooled, live = pool_blocks(x[:, :, :n], block, valid)
        c = pooled.shape[2]
        x[:, :, start:start + c] = pooled.to(x.dtype)
        ctx.mark_dirty(x)
        ctx.mark_non_differentiable(live)
        ctx.save_for_backward(valid)
        ctx.args = (n, block, start, c)
        return x, live

    @staticmethod
    def backward(ctx, g, _live):
        (valid,) = ctx.saved_tensors
        n, block, start, c = ctx.args
        b, hk, _, d = g.shape
        count = _block_counts(valid, b, n, block, g.device).clamp(min=1)  # as pool_blocks counts
        gp = (g[:, :, start:start + c] / count[:, None, :, None]).to(g.dtype)  # (B, Hk, C, D): d(mean) / d(row)
        weight = None if valid is None else valid.to(g.dtype)  # 0 / 1: exact
        dx = g.clone()
        whole, rest = divmod(n, block)
        for first, blocks, size in ((0, whole, block), (whole, 1 if rest else 0, rest)):
            if not blocks:
                continue
            rows = slice(first * block, first * block + blocks * size)
            part = dx[:, :, rows].view(b, hk, blocks, size, d)
            share = gp[:, :, first:first + blocks, None]  # (B, Hk, blocks, 1, D)
            if weight is None:
                part.add_(share)
            else:
                part.addcmul_(share, weight[:, None, rows].reshape(b, 1, blocks, size, 1))
        return dx, None, None, None, None


def pooled_key_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, block: int,
                      valid: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None):
    """The inputs of one sparse attention call over `layout` and the block means of k, v:
    (q, k, v widened to the wide layout's positions, the wide layout, its key padding mask
    (B, N') or None). Shapes as in ``sparse_with_pooled_keys``; or q, k, v already at the wide
    layout's N' positions (``wide_length``; ``qkv_rope(..., n_out=N')`` writes them), rows >= N
    zero and their gradient read by nothing upstream (qkv_rope's and zero-padding's are not):
    then the pooled keys are written into k's and v's rows K0.. in place (the caller's buffers,
    no copy to widen them).

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
    elif nq == nw:  # widened at the source: the pooled keys go into the zero rows, in place
        (kw, live), (vw, _) = (_PooledIntoTail.apply(x, n, block, valid, k0) for x in (k, v))
        qw = q
    else:
        raise ValueError(f"q, k, v must have the layout's N = {n} positions or the wide layout's {nw}, got {nq}")
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
    from .patterns import LSH

    if layout is None or not compress or isinstance(layout.pattern, LSH):
        return None
    return pooled_keys_layout(layout, pooled_keys(layout.n, compress, compress_keys))[0].n


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
                            backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Sparse attention over `layout` and the block means of k, v (``compressed_attention``'s
    keys) in one softmax: the same result as ``merge_lse`` of the two branches, at the cost of
    ceil(C / block_k) more full key blocks per query block. q (B, H, N, D), k, v (B, Hk, N, D),
    or all three at the wide layout's N' positions (``pooled_key_inputs``); valid (B, N) the real
    positions (None: all), key_padding_mask (B, N) True at keys the sparse branch must not
    attend. Returns (B, H, N, D)."""
    from .backends import sparse_attention

    qw, kw, vw, wide, pad = pooled_key_inputs(q, k, v, layout, block, valid, key_padding_mask)
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
                    real: torch.Tensor | None = None, compress_keys: int = 0) -> torch.Tensor:
    """An encoder layer's attention: dense (layout None), the sparse layout, or, with `compress`
    > 0, the sparse layout and its compressed branch: the pooled keys inside the layout's softmax
    (``sparse_with_pooled_keys``), or, for LSH layouts (buckets sorted per clip, no fixed block
    lists to widen), the two branches merged by log-sum-exp. real (N,) or (B, N) bool: the
    positions that are tokens (not alignment gaps), which the block means pool together with the
    keys `key_padding_mask` (B, N) does not mask; None: all. compress_keys > 0 bounds the pooled
    keys (``pooled_block``). q, k, v have N positions, or, where ``wide_length`` is not None,
    that many (k and v then take the pooled keys in place); the output has N."""
    from .backends import sparse_attention
    from .patterns import LSH

    if layout is None or not compress:
        return sparse_attention(q, k, v, layout, backend=backend, key_padding_mask=key_padding_mask)
    b, n = q.shape[0], layout.n
    compress = pooled_block(n, compress, compress_keys)
    valid = None if real is None else real.expand(b, n)
    if key_padding_mask is not None:
        valid = ~key_padding_mask if valid is None else valid & ~key_padding_mask
    if isinstance(layout.pattern, LSH):
        out, lse = sparse_attention(q, k, v, layout, backend=backend, key_padding_mask=key_padding_mask,
                                    return_lse=True)
        out_c, lse_c = compressed_attention(q, k, v, compress, valid=valid)
        return merge_lse(out, lse, out_c, lse_c)[0]
    return sparse_with_pooled_keys(q, k, v, layout, compress, valid=valid, key_padding_mask=key_padding_mask,
                                   backend=backend)
