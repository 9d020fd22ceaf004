"""The flash backend: full blocks on FlashAttention-4, partial blocks on Triton, merged by LSE.

CPU: the split of a layout into its full and its partial blocks, run by a pluggable backend
(the reference for both halves here) and merged by log-sum-exp, equals the whole layout's
attention, forward and backward, with the LSE and its gradient; the dispatch (can_run's
reasons, backend="flash" refused with the reason, auto never picking it off CUDA, the
full-share rule) and FA4's block tables. GPU (skipped without CUDA or FA4): backend="flash"
against a dense float64 truth within the error budget of the other GPU tests.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import types
import zlib

import pytest
import torch

from mmsparse.attention import (
    Causal, Dense, Local, Segment, StreamLayout, Tiled, build_layout, sliding_window_with_sinks, sparse_attention,
)
from mmsparse.attention.backends import choose_backend, flash, reference
from mmsparse.attention.backends.reference import ReferenceOp
from mmsparse.attention.blocklayout import split_full, split_full_coarse
from mmsparse.kernels.block_sparse import block_sparse_attention_ref
from mmsparse.kernels.block_sparse.lists import rows_of
from mmsparse.kernels.options import KernelOptions, kernel_options
from tests.kernels import budget

_AV = StreamLayout.concat(Segment("video", (3, 4, 8), order=(1, 2, 4)), Segment("audio", (37,)))

# name -> (pattern, token layout, block size): odd N everywhere but one
CASES = {
    # windows: full blocks inside, partial blocks at their edges
    "window_1d": (Local(21), (97,), 8),
    "window_3d_tiles": (Local((3, 7, 7)), StreamLayout.from_grid((3, 9, 11), order=(1, 3, 3)), 9),
    # tile-aligned: one tile per block, only full blocks
    "tile_aligned": (Tiled((1, 3, 5), 1), StreamLayout.from_grid((5, 3, 5), order=(1, 3, 5)), 15),
    "dense": (Dense(), (97,), 16),
    # rows with no full block: causal's first query block, the audio rows (windows of 5 < 8)
    "causal": (Causal(), (97,), 16),
    "video_tiles_audio_windows": (Tiled((1, 2, 4), 1, modality="video") | Local(5, modality="audio"), _AV, 8),
}
ONLY_FULL = {"tile_aligned", "dense"}
ROWS_WITHOUT_FULL = {"causal", "video_tiles_audio_windows"}


def _layout(name):
    pattern, tokens, block = CASES[name]
    return build_layout(pattern, tokens, block, block)


def _counts(ptr):
    return ptr[1:] - ptr[:-1]


def _padding(n: int, gen: torch.Generator) -> torch.Tensor:
    """(2, N) bool: sample 0 unpadded, sample 1 with its last 9 tokens and a random tenth padded."""
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, n - 9:] = True
    pad[1] |= torch.rand(n, generator=gen) < 0.1
    return pad


def _grads(fn, q, k, v, dout, dlse):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse), loss sum(out dout) + sum(lse dlse)
    over the rows that attend something (LSE -inf elsewhere)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


# ---------------------------------------------------------------------------------------------
# The split and the merge (both halves on the reference)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_split_partitions_the_blocks(name):
    layout = _layout(name)
    full, partial = split_full(layout)
    assert (full.n, full.block_q, full.block_k) == (partial.n, partial.block_q, partial.block_k) == \
        (layout.n, layout.block_q, layout.block_k)
    assert full.num_partial == 0 and partial.num_full == 0
    assert full.num_full == layout.num_full and partial.num_partial == layout.num_partial
    for part in (full, partial):  # the transposed lists hold the same pairs
        assert _counts(part.k_full_ptr).sum() == part.num_full and _counts(part.k_part_ptr).sum() == part.num_partial
    a, b = full.dense_mask(), partial.dense_mask()
    assert torch.equal(a | b, layout.dense_mask()) and not (a & b).any()
    assert split_full(layout)[0] is full  # cached
    if name in ONLY_FULL:
        assert partial.num_partial == 0 and full.num_full > 0
    else:
        assert full.num_full > 0 and partial.num_partial > 0
    if name in ROWS_WITHOUT_FULL:  # the merge must keep rows that only the partial half attends
        assert ((_counts(full.q_full_ptr) == 0) & (_counts(partial.q_part_ptr) > 0)).any()


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "key_padding"])
@pytest.mark.parametrize("name", list(CASES))
def test_split_merge_equals_the_whole_layout(name, padded):
    layout = _layout(name)
    n, d = layout.n, 16
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{padded}".encode()))
    q = torch.randn(2, 4, n, d, generator=gen)  # GQA: 4 query heads on 2 key heads
    k, v = (torch.randn(2, 2, n, d, generator=gen) for _ in range(2))
    dout, dlse = torch.randn(2, 4, n, d, generator=gen), torch.randn(2, 4, n, generator=gen)
    kpm = _padding(n, gen) if padded else None
    scale = 0.3

    whole = _grads(lambda q, k, v: reference.run(q, k, v, layout, scale, kpm), q, k, v, dout, dlse)
    split = _grads(lambda q, k, v: flash.split_attention(q, k, v, layout, scale, ReferenceOp, ReferenceOp, kpm),
                   q, k, v, dout, dlse)
    for what, got, want in zip(("out", "lse", "dq", "dk", "dv"), split, whole):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")
    if name in ROWS_WITHOUT_FULL:  # rows the full half leaves at LSE -inf are rows of the result
        full, _ = split_full(layout)
        _, lse_full = reference.run(q, k, v, full, scale, kpm)
        only_partial = torch.isinf(lse_full) & torch.isfinite(whole[1])
        assert only_partial.any() and whole[0][only_partial].abs().amax() > 0


@pytest.mark.parametrize("coarse", [(16, 16), (24, 8), (8, 32)], ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("name", list(CASES))
def test_coarse_split_partitions_the_pairs(name, coarse):
    """split_full_coarse: whole coarse blocks of full layout blocks, and the layout's other
    blocks; together every attended pair once; the coarse half attends all of its pairs."""
    layout = _layout(name)
    if coarse[0] % layout.block_q or coarse[1] % layout.block_k:
        coarse = (coarse[0] * layout.block_q // 8, coarse[1] * layout.block_k // 8)
    full, rest = split_full_coarse(layout, *coarse)
    assert (full.block_q, full.block_k) == coarse and (rest.block_q, rest.block_k) == (layout.block_q, layout.block_k)
    assert full.num_partial == 0 and rest.num_partial == layout.num_partial
    for part in (full, rest):
        assert _counts(part.k_full_ptr).sum() == part.num_full and _counts(part.k_part_ptr).sum() == part.num_partial
    a, b = full.dense_mask(), rest.dense_mask()
    assert torch.equal(a | b, layout.dense_mask()) and not (a & b).any()
    assert full.attended_pairs() == full.computed_pairs()  # no pair of a coarse block is masked
    # each layout block is in one half: the coarse half's pairs are whole full layout blocks
    assert full.computed_pairs() + _full_pairs(rest) == _full_pairs(layout)
    assert split_full_coarse(layout, *coarse)[0] is full  # cached
    assert split_full_coarse(layout, layout.block_q, layout.block_k) == split_full(layout)


def _full_pairs(layout):
    full, _ = split_full(layout)
    return full.computed_pairs()


def test_coarse_split_takes_the_whole_tiles_of_a_tiled_layout():
    """Tiles of 4 blocks of 8 on a (4, 8, 8) grid: every 16 x 16 block inside a tile is whole;
    a coarse block that crosses a tile's edge into an unattended tile stays on the layout's blocks."""
    layout = build_layout(Tiled((1, 4, 8), 0), StreamLayout.from_grid((4, 8, 8), order=(1, 4, 8)), 8, 8)
    assert layout.num_partial == 0
    full, rest = split_full_coarse(layout, 16, 16)
    assert rest.num_full == 0 and full.computed_pairs() == layout.computed_pairs()
    full, rest = split_full_coarse(layout, 24, 8)  # 3 query blocks: some straddle two tiles
    assert full.num_full > 0 and rest.num_full > 0


@pytest.mark.parametrize("name", ["window_3d_tiles", "video_tiles_audio_windows", "causal", "dense"])
def test_coarse_split_merge_equals_the_whole_layout(name):
    layout = _layout(name)
    n, d = layout.n, 16
    gen = torch.Generator().manual_seed(zlib.crc32(f"coarse{name}".encode()))
    q = torch.randn(2, 4, n, d, generator=gen)
    k, v = (torch.randn(2, 2, n, d, generator=gen) for _ in range(2))
    dout, dlse = torch.randn(2, 4, n, d, generator=gen), torch.randn(2, 4, n, generator=gen)
    blocks = (2 * layout.block_q, 2 * layout.block_k)
    whole = _grads(lambda q, k, v: reference.run(q, k, v, layout, 0.3), q, k, v, dout, dlse)
    split = _grads(lambda q, k, v: flash.split_attention(q, k, v, layout, 0.3, ReferenceOp, ReferenceOp,
                                                         blocks=blocks), q, k, v, dout, dlse)
    for what, got, want in zip(("out", "lse", "dq", "dk", "dv"), split, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


def test_split_of_a_layout_with_only_partial_blocks_runs_one_half():
    layout = build_layout(Local(5), (40,), 8, 8)
    assert layout.num_full == 0
    calls = []

    def op(part):
        calls.append(part)
        return ReferenceOp(part)

    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    out, lse = flash.split_attention(q, k, v, layout, 0.5, op, op)
    assert len(calls) == 1 and calls[0].num_partial == layout.num_partial
    ref, ref_lse = reference.run(q, k, v, layout, 0.5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def _qkv(layout, dtype=torch.float32):
    q, k, v = (torch.randn(1, h, layout.n, 16, dtype=dtype) for h in (2, 1, 1))
    return q, k, v


def test_cannot_run_on_the_cpu_and_says_what_is_missing():
    layout = _layout("dense")
    reason = flash.can_run(*_qkv(layout), layout)
    assert reason is not None and reason.startswith("backend='flash' cannot run")
    assert "CUDA tensors (got cpu)" in reason
    if importlib.util.find_spec("flash_attn") is None:
        assert "FlashAttention-4 is not installed" in reason and 'pip install -e ".[flash]"' in reason


def test_backend_flash_on_the_cpu_raises_naming_the_backend_and_reason():
    layout = _layout("window_1d")
    with pytest.raises(ValueError, match=r"backend='flash' cannot run: it needs CUDA tensors \(got cpu\)"):
        sparse_attention(*_qkv(layout), layout, backend="flash")


def test_flash_forced_by_the_environment_is_refused_the_same_way(monkeypatch):
    layout = _layout("dense")
    monkeypatch.setenv("MMSPARSE_ATTENTION_BACKEND", "flash")
    assert choose_backend(*_qkv(layout), layout) == "flash"
    with pytest.raises(ValueError, match=r"backend='flash' cannot run: it needs CUDA"):
        sparse_attention(*_qkv(layout), layout)


@pytest.mark.parametrize("name", ["dense", "tile_aligned", "window_1d"])
def test_auto_never_picks_flash_on_the_cpu(name, monkeypatch, caplog):
    monkeypatch.delenv("MMSPARSE_ATTENTION_BACKEND", raising=False)
    layout = _layout(name)
    q, k, v = _qkv(layout)
    with caplog.at_level(logging.DEBUG, logger="mmsparse.attention.backends"):
        assert choose_backend(q, k, v, layout) == "reference"
        # even where flash claimed it could run: off CUDA, auto does not ask it
        monkeypatch.setattr(flash, "can_run", lambda *args: None)
        assert choose_backend(q, k, v, layout) == "reference"
    assert any("auto -> reference" in r.getMessage() and "flash" in r.getMessage() for r in caplog.records)
    assert torch.equal(sparse_attention(q, k, v, layout), reference.run(q, k, v, layout, 16**-0.5)[0])


def test_auto_rule_full_share(monkeypatch, set_options):
    """auto_reason is auto's decision on CUDA: None (pick flash) where it can run and the full
    blocks hold at least flash_min_full_share of the computed pairs."""
    dense, window = _layout("dense"), _layout("window_1d")
    assert flash.full_share(dense) == 1.0 and 0.2 < flash.full_share(window) < 0.3
    assert flash.full_share(build_layout(Local(5), (40,), 8, 8)) == 0.0
    monkeypatch.setattr(flash, "can_run", lambda *args: None)
    assert flash.auto_reason(*_qkv(dense), dense) is None
    reason = flash.auto_reason(*_qkv(window), window)
    assert "26.3 % of the computed pairs" in reason and "flash_min_full_share=0.95" in reason
    set_options(flash_min_full_share=0.25)
    assert flash.auto_reason(*_qkv(window), window) is None
    monkeypatch.setattr(flash, "can_run", lambda *args: "backend='flash' cannot run: why")
    assert flash.auto_reason(*_qkv(dense), dense) == "backend='flash' cannot run: why"


def test_min_full_share_option(monkeypatch):
    with pytest.raises(ValueError, match=r"flash_min_full_share must be in \[0, 1\], got 1.5"):
        KernelOptions(flash_min_full_share=1.5)
    monkeypatch.setenv("MMSPARSE_FLASH_MIN_FULL_SHARE", "0.25")
    assert kernel_options().flash_min_full_share == 0.25


@pytest.mark.parametrize("args,match", [
    ((torch.float32, 64, 64, (9, 0), 128, 128), "float16 or bfloat16, got torch.float32"),
    ((torch.bfloat16, 36, 36, (9, 0), 128, 128), "head_dim 36"),
    ((torch.bfloat16, 160, 160, (9, 0), 128, 128), "head_dim 160"),
    ((torch.bfloat16, 64, 32, (9, 0), 128, 128), "differ"),
    ((torch.bfloat16, 64, 64, (8, 0), 128, 128), "got sm80"),
    ((torch.bfloat16, 64, 64, (12, 0), 128, 128), "got sm120"),
    ((torch.bfloat16, 64, 64, (9, 0), 96, 96), r"96x96 do not fit .* sm90, nor .* \(block_q a multiple of 128, block_k = 128"),
    ((torch.bfloat16, 64, 64, (9, 0), 128, 256), "block_k = 128"),
    ((torch.bfloat16, 64, 64, (9, 0), 64, 64), None),  # FA4 takes 128 x 128 blocks of four full ones
    ((torch.float16, 64, 64, (10, 0), 128, 128), None),
    ((torch.bfloat16, 128, 128, (9, 0), 256, 128), None),
    ((torch.float16, 8, 8, (9, 0), 128, 128), None),
    ((torch.bfloat16, 72, 72, (10, 0), 256, 256), None),
])
def test_input_reason(args, match):
    reason = flash.input_reason(*args)
    if match is None:
        assert reason is None
    else:
        assert reason is not None and re.search(match, reason), reason


@pytest.mark.parametrize("name", ["causal", "window_3d_tiles", "video_tiles_audio_windows"])
def test_fa4_block_tables(name):
    """The forward's per-query-block and the backward's per-key-block lists of full blocks, as
    FA4 takes them: counts, entries ascending and first in each row, no partial ("mask") block."""
    full, _ = split_full(_layout(name))
    fwd, bwd = flash.fa4_block_tensors(full, types.SimpleNamespace)
    for t, ptr, idx, m in ((fwd, full.q_full_ptr, full.q_full_idx, full.num_q_blocks),
                           (bwd, full.k_full_ptr, full.k_full_idx, full.num_k_blocks)):
        assert t.block_size == (full.block_q, full.block_k)
        assert t.mask_block_cnt.shape == (1, 1, m) and not t.mask_block_cnt.any()
        assert t.full_block_cnt.dtype == t.full_block_idx.dtype == torch.int32
        assert torch.equal(t.full_block_cnt[0, 0], _counts(ptr))
        table, rows = t.full_block_idx[0, 0], rows_of(ptr).long()
        slot = torch.arange(idx.numel()) - ptr[:-1].long()[rows]
        assert torch.equal(table[rows, slot], idx) and table.shape[1] == int(_counts(ptr).max())
        filled = torch.zeros_like(table, dtype=torch.bool)
        filled[rows, slot] = True
        assert not table[~filled].any()
        for r in range(m):
            row = table[r, : int(t.full_block_cnt[0, 0, r])]
            assert torch.equal(row, row.sort().values)
    assert flash.fa4_block_tensors(full, types.SimpleNamespace) is not None  # cached per layout
    assert full.__dict__["_fa4_blocks"][0] is fwd


# ---------------------------------------------------------------------------------------------
# GPU: backend="flash" against the dense float64 truth
# ---------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available()
_FA4 = flash._fa4() if CUDA else "no CUDA"
gpu = pytest.mark.skipif(not CUDA or isinstance(_FA4, str),
                         reason=f"needs a CUDA GPU and FlashAttention-4 ({_FA4 if CUDA else 'no CUDA GPU'})")

GPU_CASES = {
    "dense": (Dense(), (1000,)),  # only full blocks, the last one ragged
    "tiled": (Tiled((2, 8, 8), 1), StreamLayout.from_grid((6, 16, 24), order=(2, 8, 8))),  # only full blocks
    "window": (Local((3, 17, 33)), StreamLayout.from_grid((3, 24, 48), order=(1, 8, 16))),  # full and partial
    "causal": (Causal(), (1111,)),  # first query block: no full block
    "sinks": (sliding_window_with_sinks(300, 4), (1537,)),
}


@gpu
@pytest.mark.parametrize("block", [128, 64])  # 64: FA4 takes the 128 x 128 blocks of four full ones
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_flash_matches_truth_bf16(name, d, block, monkeypatch):
    pattern, tokens = GPU_CASES[name]
    layout = build_layout(pattern, tokens, block, block, device="cuda")
    mask = layout.dense_mask()
    q, k, v, dout, dlse = budget.inputs((2, 4, 2), layout.n, d, seed=zlib.crc32(name.encode()) + d)
    reason = flash.can_run(q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), layout)
    assert reason is None, reason
    used = []
    real = flash.FA4Op.forward
    monkeypatch.setattr(flash.FA4Op, "forward", lambda *a: used.append(1) or real(*a))

    def got_fn(q, k, v):
        return sparse_attention(q, k, v, layout, backend="flash", return_lse=True)

    def ref_fn(upcast):
        return lambda q, k, v: block_sparse_attention_ref(q, k, v, mask, d**-0.5, upcast=upcast)

    truth = budget.grads(ref_fn(True), q, k, v, dout, dlse, torch.float64)
    low = budget.grads(ref_fn(False), q, k, v, dout, dlse, torch.bfloat16)
    got = budget.grads(got_fn, q, k, v, dout, dlse, torch.bfloat16)
    assert used, "the full blocks did not run on FlashAttention-4"
    budget.check_budget(got, low, truth, torch.bfloat16)
