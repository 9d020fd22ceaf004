"""The triton backend: which of the Triton kernels (mmsparse.kernels) runs a layout, and the
plain inputs each takes, built from the BlockLayout and cached on it.

- a layout that is exactly axial attention over consecutive axes of one raster-ordered segment
  runs on the axial kernels (lines read in place: no per-block waste, no permuted copies);
- a `rest | Strided(s)` layout runs its strided keys as axial lines and the rest block-sparse,
  merged by their LSE (mmsparse.kernels.strided_attention);
- any other layout runs on the block-sparse kernels over its CSR lists.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mmsparse.kernels.axial_attention import axial_attention
from mmsparse.kernels.block_sparse import BlockLists, BlockSparseOp, block_sparse_attention, unsupported_reason
from mmsparse.kernels.block_sparse.lists import BlockCSR
from mmsparse.kernels.strided_attention import StridedSplit, strided_attention

from ..blocklayout import BlockLayout, build_layout
from ..patterns import Axial, Strided, Union

_PAIR_CHUNK = 1 << 22  # candidate (query, strided key) pairs evaluated at a time


def can_run(q, k, v, layout: BlockLayout) -> str | None:
    """Why the Triton kernels cannot run these inputs (device, dtype, head dim, block sizes),
    or None when they can: the `auto` backend logs it when it falls back."""
    return unsupported_reason(q, layout.block_q, layout.block_k)


def block_lists(layout: BlockLayout) -> BlockLists:
    """The kernels' view of `layout` (CSR lists, block sizes, mask program), cached on it."""
    cached = layout.__dict__.get("_block_lists")
    if cached is None:
        csr = {f.name: getattr(layout, f.name) for f in dataclasses.fields(BlockCSR)}
        prog = layout.program
        cached = layout.__dict__["_block_lists"] = BlockLists(
            **csr, clauses=prog.clauses, attrs=prog.attrs, tables=prog.tables)
    return cached


def axial_geometry(layout) -> tuple[int, int, int] | None:
    """(outer, L, inner) when `layout` is exactly axial attention over consecutive axes of one
    raster-ordered segment that fills the stream (no global tokens, no other segment), else None."""
    pattern, stream = getattr(layout, "pattern", None), getattr(layout, "stream", None)
    if type(pattern) is not Axial or stream is None or stream.n_global or len(stream.segments) != 1:
        return None
    seg = stream.segments[0]
    if seg.order != "raster" or seg.offset != 0 or seg.numel != layout.n:
        return None
    if pattern.modality is not None and pattern.modality != seg.modality:
        return None
    nd = len(seg.shape)
    axes = sorted({a % nd for a in ((pattern.axes,) if isinstance(pattern.axes, int) else pattern.axes)})
    if axes != list(range(axes[0], axes[-1] + 1)):
        return None  # not consecutive: the lines are not one stride apart
    shape = seg.shape
    return (math.prod(shape[: axes[0]]), math.prod(shape[axes[0]: axes[-1] + 1]), math.prod(shape[axes[-1] + 1:]))


def _overlap(program, n: int, stride: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The strided pairs (q, k), k = q mod stride + j * stride, that `program` also attends."""
    per_q = -(-n // stride)
    rows = max(1, _PAIR_CHUNK // per_q)
    j = torch.arange(per_q, device=device) * stride
    oq, ok = [], []
    for a in range(0, n, rows):
        qi = torch.arange(a, min(n, a + rows), device=device)
        ki = (qi % stride)[:, None] + j[None, :]  # (rows, per_q)
        valid = ki < n
        hit = program.evaluate(qi[:, None], ki.clamp(max=n - 1)) & valid
        r, c = hit.nonzero(as_tuple=True)
        oq.append(qi[r])
        ok.append(ki[r, c])
    return torch.cat(oq), torch.cat(ok)


def strided_split(layout) -> StridedSplit | None:
    """A StridedSplit when `layout`'s pattern is a union with one non-causal `Strided(s)` part
    (s < N) and everything else (or nothing else) as the rest; None otherwise (user layouts,
    causal strided heads, several strides: the block-sparse path runs them). Cached on the
    layout; the first call evaluates the rest's mask on the N * ceil(N / s) strided pairs."""
    cached = getattr(layout, "_strided_split", False)
    if cached is not False:
        return cached
    split = None
    pattern, stream = getattr(layout, "pattern", None), getattr(layout, "stream", None)
    parts = pattern.parts if isinstance(pattern, Union) else (pattern,)
    strided = [p for p in parts if type(p) is Strided]
    if stream is not None and strided and all(not p.causal for p in strided) \
            and len({p.stride for p in strided}) == 1 and strided[0].stride < layout.n:
        stride = strided[0].stride
        others = [p for p in parts if type(p) is not Strided]
        if not others:
            none = torch.zeros(0, dtype=torch.long, device=layout.device)
            split = StridedSplit(None, stride, none, none, layout.n)
        else:
            rest_pattern = others[0] if len(others) == 1 else Union(tuple(others))
            rest = build_layout(rest_pattern, stream, layout.block_q, layout.block_k, layout.device)
            split = StridedSplit(block_lists(rest), stride, *_overlap(rest.program, layout.n, stride, layout.device),
                                 layout.n)
    layout._strided_split = split
    return split


def block_sparse_op(layout: BlockLayout) -> BlockSparseOp:
    """The block-sparse kernels over `layout` as an op of the kernels' autograd shell (the
    flash backend's partial part, ``flash.SplitOp``)."""
    return BlockSparseOp(block_lists(layout))


def run(q, k, v, layout: BlockLayout, scale, key_padding_mask=None):
    """(out, lse) on the kernel that fits the layout (module doc)."""
    if q.device.type != "cuda":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {q.device}")
    geometry = axial_geometry(layout)
    if geometry is not None:
        return axial_attention(q, k, v, geometry, scale, key_padding_mask=key_padding_mask)
    split = strided_split(layout)
    if split is not None:
        return strided_attention(q, k, v, split, scale, key_padding_mask=key_padding_mask)
    return block_sparse_attention(q, k, v, block_lists(layout), scale, key_padding_mask=key_padding_mask)
