"""Probe: where the time of long rows goes (Longformer / BigBird / Global-only, N=65,536, 16x64, bf16).

Times the Triton launchers directly (forward, then backward) for the window alone, the global
tokens alone and both, with the automatic split of long rows, without it and with forced
splitting, then prints a CUDA profile of three fwd+bwd steps. bench/NOTES.md (v3) quotes it.
    python bench/probe_long_rows.py            (a CUDA GPU)
"""
import torch, triton.testing as tt
from mmsparse.attention import longformer, build_layout, Local, Global, bigbird
from mmsparse.attention.backends.triton_kernels import block_lists
from mmsparse.kernels.block_sparse import block_sparse_attention
from mmsparse.kernels.block_sparse.backward import attention_backward
from mmsparse.kernels.block_sparse.worklist import kernel_program
from mmsparse.kernels.options import set_kernel_options
N, H, D = 65536, 16, 64
def bench(name, pat, chunk="auto", bwd=True):
    set_kernel_options(split_chunk=None if chunk == "auto" else chunk)
    lay = build_layout(pat, (N,), device="cuda")
    lists = block_lists(lay)
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    f = lambda: block_sparse_attention(q, k, v, lists)
    ms = tt.do_bench(lambda: f(), return_mode="median")
    out, lse = f(); do = torch.randn_like(out)
    msb = tt.do_bench(lambda: attention_backward(q, k, v, out, lse, do, lists, D**-0.5), return_mode="median") if bwd else 0
    kp = kernel_program(lists, q.device)
    print(f"{name:40s} full {lay.num_full:6d} part {lay.num_partial:6d} split rows {kp.rows.n_split} cols {kp.cols.n_split}  fwd {ms:.3f} ms  bwd {msb:.3f} ms", flush=True)
bench("local 513", Local((513,)))
bench("global 64 only", Global(64))
bench("longformer auto", longformer(513, 64))
bench("longformer nosplit", longformer(513, 64), chunk=10**9)
bench("longformer chunk 4", longformer(513, 64), chunk=4)
bench("bigbird auto", bigbird(513, 64, 3, 64))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    set_kernel_options(split_chunk=None)
    lay = block_lists(build_layout(longformer(513, 64), (N,), device="cuda"))
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for _ in range(3):
        out, lse = block_sparse_attention(q, k, v, lay); out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
