"""Probe: the layout block size of token-level 3D windows (A1 / A2) for the triton backend.

Blocks of 64 tokens waste fewer computed pairs on a token-level window than blocks of 128 (the
block utilization rises), at a lower per-block efficiency of the kernels. This times triton
forward and forward+backward on layouts of 128 x 128, 64 x 64, 128 x 64 and 64 x 128 blocks of
the same pattern and token order, with FlexAttention on its default 128 x 128 block mask in the
same process as the anchor. bench/NOTES.md (session 13) quotes it.

    python bench/probe_layout_block.py [A1-8x128,A2-8x128,...]     (a CUDA GPU)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention import measure  # noqa: E402
from mmsparse.attention import Local, StreamLayout, build_layout, sparse_attention  # noqa: E402

A1, A2 = (16, 32, 32), (32, 48, 48)
WORKLOADS = {
    "A1-8x128": (Local((5, 9, 9)), StreamLayout.from_grid(A1), 8, 128),
    "A1-16x64": (Local((5, 9, 9)), StreamLayout.from_grid(A1), 16, 64),
    "A2-8x128": (Local((7, 13, 13)), StreamLayout.from_grid(A2), 8, 128),
    "A2-16x64": (Local((7, 13, 13)), StreamLayout.from_grid(A2), 16, 64),
    "A2tile-8x128": (Local((7, 13, 13)), StreamLayout.from_grid(A2, order=(4, 4, 8)), 8, 128),
}
BLOCKS = ((128, 128), (64, 64), (128, 64), (64, 128))


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("probe_layout_block.py needs a CUDA GPU")
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(WORKLOADS)
    print("| workload | backend | blocks | utilization % | full | partial | fwd ms | fwd+bwd ms | vs flex |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        pattern, stream, heads, d = WORKLOADS[name]
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, stream.length, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flex_both = None
        for backend, blocks in [("flex", (128, 128))] + [("triton", b) for b in BLOCKS]:
            layout = build_layout(pattern, stream, *blocks, device="cuda")
            util = 100 * layout.attended_pairs() / layout.computed_pairs()
            fwd, both = measure(lambda q, k, v: sparse_attention(q, k, v, layout, backend=backend),
                                q, k, v, "cuda", 30)
            flex_both = both if backend == "flex" else flex_both
            print(f"| {name} | {backend} | {blocks[0]}x{blocks[1]} | {util:.1f} | {layout.num_full} | "
                  f"{layout.num_partial} | {fwd:.3f} | {both:.3f} | {flex_both / both:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
