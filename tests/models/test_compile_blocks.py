"""The kernel option compile_blocks: the blocks' work after attention through torch.compile
(inductor, on the CPU here) gives the eager model's encoding, logits and every weight's gradient,
sparse and dense, packed rows and not; one graph serves every block."""

from __future__ import annotations

import pytest
import torch

from mmsparse.kernels.options import KernelOptions, kernel_options, set_kernel_options
from mmsparse.models import create_model, layers
from tests.models.outputs import assert_same, run


@pytest.fixture
def compiled_counts(monkeypatch):
    """Counts the calls of the compiled function and of the eager one."""
    calls = {"compiled": 0, "eager": 0}
    compiled = layers._after_attention_compiled()
    eager = layers._after_attention

    def count_compiled(*args):
        calls["compiled"] += 1
        return compiled(*args)

    def count_eager(*args):
        calls["eager"] += 1
        return eager(*args)

    monkeypatch.setattr(layers, "_after_attention_compiled", lambda: count_compiled)
    monkeypatch.setattr(layers, "_after_attention", count_eager)
    return calls


@pytest.mark.parametrize("schedule,pack", [("tiled", True), ("tiled", False), ("dense", False)])
def test_compiled_blocks_equal_the_eager_blocks(tokenizer, batch, schedule, pack, compiled_counts, monkeypatch):
    torch.manual_seed(0)
    # gapped streams (segment and tile alignment) with the compressed branch: the packed rows,
    # the branch's pooled tails and the dense path all pass through the compiled graph
    model = create_model("captioner_tiny", tokenizer=tokenizer, schedule=schedule, attn_block=16,
                         segment_align=32, compress_block=16).eval()
    model.set_backend("reference")
    model.cfg.pack_gaps = pack
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MMSPARSE_COMPILE_BLOCKS", mode)
        out[mode] = run(model, batch)
    depth = len(model.blocks)
    # each mode ran the blocks its own way: encode and forward, depth blocks each
    assert compiled_counts == {"compiled": 2 * depth, "eager": 2 * depth}
    assert_same(out["1"], out["0"])


def test_one_graph_serves_every_block(tokenizer, batch, monkeypatch):
    """The blocks' weights are the graph's inputs: a model of 4 blocks compiles no more graphs
    than one shape and its dynamic recompile need (dynamo's recompile limit is 8 a function)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = create_model("captioner_tiny", tokenizer=tokenizer, depth=4, schedule="tiled").eval()
    model.set_backend("reference")
    monkeypatch.setenv("MMSPARSE_COMPILE_BLOCKS", "1")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        model.encode(batch)
        model.encode({k: v[:4] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()})
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compile_blocks_option():
    assert KernelOptions().compile_blocks == "0"  # eager until a same-run GPU A/B says otherwise
    with pytest.raises(ValueError, match="compile_blocks must be auto, 0 or 1"):
        KernelOptions(compile_blocks="yes")
    x = torch.zeros(2, 3)
    for mode, want in (("0", False), ("auto", False), ("1", True)):  # auto: CUDA tensors only
        previous = set_kernel_options(compile_blocks=mode)
        try:
            assert kernel_options().compile_blocks == mode
            assert layers.compile_blocks(x) is want
        finally:
            set_kernel_options(previous)


def test_compile_blocks_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMSPARSE_COMPILE_BLOCKS", "on")
    with pytest.raises(ValueError, match="MMSPARSE_COMPILE_BLOCKS"):
        kernel_options()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_blocks_on_the_gpu_equal_the_eager_blocks(tokenizer, batch, monkeypatch):
    """On CUDA, bf16, the Triton kernels and the fused rope around the compiled graph (what E1's
    compiled variants run): encoding and gradients as eager's within bf16 rounding."""
    torch.manual_seed(0)
    model = create_model("captioner_tiny", tokenizer=tokenizer, attn_block=16, segment_align=32,
                         compress_block=16).cuda().to(torch.bfloat16)
    model.set_backend("triton")
    from mmsparse.encoders import HOST_KEYS

    # as the training loop moves a batch: media to the device, masks and times stay on the host
    gpu = {k: v.cuda() if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v for k, v in batch.items()}
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MMSPARSE_COMPILE_BLOCKS", mode)
        out[mode] = run(model, gpu)
    scale = out["0"][0].float().abs().max().item()
    assert (out["1"][0].float() - out["0"][0].float()).abs().max().item() <= 0.02 * scale
    for name, g in out["1"][2].items():
        want = out["0"][2][name].float()
        assert (g.float() - want).abs().max().item() <= 0.05 * (want.abs().max().item() + 1e-3), name
