"""Probe: where the time goes, as torch.profiler tables (a CUDA GPU).

    python bench/probe_profile.py strided            # A5 Sparse Transformer strided 128, 16x64
    python bench/probe_profile.py model --frames 64  # E1 captioner_base sparse training step
    python bench/probe_profile.py rope               # fused QKV split + rotary against PyTorch
    python bench/probe_profile.py preset longformer  # an A5 preset: issued vs CUDA-graph replay
    python bench/probe_profile.py preset longformer --host  # ... and where its host time goes

`strided` times the two parts of `mmsparse/kernels/strided_attention.py` (block-sparse rest, axial
lines) and the merge separately, then the whole autograd op, then prints the CUDA and CPU
profile of three forward+backward steps. `model` runs bench/model.py's training step and
prints the same two tables for three steps after warm-up, with the step's wall time beside the
sum of its CUDA kernel times (a wall time far above the kernel sum means the step waits on the
host); `model --host` then says which Python functions the host spends that time in (cProfile).
`preset` times an A5 preset's forward and forward+backward on the triton backend as issued and as
replayed from a CUDA graph (no host work at all), so a gap between the two is time the op waits
on the host, then prints the profile tables. bench/NOTES.md quotes the outputs (results/logs/probe-profile-*.log).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = 40
# the attention kernels of a step: ours (mmsparse/kernels/*.py), SDPA's flash / cuDNN / memory-efficient,
# FlexAttention's generated ones
ATTENTION_KERNELS = re.compile(r"fwd_kernel|bwd_dq_kernel|bwd_dkdv_kernel|bwd_preprocess|mask_tiles_kernel|"
                               r"axial|strided|flash|fmha|cudnn|sdpa|attention|flex", re.IGNORECASE)


def _tables(prof, title: str) -> None:
    ka = prof.key_averages()
    print(f"\n## {title}: by CUDA time\n")
    print(ka.table(sort_by="cuda_time_total", row_limit=ROWS, max_name_column_width=70))
    print(f"\n## {title}: by CPU time (self)\n")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=ROWS, max_name_column_width=70))


def _profile(fn, steps: int = 3):
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    # kernel events only: a CPU op's self device time repeats its kernels' time (and the custom
    # autograd nodes carry their kernels' whole time), so a sum over every event double counts
    kernels = sum(e.self_device_time_total for e in prof.key_averages()
                  if e.device_type == DeviceType.CUDA) / steps / 1e3
    print(f"\nprofiled step: wall {wall:.2f} ms, CUDA kernel time {kernels:.2f} ms (sum over kernels)")
    attn = sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and ATTENTION_KERNELS.search(e.key)) / steps / 1e3
    print(f"attention kernels {attn:.2f} ms, everything else {kernels - attn:.2f} ms "
          f"(kernel names matching {ATTENTION_KERNELS.pattern!r})")
    return prof


def strided(args) -> None:
    import triton.testing as tt

    from mmsparse.attention import build_layout, sparse_transformer
    from mmsparse.attention.backends.triton_kernels import strided_split
    from mmsparse.kernels import axial_attention as ax
    from mmsparse.kernels import strided_attention as st
    from mmsparse.kernels.block_sparse.backward import attention_backward
    from mmsparse.kernels.block_sparse.forward import attention_forward

    n, h, d = args.n, 16, 64
    lay = build_layout(sparse_transformer(args.stride), (n,), device="cuda")
    split = strided_split(lay)
    print(f"N {n}, stride {args.stride}, rest {'yes' if split.rest is not None else None}, "
          f"rest blocks full {split.rest.num_full} partial {split.rest.num_partial}, overlap pairs {split.oq.numel()}")
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    scale = d ** -0.5
    n_pad, geometry = st.line_grid(n, args.stride)
    ms = lambda f: tt.do_bench(f, return_mode="median")
    t_rest = ms(lambda: attention_forward(q, k, v, split.rest, scale))
    t_lines = ms(lambda: ax.axial_forward(q, k, v, geometry, scale))
    out_a, lse_a = attention_forward(q, k, v, split.rest, scale)
    out_b, lse_b = ax.axial_forward(q, k, v, geometry, scale)  # LSE in line order, as the op passes it
    t_merge = ms(lambda: st.merge(out_a, lse_a, out_b, lse_b, q, k, v, split, scale, None, n_pad))
    out, lse = st.strided_attention(q, k, v, split)
    do = torch.randn_like(out)
    t_fwd = ms(lambda: st.strided_attention(q, k, v, split))
    t_fb = ms(lambda: torch.autograd.grad(st.strided_attention(q, k, v, split)[0], (q, k, v), do))
    t_rest_b = ms(lambda: attention_backward(q, k, v, out, lse, do, split.rest, scale))
    lse_lines = ax.line_order(lse, *geometry)
    t_lines_b = ms(lambda: ax.axial_backward(q, k, v, out, lse_lines, do, geometry, scale))
    print(f"forward: rest {t_rest:.3f} ms, lines {t_lines:.3f} ms, merge {t_merge:.3f} ms; op {t_fwd:.3f} ms")
    print(f"backward kernels: rest {t_rest_b:.3f} ms, lines {t_lines_b:.3f} ms; op fwd+bwd {t_fb:.3f} ms")
    _tables(_profile(lambda: torch.autograd.grad(st.strided_attention(q, k, v, split)[0], (q, k, v), do)),
            "strided fwd+bwd")


def _graph_ms(fn) -> float | str:
    """Median ms of fn replayed from a CUDA graph, or why it could not be captured."""
    import triton.testing as tt

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # a host synchronisation or a non-capturable op
        return f"not capturable ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
    return tt.do_bench(graph.replay, return_mode="median")


def preset(args) -> None:
    import triton.testing as tt

    from bench.attention import A5_PRESETS
    from mmsparse.attention import build_layout, sparse_attention

    lay = build_layout(A5_PRESETS[args.name][1], (args.n,), args.block, args.block, device="cuda")
    print(f"{args.name}, N {args.n}, 16 x 64, blocks {args.block}: full {lay.num_full}, partial {lay.num_partial}")
    q, k, v = (torch.randn(1, 16, args.n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return sparse_attention(q, k, v, lay, backend="triton")

    def both():
        return torch.autograd.grad(sparse_attention(q, k, v, lay, backend="triton"), (q, k, v), do)

    for name, fn in (("forward", fwd), ("forward+backward", both)):
        issued = tt.do_bench(fn, return_mode="median")
        graphed = _graph_ms(fn)
        shown = f"{graphed:.3f} ms" if isinstance(graphed, float) else graphed
        print(f"{name}: issued {issued:.3f} ms, CUDA graph {shown}", flush=True)
    if args.host:  # the Python side of the forward and of forward+backward
        for name, fn in (("forward", fwd), ("forward+backward", both)):
            print(f"\n# {name}")
            _host_profile(fn, 20)
        return
    _tables(_profile(both), f"{args.name} fwd+bwd")


def model(args) -> None:
    import bench.model as bm  # noqa: F401  (bench/ is on sys.path's parent)
    from mmsparse.models import CaptionTask, CaptionTokenizer, create_model

    tok = CaptionTokenizer.train([bm.CAPTION, "a low tone plays then a blue square moves up"], vocab_size=512)
    overrides = dict(max_frames=max(args.frames, 64), **dict(bm._parse_override(o) for o in args.override))
    if args.dense:
        overrides["schedule"] = "dense"
    torch.manual_seed(0)
    m = create_model(args.model, tokenizer=tok, **overrides).cuda()
    task = CaptionTask(m)
    batch = bm.make_batch(args.frames, 224, 1024, torch.device("cuda"), args.batch)
    step = bm.TrainStep(task, m, batch, args.precision, torch.device("cuda"))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.sync_debug:  # every host-device synchronisation of one step, with where it happens
        _sync_points(step)
        return
    if args.host:  # where the host's time goes: a wall far above the kernel sum waits on Python
        _host_profile(step, 10)
        return
    _tables(_profile(step), f"{args.model} {'dense' if args.dense else 'sparse'} {args.frames} frames")


def _host_profile(fn, steps: int) -> None:
    """cProfile of `steps` calls after warm-up: the Python functions by own and cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    host = (time.perf_counter() - t0) / steps * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    print(f"\nhost time to issue a step {host:.2f} ms, wall {wall:.2f} ms (a step, {steps} steps, under cProfile)")
    for key in ("tottime", "cumulative"):
        print(f"\n## host functions by {key} ({steps} steps)\n")
        pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(45)


def _sync_points(fn) -> None:
    import traceback
    import warnings

    seen: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename or "warnings" in f.filename]
        where = "\n".join(f"    {f.filename.split('mmsparse/')[-1]}:{f.lineno} {f.name}" for f in stack[-6:])
        seen[where] = seen.get(where, 0) + 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"\n## synchronising calls in one step: {sum(seen.values())}\n")
    for where, count in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"{count} x\n{where}\n")


def rope(args) -> None:
    """mmsparse/kernels/rope.py against the PyTorch composition it replaces (E1 shapes: 12 x 64 heads)."""
    import triton.testing as tt

    from mmsparse.kernels.rope import qkv_rope, qkv_rope_ref

    h, d = 12, 64
    print("| tokens | torch fwd ms | fused fwd ms | torch fwd+bwd ms | fused fwd+bwd ms |")
    print("|---:|---:|---:|---:|---:|")
    for n in (7612, 51516, 101692):
        x = torch.randn(1, n, 3, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ang = torch.rand(n, d // 2, device="cuda") * 100
        cos, sin = ang.cos(), ang.sin()
        g = [torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        ms = lambda f: tt.do_bench(f, return_mode="median")
        row = []
        for fn in (qkv_rope_ref, qkv_rope):
            row.append(ms(lambda: fn(x, cos, sin)))
        for fn in (qkv_rope_ref, qkv_rope):
            row.append(ms(lambda: torch.autograd.grad(fn(x, cos, sin), x, g)))
        print(f"| {n} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("strided")
    s.add_argument("--n", type=int, default=65536)
    s.add_argument("--stride", type=int, default=128)
    m = sub.add_parser("model")
    m.add_argument("--frames", type=int, default=64)
    m.add_argument("--model", default="captioner_base")
    m.add_argument("--dense", action="store_true")
    m.add_argument("--batch", type=int, default=1, help="clips a step (bench/model.py --batch)")
    m.add_argument("--precision", default="bf16", choices=("bf16", "amp"), help="bench/model.py --precision")
    m.add_argument("--override", action="append", default=[], help="ModelConfig field=value (bench/model.py)")
    m.add_argument("--sync-debug", action="store_true",
                   help="list the host-device synchronisations of one step (torch.cuda.set_sync_debug_mode)")
    m.add_argument("--host", action="store_true",
                   help="cProfile the Python side of 10 steps (where a host-bound step spends its time)")
    sub.add_parser("rope")
    a = sub.add_parser("preset")
    a.add_argument("name", choices=("longformer", "bigbird", "strided"))
    a.add_argument("--n", type=int, default=65536)
    a.add_argument("--block", type=int, default=64, help="layout blocks (bench/attention.py runs A5 on 64)")
    a.add_argument("--host", action="store_true",
                   help="cProfile the Python side of 20 calls instead of the profiler tables")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    {"strided": strided, "model": model, "rope": rope, "preset": preset}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
