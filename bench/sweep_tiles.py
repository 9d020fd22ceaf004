"""Tile-config sweep of the block-sparse kernels, and a quick check of them against the dense
reference (interpreter on a CPU; on a GPU also a timing).

    python bench/sweep_tiles.py                       # check (and time, on a GPU)
    python bench/sweep_tiles.py --sweep A1-16x64,A5-longformer --kernels dq,dkdv

`sweep` times every candidate of `mmsparse.kernels.block_sparse.tiles.CANDIDATES` (or a given
pool) per kernel on one workload; bench/probe_mask_cost.py reuses it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton and the kernels are decorated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from mmsparse.attention import (  # noqa: E402
    Local, Segment, StreamLayout, Tiled, bigbird, build_layout, longformer,
)
from mmsparse.attention.backends.triton_kernels import block_lists  # noqa: E402
from mmsparse.kernels.block_sparse import block_sparse_attention, block_sparse_attention_ref  # noqa: E402
from mmsparse.kernels.block_sparse.backward import attention_backward  # noqa: E402
from mmsparse.kernels.block_sparse.forward import attention_forward  # noqa: E402
from mmsparse.kernels.block_sparse.tiles import CANDIDATES, FORCED, default_config  # noqa: E402

log = logging.getLogger(__name__)


def sweep(pattern, tokens, heads: int, head_dim: int, kernels=("fwd", "dq", "dkdv"), layout=None,
          candidates=None):
    """Time every candidate tile config of each kernel on one workload (CUDA, bf16): `pattern`
    over `tokens`, or a ready `layout` (then pattern and tokens are unused); `candidates` (kernel
    -> configs) replaces CANDIDATES for the kernels it names.

    Returns rows (kernel, config, ms): forward alone for "fwd", the whole backward with the
    other backward kernel at its default for "dq" / "dkdv"."""
    if layout is None:
        layout = build_layout(pattern, tokens, device="cuda")
    n, d_pad = layout.n, max(16, triton.next_power_of_2(head_dim))
    q, k, v, dout = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = head_dim**-0.5
    lists = block_lists(layout)
    out, lse = attention_forward(q, k, v, lists, scale)
    rows = []
    for kernel in kernels:
        pool = (candidates or {}).get(kernel, CANDIDATES[kernel])
        for cand in dict.fromkeys([default_config(kernel, d_pad, q.dtype, lists)] + list(pool)):
            FORCED[kernel] = cand
            try:
                if kernel == "fwd":
                    fn = lambda: attention_forward(q, k, v, lists, scale)
                else:
                    fn = lambda: attention_backward(q, k, v, out, lse, dout, lists, scale)
                ms = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
            except Exception as err:  # out of resources and the like
                ms = float("nan")
                log.warning("sweep %s %s: %s", kernel, cand, str(err).splitlines()[0][:120])
            finally:
                FORCED.pop(kernel, None)
            rows.append((kernel, cand, ms))
            print(f"{kernel:5s} {str(cand):20s} {ms:8.3f} ms", flush=True)
    return rows


def main():  # python bench/sweep_tiles.py [--sweep [NAMES]] [--kernels dq,dkdv]
    """Compare with the reference on a small 3D window (interpreter on a CPU); on a GPU, time it,
    and with --sweep time the tile candidates on a tile-aligned and a token-level window."""
    cuda = torch.cuda.is_available()
    if cuda and "--sweep" in sys.argv:  # --sweep [NAME,NAME...] [--kernels dq,dkdv]: a subset
        a3 = StreamLayout.from_grid((16, 32, 32), order=(4, 4, 8))
        a2_tiles = StreamLayout.from_grid((32, 48, 48), order=(4, 4, 8))
        workloads = {
            "A3-8x128": (Tiled((4, 4, 8), 1), a3, 8, 128),
            "A3-16x64": (Tiled((4, 4, 8), 1), a3, 16, 64),
            "A1-16x64": (Local((5, 9, 9)), (16, 32, 32), 16, 64),
            "A1-8x128": (Local((5, 9, 9)), (16, 32, 32), 8, 128),
            "A2-8x128": (Local((7, 13, 13)), (32, 48, 48), 8, 128),
            "A2tile-8x128": (Local((7, 13, 13)), a2_tiles, 8, 128),
            # BENCHMARKS.md's A5 presets on 64-token blocks, as bench/attention.py runs them
            "A5-longformer": (longformer(513, 64), (65536,), 16, 64, 64),
            "A5-bigbird": (bigbird(513, 64, 3, 64), (65536,), 16, 64, 64),
        }
        at = sys.argv.index("--sweep") + 1
        given = at < len(sys.argv) and not sys.argv[at].startswith("--")
        names = sys.argv[at].split(",") if given else ["A3-8x128", "A3-16x64", "A1-16x64", "A1-8x128"]
        kernels = ("fwd", "dq", "dkdv")
        if "--kernels" in sys.argv:
            kernels = tuple(sys.argv[sys.argv.index("--kernels") + 1].split(","))
            if not set(kernels) <= set(CANDIDATES):
                raise SystemExit(f"--kernels: expected names among {', '.join(CANDIDATES)}, got {kernels}")
        for name in names:
            if name not in workloads:
                raise SystemExit(f"--sweep: unknown workload {name!r}; known: {', '.join(workloads)}")
            pattern, tokens, h, d, *block = workloads[name]
            layout = build_layout(pattern, tokens, *block, *block, device="cuda") if block else None
            print(f"# sweep {name}", flush=True)
            sweep(pattern, tokens, h, d, kernels, layout=layout)
        return
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float16
    grid = (8, 16, 16) if cuda else (3, 5, 7)
    stream = StreamLayout((Segment("video", grid, order=(2, 4, 4) if cuda else "raster"),))
    blk = 128 if cuda else 32
    layout = build_layout(Local((3, 5, 5) if cuda else (3, 3, 3)), stream, blk, blk, dev)
    print(layout.summary())
    n = layout.n
    q, k, v = (torch.randn(1, 4, n, 64, device=dev, dtype=dtype) for _ in range(3))
    lists = block_lists(layout)
    out, lse = block_sparse_attention(q, k, v, lists)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, layout.dense_mask())
    print(f"max |out - ref| = {(out.float() - ref.float()).abs().max():.3e}, "
          f"max |lse - ref| = {(lse - ref_lse).abs().max():.3e}")
    if cuda:
        ms = triton.testing.do_bench(lambda: block_sparse_attention(q, k, v, lists), return_mode="median")
        flops = 4 * layout.attended_pairs() * 64 * 4
        print(f"forward {ms:.3f} ms, {flops / ms * 1e-9:.1f} effective TFLOP/s")


if __name__ == "__main__":
    main()
