"""Probe: the layout block size of token-level windows (A1 / A2, and the A5 presets) for the
triton backend.

Blocks of 64 tokens waste fewer computed pairs on a token-level window than blocks of 128 (the
block utilization rises), at a lower per-block efficiency of the kernels. This times triton
forward and forward+backward on layouts of 128 x 128, 64 x 64, 128 x 64 and 64 x 128 blocks of
the same pattern and token order, with an anchor in the same process: FlexAttention on its
default 128 x 128 block mask for A1 / A2 (`vs anchor`: flex time / triton time), dense SDPA for
the A5 presets, whose target (docs/benchmarks.md) is 1.25 x dense SDPA time x true density
(`vs anchor`: that target / triton time; 1.00x meets it). bench/NOTES.md (v12, v13)
quotes it.

    python bench/probe_layout_block.py [A1-8x128,A5-longformer,...]     (a CUDA GPU)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

from bench.attention import A5_N, A5_PRESETS, measure  # noqa: E402
from mmsparse.attention import Local, StreamLayout, build_layout, sparse_attention  # noqa: E402

A1, A2 = (16, 32, 32), (32, 48, 48)
WORKLOADS = {
    "A1-8x128": (Local((5, 9, 9)), StreamLayout.from_grid(A1), 8, 128),
    "A1-16x64": (Local((5, 9, 9)), StreamLayout.from_grid(A1), 16, 64),
    "A2-8x128": (Local((7, 13, 13)), StreamLayout.from_grid(A2), 8, 128),
    "A2-16x64": (Local((7, 13, 13)), StreamLayout.from_grid(A2), 16, 64),
    "A2tile-8x128": (Local((7, 13, 13)), StreamLayout.from_grid(A2, order=(4, 4, 8)), 8, 128),
    # A5 (N = 65,536, 16 x 64): the anchor is dense SDPA, the target 1.25 x its time x density
    **{f"A5-{name}": (pattern, StreamLayout.from_grid((A5_N,)), 16, 64) for name, (_, pattern) in A5_PRESETS.items()},
}
BLOCKS = ((128, 128), (64, 64), (128, 64), (64, 128))


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("probe_layout_block.py needs a CUDA GPU")
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(WORKLOADS)
    print("| workload | backend | blocks | utilization % | full | partial | fwd ms | fwd+bwd ms | vs anchor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        pattern, stream, heads, d = WORKLOADS[name]
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, stream.length, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if name.startswith("A5"):
            density = build_layout(pattern, stream, device="cuda").attended_pairs() / stream.length**2
            fwd, both = measure(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, "cuda", 5)
            anchor = 1.25 * both * density  # the A5 target, ms
            print(f"| {name} | sdpa_dense | - | - | - | - | {fwd:.3f} | {both:.3f} | target {anchor:.3f} ms |",
                  flush=True)
            runs = [("triton", b) for b in BLOCKS]
        else:
            anchor = None
            runs = [("flex", (128, 128))] + [("triton", b) for b in BLOCKS]
        for backend, blocks in runs:
            layout = build_layout(pattern, stream, *blocks, device="cuda")
            util = 100 * layout.attended_pairs() / layout.computed_pairs()
            fwd, both = measure(lambda q, k, v: sparse_attention(q, k, v, layout, backend=backend),
                                q, k, v, "cuda", 30)
            anchor = both if anchor is None else anchor  # flex, the first run of A1 / A2
            print(f"| {name} | {backend} | {blocks[0]}x{blocks[1]} | {util:.1f} | {layout.num_full} | "
                  f"{layout.num_partial} | {fwd:.3f} | {both:.3f} | {anchor / both:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
