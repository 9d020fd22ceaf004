"""Launch helpers shared by the forward and backward launchers: scratch buffers of split rows,
launches over a work list, the tensor descriptors (TMA) of K / V or Q / dO tiles, and the
warp-specialisation switch of the loops that load through them.
"""

from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ..common import interpreting
from ..options import KernelOptions, kernel_options
from .worklist import WorkList

def scratch(like: torch.Tensor, work: WorkList, block: int, fill: float = 0.0) -> torch.Tensor:
    """float32 (B, H, (chunks + 1) * block, *rest) for the split rows' partial results; the last
    block is the padding chunk, set to `fill`."""
    t = torch.empty(*like.shape[:2], (work.n_split + 1) * block, *like.shape[3:], device=like.device,
                    dtype=torch.float32)
    t[:, :, work.n_split * block:] = fill
    return t


def launch_items(kernel, work: WorkList, tile: int, layout_block: int, bh: int, args, direct, split,
                  subs=None, **kw):
    """Launch `kernel` over the direct rows, writing the outputs `direct`, and, where rows were
    split, over their chunks, writing the scratch outputs `split`; `args(items, outputs, sub)`
    gives the kernel's positional arguments, sub the (SUB_ENTRIES, SUB_RANGES) of that launch
    from `subs` (`KernelProgram.sub_lists`; None: SKIP_EMPTY is off, dummy pointers)."""
    per_block = layout_block // tile
    for which, (items, count, outs) in enumerate(((work.direct, work.n_direct, direct),
                                                  (work.split, work.n_split, split))):
        if count:
            sub = (items, items) if subs is None else (subs[0], subs[1 + which])
            kernel[(count * per_block, bh)](*args(items, outs, sub), **kw)


def use_tma(k, v, block_n: int, d_pad: int, opts: KernelOptions | None = None) -> bool:
    """Whether the forward loads K and V through tensor descriptors (the copy engine): 16-bit
    tensors whose base and every stride but the head dim's are 16-byte aligned, on a Hopper or
    newer GPU (MMSPARSE_TRITON_TMA=auto, the default; 0 turns it off) or, with =1, the CPU under
    the interpreter (tests). 2-6 % faster forwards on the H200 (bench/NOTES.md v11, 2026-12-03)."""
    mode = (opts or kernel_options()).tma
    if mode == "0" or k.dtype not in (torch.float16, torch.bfloat16):
        return False
    if k.is_cuda and torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    if not k.is_cuda and not (interpreting() and mode == "1"):
        return False
    return descriptor_ready(k) and descriptor_ready(v)


def descriptor_ready(t: torch.Tensor) -> bool:
    """Whether a 16-bit (B, H, N, D) tensor can be read through a descriptor: its base and every
    stride but the head dim's 16-byte aligned, the head dim contiguous and at least 16 bytes."""
    return (t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:3]) and t.stride(3) == 1
            and t.shape[3] * t.element_size() >= 16)


def tma_backward(opts: KernelOptions | None = None) -> bool:
    """The backward passes take descriptors too unless KernelOptions.tma_backward is off
    (MMSPARSE_TRITON_TMA_BWD=0: an A/B switch, bench/NOTES.md, 2026-12)."""
    return (opts or kernel_options()).tma_backward


def warp_specialize(tma: bool, masked: bool, resident, opts: KernelOptions | None = None) -> bool:
    """Whether a launch marks its loop for Triton's automatic warp specialisation: only where
    Triton 3.6's Hopper pass compiles the kernel, which it does (compiled for sm_90 on the CPU)
    for one loop with dots whose operands all come by descriptor: the loop's tiles (`tma`), and
    the program's own tiles (`resident`: q for the forward, q and dO for dQ, k and v for dK / dV),
    which a marked kernel loads by descriptor too. It fails on a dot operand from a pointer load,
    on a second loop (the partial blocks'), on a partial block's mask tile and on dQ's key
    padding flags, so a `masked` launch (partial blocks or key padding) stays plain.
    KernelOptions.warp_specialize (MMSPARSE_WARP_SPECIALIZE) "1" marks the others wherever they
    run, "auto" only on the GPU (where descriptors mean a Hopper or newer card), "0" none. The
    interpreter runs a marked kernel as a plain one."""
    mode = (opts or kernel_options()).warp_specialize
    return (tma and not masked and (mode == "1" or (mode == "auto" and not interpreting()))
            and all(descriptor_ready(t) for t in resident))


def descriptor(t: torch.Tensor, block_n: int, d_pad: int):
    """A (B, H, N, D) tensor's descriptor, boxes of (1, 1, block_n, d_pad)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, d_pad])

