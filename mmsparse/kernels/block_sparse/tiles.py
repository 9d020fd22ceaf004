"""Tile configurations of the block-sparse kernels: the tuned tables, the rules that pick an
entry for a layout, and the optional autotuner (`KernelOptions.autotune`).

Tiles and the layout. The layout's blocks (bq x bk, 128 x 128 by default) are the unit of
sparsity; the kernel's tiles BM x BN are powers of two that divide them, so one layout block
is processed as (bq / BM) x (bk / BN) tiles and a full block stays full in every tile. The
layout therefore need not be rebuilt for a kernel configuration.
"""

from __future__ import annotations

import logging

import torch
import triton

from ..options import KernelOptions, kernel_options

log = logging.getLogger(__name__)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim, for Hopper in
# 16-bit; BLOCK_* are upper bounds, cut to the largest power of two dividing the layout block.
# fwd / dq: BLOCK_M queries x BLOCK_N keys; dkdv: BLOCK_N keys (the program's tile) x BLOCK_M
# queries (the loop's tile). D_PAD 64 and 128: the MMSPARSE_TRITON_AUTOTUNE=1 choices of
# 2026-11-28 on an H200 (bench/NOTES.md, v2): the same on full-block (A3) and partial-block (A1)
# workloads except dq, where A1 preferred BLOCK_N = 32 by a few per cent. 16 / 32 follow 64;
# 256 is untimed (compiled without spills for sm_90 on the CPU).
CONFIGS = {
    "fwd": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3),
            128: (128, 128, 8, 3), 256: (64, 64, 8, 2)},
    "dq": {16: (64, 128, 4, 3), 32: (64, 128, 4, 3), 64: (64, 128, 4, 3),
           128: (64, 64, 4, 3), 256: (64, 32, 8, 2)},
    "dkdv": {16: (32, 64, 4, 3), 32: (32, 64, 4, 3), 64: (32, 64, 4, 3),
             128: (64, 64, 4, 3), 256: (32, 64, 8, 2)},
}
# D_PAD 16-64 fwd (128, 64, 8, 3) and dq (64, 128, 4, 3) since v7 (2026-11-28): the sweep on the E1
# captioner layer at 512 frames (bench/probe_mask_cost.py --sweep; v7 in bench/NOTES.md) timed
# them 4 % (fwd) and 5 % (whole backward) under the former (64, 128, 4, 3) and (64, 64, 4, 3).
# v1 table (first H200 run): fwd 64: (128, 128, 8, 3), 128: (128, 64, 8, 3); dq (128, 64, 8, 3|2);
# dkdv (64, 128, 8, 3|2)
# Layouts whose blocks are mostly partial (token-level windows such as A1, A2) at D_PAD 128: the
# forward on 64 x 64 tiles (the E1 captioner's heads are 64 wide: this entry does not reach it). bench/NOTES.md v9, sweep of 2026-12-02 on an
# H200 (results/logs/sweep-d128-partial-h200-2026-12-02.log): A1 8x128 0.569 -> 0.398 ms, A2
# 6.65 -> 4.85 ms, A2 in tile order 5.01 -> 3.85 ms; smaller tiles skip more empty tiles and hold
# a (64, 64) byte mask instead of (128, 128). dq and dK/dV keep their table entry (the best there).
# Full-block layouts (A3, dense) keep the larger tiles of CONFIGS.
CONFIGS_PARTIAL = {"fwd": {128: (64, 64, 4, 3)}}
PARTIAL_HEAVY = 0.5  # share of partial blocks above which CONFIGS_PARTIAL applies
# Layouts of 64 x 64 blocks (tile-aligned 14 x 14 grids, `Segment.tile_align=64`) at D_PAD <= 64:
# the table's 8-warp forward cut to 64 x 64 leaves each warp 8 rows. MMSPARSE_TRITON_AUTOTUNE=1
# on the E1 64-frame layer (batch 8, H200, 2026-12-03; results/logs/model-64f-batch8-tile-align-
# autotune-h200-2026-12-03.log) chose these on both its layouts (tiled and tiled_shifted); the
# step went from 154.7 to 143.6 ms (bench/NOTES.md v10).
# dQ on 64 x 64 tiles since v14: the autotuner chose it on A1 16x64 (H200, 2026-12-04;
# results/logs/attention-A1A2-autotune-h200-2026-12-04.log: fwd+bwd 1.78 -> 1.70 ms, A2 22.0 ->
# 20.9 ms) and on the E1 layer (123.5 against 123.4 ms, no change), and the sweep of the A5
# presets timed the whole backward 4 % (Longformer 2.19 -> 2.10 ms) and 3 % (BigBird 2.56 ->
# 2.49 ms) faster than with the former (64, 32, 4, 3) (results/logs/sweep-a5-h200-2026-12-04.log).
CONFIGS_B64 = {"fwd": (64, 64, 4, 3), "dq": (64, 64, 4, 3), "dkdv": (32, 64, 4, 3)}
# float32 inputs (three tf32 products per dot): smaller tiles; accepted, not a fast path
CONFIGS_FP32 = {
    "fwd": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 4, 1)},
    "dq": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 4, 1)},
    "dkdv": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (32, 64, 8, 2), 256: (32, 32, 4, 1)},
}
# candidates timed when MMSPARSE_TRITON_AUTOTUNE=1
CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2),
           (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2),
             (32, 128, 4, 3), (32, 128, 4, 4), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 4, 2)],
}
# Warp-specialised launches (`launch.warp_specialize`) run 4 warps: Triton 3.6's Hopper pass
# (NVGPUWarpSpecialization) leaves a kernel of any other count unspecialised; it adds a producer
# warpgroup and, where it splits the tile's rows, a second consumer group (12 warps in all). Its
# buffers are num_stages deep; where the table's stages overflow the 227 KB of shared memory,
# fewer: the forward at D_PAD 128 (128 x 128 tiles) took 246 KB at 3 stages and 180 KB at 2
# (compiled for sm_90 on the CPU). Untimed: the same-run A/B (bench/attention.py --ab) decides.
WS_NUM_WARPS = 4
WS_MAX_STAGES = {"fwd": {128: 2}}
TUNED: dict = {}
FORCED: dict = {}  # tests: kernel name -> config



def fit_tile(block: int, layout_block: int) -> int:
    """Largest power of two <= block dividing layout_block."""
    b = block
    while b > 16 and layout_block % b:
        b //= 2
    return b


def partial_heavy(layout) -> bool:
    """Whether most of the layout's listed blocks are partial (they pick other tiles)."""
    total = layout.num_full + layout.num_partial
    return total > 0 and layout.num_partial > PARTIAL_HEAVY * total


def default_config(kernel: str, d_pad: int, dtype, layout=None):
    if dtype == torch.float32:
        return CONFIGS_FP32[kernel][d_pad]
    if layout is not None and d_pad <= 64 and layout.block_q == layout.block_k == 64:
        return CONFIGS_B64[kernel]
    if layout is not None and partial_heavy(layout):
        cfg = CONFIGS_PARTIAL.get(kernel, {}).get(d_pad)
        if cfg is not None:
            return cfg
    return CONFIGS[kernel][d_pad]


def tile_config(kernel: str, d_pad: int, q, layout, opts: KernelOptions | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a test override, a tuned entry, or the table."""
    cfg = FORCED.get(kernel) or TUNED.get(autotune_key(kernel, d_pad, q, layout, opts))
    bm, bn, warps, stages = cfg or default_config(kernel, d_pad, q.dtype, layout)
    return fit_tile(bm, layout.block_q), fit_tile(bn, layout.block_k), warps, stages



def ws_config(kernel: str, d_pad: int, cfg):
    """A config for a warp-specialised launch: WS_NUM_WARPS warps, stages cut to WS_MAX_STAGES."""
    bm, bn, _, stages = cfg
    return bm, bn, WS_NUM_WARPS, min(stages, WS_MAX_STAGES.get(kernel, {}).get(d_pad, stages))


def autotune_key(kernel, d_pad, q, layout, opts: KernelOptions | None = None):
    """What a tuned entry is kept under; warp specialisation on and off tune apart."""
    return (kernel, d_pad, q.dtype, layout.block_q, layout.block_k, partial_heavy(layout), str(q.device),
            (opts or kernel_options()).warp_specialize)


def maybe_tune(kernel, d_pad, q, layout, launch, opts: KernelOptions | None = None):
    """Time the candidate configs once per key when MMSPARSE_TRITON_AUTOTUNE=1."""
    opts = opts or kernel_options()
    if not opts.autotune or q.device.type != "cuda" or FORCED.get(kernel):
        return
    key = autotune_key(kernel, d_pad, q, layout, opts)
    if key in TUNED or q.dtype == torch.float32:
        return
    best, best_ms = None, float("inf")
    default = default_config(kernel, d_pad, q.dtype, layout)
    for cand in dict.fromkeys([default] + CANDIDATES[kernel]):
        cfg = (fit_tile(cand[0], layout.block_q), fit_tile(cand[1], layout.block_k), cand[2], cand[3])
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=25)
        except Exception as err:  # out of shared memory and the like
            log.debug("autotune %s %s failed: %s", kernel, cfg, err)
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is not None:
        TUNED[key] = best
        log.info("autotune %s D_PAD=%d %s layout %dx%d: %s (%.3f ms; default %s)", kernel, d_pad,
                 str(q.dtype)[6:], layout.block_q, layout.block_k, best, best_ms, default)

