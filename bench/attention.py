"""Attention benchmark: the docs/benchmarks.md workloads, every backend side by side in one run.

    python bench/attention.py                 # GPU: all workloads; CPU: reduced, reference only
    python bench/attention.py --only A1,A3    # a subset
    python bench/attention.py --quick         # fewer repetitions
    python bench/attention.py --ab warp_specialize=0,1 --only A3,dense   # a kernel option's A/B

For each workload row: forward and forward+backward time, effective TFLOP/s (4 x attended
pairs x head_dim x heads per forward; forward+backward counts 3.5x; the dense SDPA anchor
counts its own N^2 pairs, and `effective_*` in the JSON its pattern's), the exact density, the
block density and the block utilization (attended / computed pairs), for each mmsparse
backend present (triton when the kernels import, flex on CUDA; reference on CPU) and the
anchors of docs/benchmarks.md measured in the same run (dense SDPA, its flash backend; SDPA on
the permuted batch for axial attention). Writes bench/results/attention-<device>-<date>[-<label>].json
(``--label``; a name taken already gets ``-2``, ``-3``: see bench/common.py), a markdown table
beside it, and a PNG of speedup over dense SDPA against density.

FlexAttention anchors beside mmsparse's `flex` backend (whose BlockMask comes from the layout
and whose mask_mod reads the layout's attribute tensors):

- `flex_closed`: FlexAttention's Triton backend on a BlockMask from `create_block_mask` with the
  pattern's closed-form mask_mod (bench/flex_closed.py: integer arithmetic on q_idx / kv_idx, no
  captured tensors), the fastest form of Flex a user writes; on every workload whose pattern has
  one (windows, tiles, axial, strided, global tokens, dense; not BigBird's random blocks). Its
  attended pairs are checked against the layout's before timing. The CPU runs it forward only
  (FlexAttention has no CPU backward). The `x flex_closed` column is its time over each row's
  (fwd+bwd; fwd where there is no backward): above 1, the row is faster than this anchor.
- `flex_flash`: the same BlockMask on FlexAttention's FLASH backend (FlashAttention-4, CuTe DSL;
  `kernel_options={"BACKEND": "FLASH"}`), CUDA only. Where it raises (FA4 not installed, a mask
  its template cannot compile) the row carries the error.
- `flash`: mmsparse's flash backend on the same 128 x 128 layout (`mmsparse.attention.backends.flash`:
  the full blocks on FA4's block-sparse kernels, the partial ones on the Triton kernels, merged
  by log-sum-exp), CUDA only; where it cannot run (FA4 absent, blocks its tiles do not divide)
  the row carries the reason.
- `fa4_dense`: FlashAttention-4's own dense kernel (`flash_attn.cute.flash_attn_func`) on the
  dense workloads, CUDA only; "not installed" where `flash_attn.cute` does not import. The
  result's `fa4` field names the FA4 version.

`--ab FIELD=A,B` times the triton backend alone with one kernel option (a `KernelOptions` field,
set through its environment variable) at each value instead: the values take turns for
`--rounds` rounds (their order alternating), on the same inputs, and each workload gets one row
naming both, with every round's times, B over A, the largest relative difference of B's out and
gradients from A's, and which block-sparse kernels were compiled (warps after Triton's warp
specialisation). Writes attention-<device>-<date>-ab-<field>.json and .md (or `--label`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, environment, median_ms, out_folder, result_stem, slug  # noqa: E402
from bench.flex_closed import block_mask_pairs, closed_block_mask, closed_form  # noqa: E402
from mmsparse.attention import (  # noqa: E402
    Axial, Dense, Local, StreamLayout, Tiled, bigbird, build_layout, longformer, sparse_attention,
    sparse_transformer,
)
from mmsparse.attention import blocklayout as _bl  # noqa: E402
from mmsparse.attention.backends import triton_available  # noqa: E402
from mmsparse.attention.backends import flash as flash_backend  # noqa: E402
from mmsparse.attention.backends.triton_kernels import block_lists  # noqa: E402
from mmsparse.kernels.block_sparse import block_sparse_attention  # noqa: E402
from mmsparse.kernels.options import ENVIRONMENT, KernelOptions  # noqa: E402


@dataclass
class Workload:
    id: str
    name: str
    pattern: object
    grid: tuple
    heads: int
    head_dim: int
    order: object = "raster"
    anchors: tuple = ("sdpa_dense",)
    axial_axis: int | None = None
    backward: bool = True
    extra: dict = field(default_factory=dict)
    # the triton backend's layout blocks; flex and the other backends keep 128 x 128. Token-level
    # windows run faster on 64-token blocks (utilization 21 -> 25 % on A1; results/logs/
    # probe-nvidia-h200-2026-12-03-layout-block.log, bench/NOTES.md v12, 2026-12-03)
    triton_block: int = 128

    @property
    def stream(self) -> StreamLayout:
        return StreamLayout.from_grid(self.grid, order=self.order)

    @property
    def n(self) -> int:
        return math.prod(self.grid)


# docs/benchmarks.md's A5 presets, N = 65,536 at 16 heads x 64: name -> (label, pattern); the probes
# (probe_layout_block.py, probe_profile.py preset) time the same ones
A5_N = 65536
A5_PRESETS = {
    "longformer": ("Longformer (513 + 64 global)", longformer(513, 64)),
    "bigbird": ("BigBird (513, 64 global, 3 random)", bigbird(513, 64, 3, 64)),
    "strided": ("Sparse Transformer strided 128", sparse_transformer(128)),
}


def gpu_workloads() -> list[Workload]:
    a1, a2 = (16, 32, 32), (32, 48, 48)
    w = []
    for h, d in ((16, 64), (8, 128)):
        w.append(Workload("A1", f"3D window (5,9,9) raster {h}x{d}", Local((5, 9, 9)), a1, h, d, triton_block=64))
        w.append(Workload("A2", f"3D window (7,13,13) raster {h}x{d}", Local((7, 13, 13)), a2, h, d,
                          triton_block=64))
    w.append(Workload("A2", "3D window (7,13,13) tile order 8x128", Local((7, 13, 13)), a2, 8, 128, order=(4, 4, 8),
                      triton_block=64))
    w.append(Workload("A3", "tile window r=1, N=16,384, 8x128", Tiled((4, 4, 8), 1), a1, 8, 128, order=(4, 4, 8)))
    w.append(Workload("A3", "tile window r=1, N=73,728, 16x64", Tiled((4, 4, 8), 1), a2, 16, 64, order=(4, 4, 8)))
    w.append(Workload("A3", "tile window r=1, N=73,728, 8x128", Tiled((4, 4, 8), 1), a2, 8, 128, order=(4, 4, 8)))
    for axis, name in ((0, "T"), (1, "H"), (2, "W")):
        w.append(Workload("A4", f"axial {name}, 8x128", Axial(axis), a2, 8, 128, anchors=("sdpa_axial",), axial_axis=axis))
    # A5 on 64-token blocks too: the 64 global tokens and BigBird's 64-token random blocks fill
    # whole blocks (utilization Longformer 72 -> 91 %, BigBird 50 -> 93 %; results/logs/
    # probe-nvidia-h200-2026-12-04-layout-block-a5.log, bench/NOTES.md v13, 2026-12-04)
    # A5's target scales a dense SDPA time: docs/benchmarks.md's first anchor (202.5 ms on an
    # H100, ~300 TFLOP/s) is the flash backend's speed; SDPA's default dispatch (cuDNN on Hopper)
    # is ~1.5x faster. Both run, so the target can be read against either (bench/NOTES.md
    # v14, 2026-12-04).
    for label, pattern in A5_PRESETS.values():
        w.append(Workload("A5", f"{label}, 16x64", pattern, (A5_N,), 16, 64, triton_block=64,
                          anchors=("sdpa_dense", "sdpa_flash")))
    # issue 3's dense target is SDPA's flash backend; the default dispatch (cuDNN on Hopper) and
    # FlashAttention-4 beside it
    dense_anchors = ("sdpa_dense", "sdpa_flash", "fa4_dense")
    w.append(Workload("dense", "dense N=16,384, 16x64", Dense(), a1, 16, 64, anchors=dense_anchors))
    w.append(Workload("dense", "dense N=73,728, 8x128", Dense(), a2, 8, 128, anchors=dense_anchors))
    w.append(Workload("A6", "3D window (3,9,9), N=1,048,576, 8x128", Local((3, 9, 9)), (256, 64, 64), 8, 128, anchors=()))
    return w


def cpu_workloads() -> list[Workload]:
    return [
        Workload("A1-cpu", "3D window (3,5,5) on (8,16,16), 4x32", Local((3, 5, 5)), (8, 16, 16), 4, 32),
        Workload("A3-cpu", "tile window r=1 on (8,16,16), 4x32", Tiled((4, 4, 8), 1), (8, 16, 16), 4, 32, order=(4, 4, 8)),
        Workload("A5-cpu", "Longformer (129 + 16 global), N=4,096, 4x32", longformer(129, 16), (4096,), 4, 32),
    ]


# ---------------------------------------------------------------------------------------------


def measure(make_fn, q, k, v, device, reps, backward=True):
    """(fwd ms, fwd+bwd ms) of out = make_fn(q, k, v)."""
    fwd = measure_forward(make_fn, q, k, v, device, reps)
    return fwd, measure_backward(make_fn, q, k, v, device, reps) if backward else None


def measure_forward(make_fn, q, k, v, device, reps) -> float:
    """fwd ms of make_fn(q, k, v) under no_grad."""
    with torch.no_grad():
        return median_ms(lambda: make_fn(q, k, v), device, reps)


def measure_backward(make_fn, q, k, v, device, reps) -> float:
    """fwd+bwd ms of make_fn(q, k, v).backward(dout)."""
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn_like(q)

    def step():
        for t in (qg, kg, vg):
            t.grad = None
        make_fn(qg, kg, vg).backward(dout)

    return median_ms(step, device, reps)


def describe(err: Exception) -> str:
    """The exception's type and first non-empty line, for a row's error field."""
    line = next((x.strip() for x in str(err).splitlines() if x.strip()), "")
    return f"{type(err).__name__}: {line[:200]}"


def axial_sdpa(axis: int, grid):
    """SDPA on the permuted batch: move the attended axis last, fold the others into batch."""

    def fn(q, k, v):
        b, h, n, d = q.shape
        perm = [0, 2, 3, 4]
        perm.remove(axis + 2)

        def fold(x):
            x = x.view(b * h, *grid, d)
            x = x.permute(0, *[p - 1 for p in perm[1:]], axis + 1, 4)  # (BH, others, axis, D)
            return x.reshape(-1, grid[axis], d)

        out = F.scaled_dot_product_attention(fold(q)[:, None], fold(k)[:, None], fold(v)[:, None])[:, 0]
        others = [grid[p - 2] for p in perm[1:]]
        out = out.view(b * h, *others, grid[axis], d)
        inv = [0] * 5
        order = [0] + [p - 1 for p in perm[1:]] + [axis + 1, 4]
        for i, o in enumerate(order):
            inv[o] = i
        return out.permute(*inv).reshape(b, h, n, d)

    return fn


def flash_sdpa(q, k, v):
    """SDPA restricted to its flash backend (FlashAttention-2); the backward follows the forward's
    choice, so only the forward runs inside the context. Raises where flash cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def fa4() -> tuple[object, str]:
    """(FlashAttention-4's dense attention on (B, H, N, D) tensors, its version), or (None, why
    not). FA4 takes (B, N, H, D): the transposes are views, no copy."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as err:  # absent, or installed without its CUDA / CuTe DSL libraries
        missing = isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "flash_attn"
        return None, "not installed" if missing else f"import failed: {describe(err)}"
    try:
        version = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"

    def fn(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out  # (out, lse) in 4.0 betas
        return out.transpose(1, 2)

    return fn, version


_flex_compiled: dict = {}


def flex_closed_fn(block_mask, device: str, backend: str = "TRITON"):
    """FlexAttention on `block_mask` with kernel backend `backend` ("TRITON" or "FLASH"):
    compiled on CUDA, one compiled function per backend (each with its own recompile budget,
    apart from the flex backend's); eager on the CPU (forward only there)."""
    if device != "cuda":
        return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)
    if backend not in _flex_compiled:
        options = {"BACKEND": backend}

        def run(q, k, v, block_mask):
            return flex_attention(q, k, v, block_mask=block_mask, kernel_options=options)

        _flex_compiled[backend] = torch.compile(run, dynamic=False)
    compiled = _flex_compiled[backend]
    return lambda q, k, v: compiled(q, k, v, block_mask)


def add_ratios(rows: list[dict]) -> None:
    """x_flex_closed_fwd / _fwd_bwd on every timed row of one workload: the flex_closed time over
    the row's (above 1: the row is faster than Flex with a closed-form mask_mod)."""
    anchor = next((r for r in rows if r["backend"] == "flex_closed" and "error" not in r), None)
    if anchor is None:
        return
    for r in rows:
        for key in ("fwd", "fwd_bwd"):
            if anchor.get(f"{key}_ms") and r.get(f"{key}_ms"):
                r[f"x_flex_closed_{key}"] = anchor[f"{key}_ms"] / r[f"{key}_ms"]


def prepare(wl: Workload, device: str):
    """(layout of 128 x 128 blocks, built cold and timed; its attended pairs; q, k, v; the fields
    every row of the workload shares). Inputs from seed 0, bf16 on CUDA, float32 on the CPU."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    _bl._build_cached.cache_clear()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    layout = build_layout(wl.pattern, wl.stream, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    build_ms = (time.perf_counter() - t0) * 1e3
    attended = layout.attended_pairs()
    n = layout.n
    qkv = tuple(torch.randn(1, wl.heads, n, wl.head_dim, device=device, dtype=dtype) for _ in range(3))
    base = dict(
        id=wl.id, workload=wl.name, n=n, heads=wl.heads, head_dim=wl.head_dim,
        order="raster" if wl.order == "raster" else "tile" + "x".join(map(str, wl.order)),
        density=attended / n / n, layout_build_ms=build_ms,
    )
    return layout, attended, qkv, base


def block_fields(lay, attended: int) -> dict:
    """The block statistics of the layout a row ran on."""
    return dict(blocks=f"{lay.block_q}x{lay.block_k}", block_density=lay.block_density,
                utilization=attended / lay.computed_pairs(), full_blocks=lay.num_full, partial_blocks=lay.num_partial)


def triton_layout(wl: Workload, layout, device: str):
    """The triton backend's layout: `layout`, or the workload's on blocks of wl.triton_block."""
    if wl.triton_block == layout.block_q:
        return layout
    return build_layout(wl.pattern, wl.stream, wl.triton_block, wl.triton_block, device=device)


def run_workload(wl: Workload, device: str, backends: list[str], reps: int) -> list[dict]:
    layout, attended, (q, k, v), base = prepare(wl, device)
    n = layout.n
    stream = wl.stream
    fwd_flops = 4 * attended * wl.head_dim * wl.heads
    own = {b: layout for b in backends}
    if "triton" in own:
        own["triton"] = triton_layout(wl, layout, device)
    rows = []
    # (name, fn, its own row fields or None, fwd+bwd too, why it cannot run or None)
    candidates = [(b, lambda q, k, v, b=b: sparse_attention(q, k, v, own[b], backend=b), None, wl.backward,
                   flash_backend.can_run(q, k, v, own[b]) if b == "flash" else None)
                  for b in backends]
    candidates += closed_flex_candidates(wl, stream, layout, attended, device)
    for a in wl.anchors:
        if a == "sdpa_dense":
            candidates.append((a, lambda q, k, v: F.scaled_dot_product_attention(q, k, v), None, wl.backward, None))
        elif a == "sdpa_flash":
            candidates.append((a, flash_sdpa, None, wl.backward, None))
        elif a == "sdpa_axial":
            candidates.append((a, axial_sdpa(wl.axial_axis, wl.grid), None, wl.backward, None))
        elif a == "fa4_dense" and device == "cuda":
            fn, why = fa4()
            candidates.append((a, fn, None, wl.backward, None if fn else why))
    for name, fn, fields, backward, error in candidates:
        row = dict(base, backend=name, **(fields or block_fields(own.get(name, layout), attended)))
        flops = 4 * n * n * wl.head_dim * wl.heads if name in DENSE_ANCHORS else fwd_flops
        # a backend that cannot run a workload is reported, not fatal: a forward that fails makes
        # the row an error; a backward that fails keeps the forward time beside `bwd_error`
        try:
            if error:
                raise RuntimeError(error)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fwd = measure_forward(fn, q, k, v, device, reps)
            both = None
            if backward:
                try:
                    both = measure_backward(fn, q, k, v, device, reps)
                except Exception as err:
                    row["bwd_error"] = describe(err)
            row.update(fwd_ms=fwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                       fwd_bwd_tflops=(3.5 * flops / both / 1e9) if both else None,
                       effective_fwd_bwd_tflops=(3.5 * fwd_flops / both / 1e9) if both else None)
            if device == "cuda":
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as err:
            row["error"] = error or describe(err)
        rows.append(row)
        print(f"# {wl.id} {wl.name}: {name} measured", file=sys.stderr, flush=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)  # needs the workload's flex_closed time: the rows print once all ran
    for row in rows:
        print(format_row(row), flush=True)
    return rows


DENSE_ANCHORS = ("sdpa_dense", "sdpa_flash", "fa4_dense")  # rows that compute all N^2 pairs


def closed_flex_candidates(wl: Workload, stream, layout, attended: int, device: str) -> list[tuple]:
    """The flex_closed (and, on CUDA, flex_flash) candidates of a workload whose pattern has a
    closed-form mask_mod; none where it has not. Their row fields carry the BlockMask's own
    block statistics and build time; a BlockMask that does not attend the layout's pairs, or
    fails to build, makes both rows errors."""
    mask_mod = closed_form(wl.pattern, stream)
    if mask_mod is None:
        return []
    names = ["flex_closed"] + (["flex_flash"] if device == "cuda" else [])
    fields, error, block_mask = {}, None, None
    try:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = closed_block_mask(wl.pattern, stream, block=128, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        build_ms = (time.perf_counter() - t0) * 1e3
        got, computed = block_mask_pairs(block_mask, mask_mod, layout.n)
        if got != attended:
            error = f"closed-form mask_mod attends {got} pairs, the layout {attended}"
        partial = int(block_mask.kv_num_blocks[0, 0].sum())
        full = int(block_mask.full_kv_num_blocks[0, 0].sum()) if block_mask.full_kv_num_blocks is not None else 0
        mq, mk = block_mask.kv_indices.shape[-2:]
        fields = dict(blocks="128x128", block_density=(partial + full) / (mq * mk), utilization=attended / computed,
                      full_blocks=full, partial_blocks=partial, block_mask_build_ms=build_ms)
    except Exception as err:
        error = f"closed-form BlockMask: {describe(err)}"
    if error:
        fields = dict(blocks="128x128", block_density=None, utilization=None, full_blocks=None, partial_blocks=None)
    backward = wl.backward and device == "cuda"  # FlexAttention has no CPU backward
    return [(name, None if error else flex_closed_fn(block_mask, device, "FLASH" if name == "flex_flash" else "TRITON"),
             fields, backward, error) for name in names]


# ---------------------------------------------------------------------------------------------
# --ab: the triton backend under one kernel option at two or more values, in the same run


def parse_ab(text: str) -> tuple[str, str, tuple[str, ...]]:
    """`FIELD=A,B[,...]` -> (field, its environment variable, the values): a KernelOptions field
    that has a variable (mmsparse.kernels.options.ENVIRONMENT), each value one the field takes."""
    name, _, values = text.partition("=")
    arms = tuple(v.strip() for v in values.split(",") if v.strip())
    if name not in ENVIRONMENT:
        raise ValueError(f"--ab {text!r}: {name!r} is not a kernel option with an environment variable "
                         f"({', '.join(ENVIRONMENT)})")
    if len(arms) < 2 or len(set(arms)) < len(arms):
        raise ValueError(f"--ab {text!r}: give two or more different values, e.g. {name}=0,1")
    var, parse = ENVIRONMENT[name]
    for value in arms:
        try:
            dataclasses.replace(KernelOptions(), **{name: parse(value)})
        except ValueError as err:
            raise ValueError(f"--ab {text!r}: {err}") from err
    return name, var, arms


@contextlib.contextmanager
def variable_set(var: str, value: str):
    """The environment variable `var` set to `value` inside the block (it wins over the program's
    kernel options), then as it was."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def gradients(fn, q, k, v, dout) -> list[torch.Tensor]:
    """out, dq, dk, dv of fn(q, k, v) under the output gradient dout."""
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(qg, kg, vg)
    out.backward(dout)
    return [out.detach(), qg.grad, kg.grad, vg.grad]


def rel_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The largest max |got - ref| / max |ref| over the tensors (inf where one is not finite)."""
    worst = 0.0
    for a, b in zip(got, ref):
        d = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        worst = max(worst, d if math.isfinite(d) else math.inf)
    return worst


def compiled_kernels() -> dict[str, dict]:
    """The block-sparse kernels compiled so far in this process, by hash (none under the
    interpreter): name, warps after Triton's warp specialisation, whether it specialised (a
    ttg.warp_specialize region in its TTGIR), registers and spilled bytes once launched."""
    from mmsparse.kernels.block_sparse import backward, forward

    found = {}
    for fn in (forward._fwd_kernel, backward._bwd_dq_kernel, backward._bwd_dkdv_kernel):
        for caches in getattr(fn, "device_caches", {}).values():
            for kern in caches[0].values():
                found[kern.hash] = dict(kernel=kern.name, num_warps=kern.metadata.num_warps,
                                        warp_specialized="ttg.warp_specialize" in kern.asm.get("ttgir", ""),
                                        n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None))
    return found


def run_ab(wl: Workload, device: str, name: str, var: str, arms: tuple[str, ...], reps: int, rounds: int) -> dict:
    """One row: the triton backend on `wl` with kernel option `name` (variable `var`) at each of
    `arms`. First each arm's out and gradients on the same inputs and output gradient (the
    kernels it compiled for this row kept in `kernels`; `max_rel_diff` from the first arm's),
    then `rounds` rounds of fwd and fwd+bwd timings, the arms in turn, their order alternating.
    Per arm: every round's ms, the medians and their ratio to the first arm's."""
    layout, attended, (q, k, v), base = prepare(wl, device)
    lay = triton_layout(wl, layout, device)
    row = dict(base, backend="triton", ab=name, **block_fields(lay, attended))
    per = {a: dict(fwd_ms=[], fwd_bwd_ms=[]) for a in arms}

    def fn(q, k, v):  # on the CPU (TRITON_INTERPRET=1) the block-sparse kernels, past the backend's CUDA check
        if device == "cuda":
            return sparse_attention(q, k, v, lay, backend="triton")
        return block_sparse_attention(q, k, v, block_lists(lay))[0]

    try:
        dout, ref = torch.randn_like(q), None
        for a in arms:
            with variable_set(var, a):
                before = compiled_kernels()
                got = gradients(fn, q, k, v, dout)
                per[a]["kernels"] = [info for h, info in compiled_kernels().items() if h not in before]
            ref = ref or got
            per[a]["max_rel_diff"] = rel_diff(got, ref)
        del ref, got
        for r in range(rounds):
            for a in arms if r % 2 == 0 else arms[::-1]:
                with variable_set(var, a):
                    per[a]["fwd_ms"].append(measure_forward(fn, q, k, v, device, reps))
                    if wl.backward:
                        per[a]["fwd_bwd_ms"].append(measure_backward(fn, q, k, v, device, reps))
                print(f"# {wl.id} {wl.name}: {name}={a} round {r + 1}", file=sys.stderr, flush=True)
    except Exception as err:
        row["error"] = describe(err)
    for key in ("fwd_ms", "fwd_bwd_ms"):
        first = statistics.median(per[arms[0]][key]) if per[arms[0]][key] else None
        for a in arms:
            med = statistics.median(per[a][key]) if per[a][key] else None
            per[a][f"{key}_median"] = med
            per[a][f"{key}_ratio"] = med / first if med and first else None
    row["arms"] = per
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def ab_header(name: str, arms: tuple[str, ...]) -> str:
    values = " / ".join(arms)
    ratios = " / ".join(f"{a} over {arms[0]}" for a in arms[1:])
    return (f"| id | workload | order | blocks | fwd ms, {name} = {values} | fwd {ratios} | fwd+bwd ms, {name} = "
            f"{values} | fwd+bwd {ratios} | max rel diff | compiled (warps; ws: warp-specialised) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")


def format_ab_row(r: dict, arms: tuple[str, ...]) -> str:
    """A row of the A/B table: medians with each arm's range over the rounds, the ratios to the
    first arm, the largest relative difference from it, the kernels each arm compiled."""
    lead = f"| {r['id']} | {r['workload']} | {r['order']} | {r['blocks']} |"
    if "error" in r:
        return f"{lead} error: {r['error']} |"
    per = r["arms"]

    def times(key):
        return " / ".join(f"{statistics.median(per[a][key]):.3f} ({min(per[a][key]):.3f}-{max(per[a][key]):.3f})"
                          if per[a][key] else "-" for a in arms)

    def ratios(key):
        return " / ".join(f"{per[a][f'{key}_ratio']:.3f}" if per[a][f"{key}_ratio"] else "-" for a in arms[1:])

    diff = " / ".join(f"{per[a]['max_rel_diff']:.1e}" for a in arms[1:])
    compiled = "; ".join(f"{a}: " + ", ".join(
        f"{kern['kernel'].strip('_').removesuffix('_kernel')} {kern['num_warps']}"
        + (" ws" if kern["warp_specialized"] else "") for kern in per[a]["kernels"]) for a in arms if per[a]["kernels"])
    return (f"{lead} {times('fwd_ms')} | {ratios('fwd_ms')} | {times('fwd_bwd_ms')} | {ratios('fwd_bwd_ms')} | "
            f"{diff} | {compiled or '-'} |")


def _prewarm_one(index: int) -> str:
    """Compile the triton kernels of gpu_workloads()[index] (same shapes, so the same Triton
    specialisation and on-disk cache entries as the timed run) by one forward+backward."""
    wl = gpu_workloads()[index]
    t0 = time.perf_counter()
    try:
        layout = build_layout(wl.pattern, wl.stream, wl.triton_block, wl.triton_block, device="cuda")
        q, k, v = (torch.randn(1, wl.heads, wl.n, wl.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        sparse_attention(q, k, v, layout, backend="triton").backward(torch.randn_like(q))
        torch.cuda.synchronize()
        return f"{wl.id} {wl.name}: {time.perf_counter() - t0:.1f} s"
    except Exception as err:  # reported by the timed run itself
        return f"{wl.id} {wl.name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def prewarm(workloads: list[Workload], jobs: int):
    """Compile the triton kernels of all workloads in `jobs` parallel processes first: Triton
    compiles one kernel at a time per process, and its disk cache serves the timed run."""
    import multiprocessing as mp

    everything = gpu_workloads()
    index = [i for i, w in enumerate(everything) if any(w == x for x in workloads)]
    index.sort(key=lambda i: -everything[i].n)  # the largest first
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs) as pool:
        for line in pool.imap_unordered(_prewarm_one, index):
            print(f"# prewarm {line}", flush=True)
    print(f"# prewarm: {len(index)} workloads in {time.perf_counter() - t0:.1f} s", flush=True)


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['id']} | {r['workload']} | {r['order']} | {r['backend']} | error: {r['error']} |"
    fb = f"{r['fwd_bwd_ms']:.2f}" if r.get("fwd_bwd_ms") else f"error: {r['bwd_error']}" if "bwd_error" in r else "-"
    fbt = f"{r['fwd_bwd_tflops']:.1f}" if r.get("fwd_bwd_tflops") else "-"
    if "x_flex_closed_fwd_bwd" in r:
        ratio = f"{r['x_flex_closed_fwd_bwd']:.2f}"
    elif "x_flex_closed_fwd" in r:
        ratio = f"{r['x_flex_closed_fwd']:.2f} (fwd)"
    else:
        ratio = "-"
    return (
        f"| {r['id']} | {r['workload']} | {r['order']} | {r['backend']} | {r['fwd_ms']:.3f} | {fb} | "
        f"{r['fwd_tflops']:.1f} | {fbt} | {ratio} | {100 * r['density']:.3f} | {r.get('blocks', '128x128')} | "
        f"{100 * r['block_density']:.2f} | "
        f"{100 * r['utilization']:.1f} | {r['layout_build_ms']:.1f} |"
    )


HEADER = (
    "| id | workload | order | backend | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | x flex_closed | "
    "density % | blocks | block density % | utilization % | layout build ms |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def plot(rows: list[dict], path: Path, device_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = {(r["n"], r["heads"], r["head_dim"]): r["fwd_bwd_ms"] for r in rows
             if r["backend"] == "sdpa_dense" and r.get("fwd_bwd_ms")}
    fig, ax = plt.subplots(figsize=(7, 5))
    for backend, marker in (("triton", "o"), ("flex", "s"), ("flex_closed", "D"), ("flex_flash", "v"),
                            ("reference", "^")):
        pts = [(r["density"], dense[(r["n"], r["heads"], r["head_dim"])] / r["fwd_bwd_ms"]) for r in rows
               if r["backend"] == backend and r.get("fwd_bwd_ms") and (r["n"], r["heads"], r["head_dim"]) in dense]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=backend)
    xs = [10 ** (e / 10) for e in range(-25, 1)]
    ax.plot(xs, [1 / x for x in xs], "k--", linewidth=0.8, label="ideal (1 / density)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("attention density (attended pairs / N^2)")
    ax.set_ylabel("fwd+bwd speedup over dense SDPA (same N, heads)")
    ax.set_title(f"mmsparse attention, {device_name}", fontsize=9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated workload ids (A1,...,A6,dense)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    p.add_argument("--label", default="", help="the result name's label: attention-<device>-<date>-<label>")
    p.add_argument("--prewarm", type=int, default=0, metavar="JOBS",
                   help="compile the triton kernels of the selected workloads in JOBS processes first")
    p.add_argument("--ab", default="", metavar="FIELD=A,B",
                   help="instead: the triton backend alone under a kernel option at each value, e.g. "
                        "warp_specialize=0,1 (a KernelOptions field with an environment variable)")
    p.add_argument("--rounds", type=int, default=3, help="--ab: rounds of the values in turn (default 3)")
    args = p.parse_args(argv)
    try:
        out = out_folder(args.out)
        ab = parse_ab(args.ab) if args.ab else None
    except ValueError as err:
        p.error(str(err))
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # flex is compiled once per workload and grad mode: more graphs than dynamo's default 8,
    # past which it silently falls back to an eager flex that materialises N x N scores (the
    # flex_closed / flex_flash rows compile their own functions, each with this budget)
    torch._dynamo.config.recompile_limit = 64
    logging.basicConfig(level=logging.WARNING, format="# %(name)s: %(message)s")
    logging.getLogger("mmsparse.kernels").setLevel(logging.INFO)  # autotune choices
    if device == "cuda":
        # flash: the full blocks on FA4, the partial ones on triton (a row with its reason where
        # FA4 is absent or the layout's blocks do not fit its tiles)
        backends = (["triton", "flash"] if triton_available() else []) + ["flex"]
        workloads = gpu_workloads()
    else:
        backends = ["reference"]
        workloads = cpu_workloads()
    env = environment(device)
    env["fa4"] = fa4()[1] if device == "cuda" else "not on the CPU"
    device_name = env["device"]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only:
        workloads = [w for w in workloads if w.id in only or w.id.split("-")[0] in only]
    reps = 10 if args.quick else 40
    if ab:
        return main_ab(ab, workloads, device, env, reps, args.rounds, out, args.label)
    if args.prewarm and "triton" in backends:
        prewarm(workloads, args.prewarm)
    print(f"# mmsparse attention benchmark on {device_name}, torch {env['torch']}, "
          f"triton {env['triton']}, FA4 {env['fa4']}, backends {backends}\n\n{HEADER}", flush=True)
    rows = []
    for wl in workloads:
        rows += run_workload(wl, device, backends, reps)
    # the layout compiler on its own: A2 cold, on this device (and the CPU target)
    build = {}
    for dev in {device, "cpu"}:
        _bl._build_cached.cache_clear()
        t0 = time.perf_counter()
        build_layout(Local((7, 13, 13)), (32, 48, 48), device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        build[dev] = (time.perf_counter() - t0) * 1e3
    print("\nA2 layout build, cold: " + ", ".join(f"{d} {ms:.1f} ms" for d, ms in build.items()))

    date = env["date"]
    stem = result_stem(out, "attention", slug(device_name), args.label, date, suffixes=(".json", ".md", ".png"))
    result = dict(
        env, backends=backends, dtype="bfloat16" if device == "cuda" else "float32",
        a2_layout_build_ms=build, rows=rows,
    )
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    Path(f"{stem}.md").write_text(
        f"# Attention benchmark: {device_name}\n\ntorch {env['torch']}, triton {env['triton']}, "
        f"FA4 {env['fa4']}, {date}, "
        f"commit {env['git_commit']}\n\n"
        + HEADER + "\n" + "\n".join(format_row(r) for r in rows)
        + "\n\nA2 layout build, cold: " + ", ".join(f"{d} {ms:.1f} ms" for d, ms in build.items()) + "\n"
    )
    plot(rows, Path(f"{stem}.png"), device_name)
    print(f"\nwrote {stem}.json, .md, .png")
    return 0


def main_ab(ab: tuple, workloads: list[Workload], device: str, env: dict, reps: int, rounds: int, out: Path,
            label: str) -> int:
    """--ab: one row a workload (run_ab), the table printed last, JSON and markdown beside it."""
    name, var, arms = ab
    print(f"# mmsparse attention A/B of {name} ({var} = {', '.join(arms)}) on {env['device']}, torch "
          f"{env['torch']}, triton {env['triton']}, {rounds} rounds", flush=True)
    rows = [run_ab(wl, device, name, var, arms, reps, rounds) for wl in workloads]
    compiled = list(compiled_kernels().values())
    table = ab_header(name, arms) + "\n" + "\n".join(format_ab_row(r, arms) for r in rows)
    print("\n" + table, flush=True)
    stem = result_stem(out, "attention", slug(env["device"]), label or f"ab-{name}", env["date"],
                       suffixes=(".json", ".md"))
    Path(f"{stem}.json").write_text(json.dumps(dict(env, ab=name, variable=var, arms=arms, rounds=rounds,
                                                    dtype="bfloat16" if device == "cuda" else "float32",
                                                    rows=rows, compiled=compiled), indent=1))
    Path(f"{stem}.md").write_text(
        f"# Attention A/B of {name}: {env['device']}\n\ntorch {env['torch']}, triton {env['triton']}, {env['date']}, "
        f"commit {env['git_commit']}; {var} = {', '.join(arms)}, {rounds} rounds in turn (order alternating); "
        f"the triton backend alone\n\n{table}\n")
    print(f"\nwrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
