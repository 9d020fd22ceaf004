"""Probe: what the partial blocks' mask evaluation costs the block-sparse kernels (a CUDA GPU).

    python bench/probe_mask_cost.py
    python bench/probe_mask_cost.py --sweep [FRAMES]   # tile configs of the three kernels, E1 layer (512 frames)
    python bench/probe_mask_cost.py --e1 64 --batch 8 --override video_tile_align=64 ...
                                                       # one E1 layer layout of a model config, B clips

For a few layouts (the E1 captioner_base layer at 64 and 512 frames, A2's token-level 3D
window in raster order), times the forward and backward launchers three ways: the partial
blocks' mask from the layout's program in registers, from the precomputed uint8 mask tiles
(MMSPARSE_MASK_TILES=1; their build time and memory are printed), and with the program
replaced by "every pair attends" (wrong results, same blocks, same loads): the last is the
most any cheaper mask evaluation can save.
bench/NOTES.md quotes the output (results/logs/probe-mask-cost-*.log).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import triton.testing as tt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmsparse.attention.backends.triton_kernels import block_lists  # noqa: E402
from mmsparse.kernels.block_sparse.backward import attention_backward  # noqa: E402
from mmsparse.kernels.block_sparse.forward import attention_forward  # noqa: E402
from mmsparse.kernels.block_sparse.worklist import kernel_program, use_mask_tiles  # noqa: E402
from mmsparse.kernels.options import set_kernel_options  # noqa: E402


def captioner_layout(frames: int, overrides: dict | None = None):
    import bench.model as bm
    from mmsparse.models import CaptionTokenizer, create_model

    tok = CaptionTokenizer.train([bm.CAPTION, "a low tone plays then a blue square moves up"], vocab_size=512)
    m = create_model("captioner_base", tokenizer=tok, max_frames=max(frames, 64), **(overrides or {})).cuda()
    with torch.no_grad():
        stream = m.embed(bm.make_batch(frames, 224, 1024, torch.device("cuda")))
    return m.layer_layouts(stream.layout)[0], m.cfg.num_heads, m.cfg.embed_dim // m.cfg.num_heads


def a2_layout():
    from mmsparse.attention import Local, build_layout

    return build_layout(Local((7, 13, 13)), (32, 48, 48), device="cuda"), 16, 64


def run(name, layout, h, d, batch: int = 1):
    n = layout.n
    q, k, v = (torch.randn(batch, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    lists = block_lists(layout)
    kp = kernel_program(lists, q.device)
    real = kp.program
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    kp.mask_tiles()
    torch.cuda.synchronize()
    build_ms = 1e3 * (time.perf_counter() - t0)
    times = {}
    for label, program, tiles in (("program", real, "0"), ("tiles", real, "1"), ("all-true", (), "0")):
        kp.program = program
        set_kernel_options(mask_tiles=tiles)
        out, lse = attention_forward(q, k, v, lists, scale)
        do = torch.randn_like(out)
        f = tt.do_bench(lambda: attention_forward(q, k, v, lists, scale), return_mode="median")
        b = tt.do_bench(lambda: attention_backward(q, k, v, out, lse, do, lists, scale), return_mode="median")
        times[label] = (f, b)
    kp.program = real
    set_kernel_options(mask_tiles="auto")
    (fr, br), (fm, bm), (ft, bt) = times["program"], times["tiles"], times["all-true"]
    print(f"{name:34s} N {n:7d} full {layout.num_full:7d} partial {layout.num_partial:7d} "
          f"predicates {len(real) // 5:3d} | tiles {kp.tile_bytes / 2**20:7.1f} MiB built in {build_ms:6.1f} ms"
          f" | fwd program / tiles / all-true {fr:7.3f} / {fm:7.3f} / {ft:7.3f} ms"
          f" | bwd {br:7.3f} / {bm:7.3f} / {bt:7.3f} ms"
          f" | fwd+bwd tiles vs program {(fr + br) / (fm + bm):5.2f}x", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if "--sweep" in sys.argv[1:]:  # the kernels' tile configs on the E1 layer layout (512 frames, or --sweep F)
        at = sys.argv.index("--sweep") + 1
        frames = int(sys.argv[at]) if at < len(sys.argv) else 512
        lay, h, d = captioner_layout(frames)
        print(f"E1 captioner_base {frames} frames: N {lay.n}, {h} heads x {d}, full {lay.num_full}, partial "
              f"{lay.num_partial}, tiles {use_mask_tiles(kernel_program(block_lists(lay), lay.device))}")
        from bench.sweep_tiles import sweep

        sweep(None, None, h, d, layout=lay)
        return 0
    if "--e1" in sys.argv[1:]:  # one E1 layer layout: --e1 FRAMES [--batch B] [--override field=value ...]
        import bench.model as bm

        argv = sys.argv[1:]
        frames = int(argv[argv.index("--e1") + 1])
        batch = int(argv[argv.index("--batch") + 1]) if "--batch" in argv else 1
        overrides = dict(bm._parse_override(argv[i + 1]) for i, a in enumerate(argv) if a == "--override")
        lay, h, d = captioner_layout(frames, overrides)
        run(f"E1 {frames} frames x {batch} {overrides}", lay, h, d, batch)
        return 0
    for frames in (64, 512):
        lay, h, d = captioner_layout(frames)
        run(f"E1 captioner_base {frames} frames", lay, h, d)
    lay, h, d = a2_layout()
    run("A2 Local(7,13,13) raster 16x64", lay, h, d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
