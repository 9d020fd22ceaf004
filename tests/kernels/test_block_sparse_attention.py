"""The Triton block-sparse attention kernels against a dense float64 truth, forward and backward.

Legend: B batch, H query heads, Hk key/value heads, N tokens, D head dim.

CPU: the kernels run under TRITON_INTERPRET=1 (conftest.py) on small problems in float32 and
float16 (bf16 tl.dot is garbage in the interpreter). GPU: the same patterns at larger sizes,
bf16 included. Error budget (CONVENTIONS.md item 3): the kernel's error against float64 is at
most twice the error of the same dense computation run in the input dtype, plus a small floor,
for out, lse and every gradient. Every output buffer is filled with NaN before the launch, so
an element the kernels forget to write fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.attention import (
    AVSync, Axial, Causal, Dense, Global, Local, Segment, StreamLayout, Tiled, bigbird,
    build_layout, longformer, sparse_transformer,
)
from mmsparse.attention.backends.triton_kernels import block_lists
from mmsparse.kernels.block_sparse import block_sparse_attention, block_sparse_attention_ref, launch, worklist
from mmsparse.kernels.block_sparse import backward as backward_module
from mmsparse.kernels.block_sparse import forward as forward_module
from mmsparse.kernels.block_sparse import tiles as tile_configs
from mmsparse.kernels.block_sparse.backward import attention_backward
from mmsparse.kernels.block_sparse.forward import attention_forward
from mmsparse.kernels.options import KernelOptions, kernel_options

# the Triton 3.6 interpreter converts 1-element arrays to scalars (numpy warns on every loop)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}

_AV_CPU = StreamLayout.concat(
    Segment("video", (3, 4, 5), seconds=0.5, order=(1, 2, 5)), Segment("audio", (2, 13), seconds=0.12), n_global=2
)
_AV_GPU = StreamLayout.concat(
    Segment("video", (8, 12, 16), seconds=0.5, order=(2, 4, 8)), Segment("audio", (8, 100), seconds=0.04), n_global=16
)

# name -> (pattern, token layout, block_q, block_k); CPU sizes first, GPU sizes second
CASES = {
    "local3d": ((Local((3, 3, 3)), (3, 5, 7), 32, 32),
                (Local((3, 5, 7)), (6, 12, 20), 128, 128)),
    "longformer": ((longformer(15, 3), (97,), 16, 16),
                   (longformer(129, 16), (1025,), 128, 128)),
    "axial_with_globals": ((Axial(1), StreamLayout.from_grid((3, 5, 7), n_global=3), 16, 32),
                           (Axial(1), StreamLayout.from_grid((6, 12, 20), n_global=16), 128, 128)),
    "tiled_order": ((Tiled((2, 2, 4), 1), StreamLayout.from_grid((4, 4, 8), order=(2, 2, 4)), 16, 16),
                    (Tiled((2, 4, 8), 1), StreamLayout.from_grid((8, 16, 24), order=(2, 4, 8)), 64, 64)),
    "global_local": ((Local((3, 3, 3)) | Global(4), StreamLayout.from_grid((3, 5, 7), n_global=4), 32, 32),
                     (Local((3, 5, 5)) | Global(64), StreamLayout.from_grid((6, 12, 20), n_global=64), 128, 128)),
    "causal": ((Causal(), (97,), 32, 32),
               (Causal(), (1025,), 128, 128)),
    "bigbird": ((bigbird(9, 2, 2, 8, seed=5), (101,), 16, 16),
                (bigbird(65, 16, 2, 64), (2000,), 128, 128)),
    "strided": ((sparse_transformer(8), (90,), 16, 16),
                (sparse_transformer(64), (2048,), 128, 128)),
    "multimodal": ((Local((3, 3, 3), modality="video") | AVSync(0.5) | Global(2), _AV_CPU, 16, 16),
                   (Local((3, 5, 5), modality="video") | AVSync(0.5) | Global(16), _AV_GPU, 128, 128)),
    "dense": ((Dense(), (70,), 32, 32),
              (Dense(), (1000,), 128, 128)),
}

if CUDA:
    # bf16 everywhere, D = 64; head dims 128 and 72 (padded) and the other dtypes on a few
    RUNS = [(name, torch.bfloat16, 64) for name in CASES] + [
        ("local3d", torch.bfloat16, 128), ("longformer", torch.bfloat16, 72),
        ("local3d", torch.float16, 64), ("longformer", torch.float32, 40),
    ]
    SHAPE = (2, 4, 2)  # B, H, Hk
else:
    RUNS = [(name, dtype, 40) for name in CASES for dtype in (torch.float32, torch.float16)]
    SHAPE = (1, 2, 1)


def _layout(name):
    pattern, tokens, bq, bk = CASES[name][1 if CUDA else 0]
    return build_layout(pattern, tokens, bq, bk, device=DEV)


def _inputs(n, dtype, d, shape=SHAPE, seed=0):
    b, h, hk = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, n, d, generator=gen) for x in (h, hk, hk))
    dout = torch.randn(b, h, n, d, generator=gen)
    dlse = torch.randn(b, h, n, generator=gen)
    return [t.to(DEV) for t in (q, k, v, dout, dlse)]


def _ref_grads(q, k, v, dout, dlse, layout, scale, dtype, upcast):
    """out, lse, dq, dk, dv of the dense reference (float64 when upcast, else in dtype)."""
    q, k, v = (t.to(dtype).detach().requires_grad_(True) for t in (q, k, v))
    out, lse = block_sparse_attention_ref(q, k, v, layout.dense_mask(max_tokens=1 << 15), scale, upcast=upcast)
    finite = torch.isfinite(lse)
    loss = (out.double() * dout.double()).sum() + (torch.where(finite, lse, 0.0).double() * dlse.double()).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


def _kernel_grads(q, k, v, dout, dlse, layout, scale, dtype):
    """The kernels through their launchers, every output buffer poisoned with NaN."""
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    poison = lambda t, dt=None: torch.full_like(t, math.nan, dtype=dt or t.dtype)
    out, lse = attention_forward(q, k, v, block_lists(layout), scale, out=poison(q), lse=poison(dlse, torch.float32))
    dq, dk, dv = attention_backward(
        q, k, v, out, lse, dout, block_lists(layout), scale, dq=poison(q), dk=poison(k), dv=poison(v), dlse=dlse
    )
    return out, lse, dq, dk, dv


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_budget(got, low, truth, dtype):
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, lo, t in zip(names, got, low, truth):
        assert not torch.isnan(g).any(), f"{name}: NaN left (unwritten or invalid elements)"
        if name == "lse":
            empty = torch.isinf(t)
            assert torch.equal(torch.isinf(g), empty), "lse: -inf exactly where a row attends nothing"
            g, lo, t = (torch.where(empty, 0.0, x.double()) for x in (g, lo, t))
        else:
            assert g.dtype == dtype and g.shape == t.shape, name
        err, base = _err(g, t), _err(lo, t)
        assert err <= 2 * base + FLOOR[dtype], f"{name}: error {err:.3e} > 2 x {base:.3e} + {FLOOR[dtype]}"


@pytest.fixture(params=["program", "tiles"])
def mask_mode(request, monkeypatch):
    """Partial blocks' masks evaluated by the program in registers, or read from the layout's
    precomputed uint8 tiles."""
    monkeypatch.setenv("MMSPARSE_MASK_TILES", {"program": "0", "tiles": "1"}[request.param])
    return request.param


@pytest.mark.parametrize("name,dtype,d", RUNS, ids=[f"{n}-{str(t)[6:]}-d{d}" for n, t, d in RUNS])
def test_matches_dense_truth(name, dtype, d, mask_mode):
    layout = _layout(name)
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, seed=hash(name) % 1000)
    scale = d**-0.5
    truth = _ref_grads(q, k, v, dout, dlse, layout, scale, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, scale, dtype, False)
    got = _kernel_grads(q, k, v, dout, dlse, layout, scale, dtype)
    _check_budget(got, low, truth, dtype)


TMA_RUNS = [(n, torch.bfloat16 if CUDA else torch.float16, d)
            for n, d in (("local3d", 64), ("longformer", 72), ("multimodal", 64), ("dense", 128 if CUDA else 40))]


@pytest.mark.parametrize("name,dtype,d", TMA_RUNS, ids=[f"{n}-{str(t)[6:]}-d{d}" for n, t, d in TMA_RUNS])
def test_tensor_descriptor_loads_match_truth(name, dtype, d, mask_mode, monkeypatch):
    """The forward loads K and V through tensor descriptors (the default on a Hopper GPU;
    MMSPARSE_TRITON_TMA=1 takes it under the interpreter): rows past N and a padded head dim
    come back zero from the copy engine, not from masks."""
    monkeypatch.setenv("MMSPARSE_TRITON_TMA", "1")
    layout = _layout(name)
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, seed=hash(name) % 1000 + 1)
    assert launch.use_tma(k.to(dtype), v.to(dtype), 64, 64)
    scale = d**-0.5
    truth = _ref_grads(q, k, v, dout, dlse, layout, scale, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, scale, dtype, False)
    got = _kernel_grads(q, k, v, dout, dlse, layout, scale, dtype)
    _check_budget(got, low, truth, dtype)
    monkeypatch.setenv("MMSPARSE_TRITON_TMA", "0")
    assert not launch.use_tma(k.to(dtype), v.to(dtype), 64, 64)
    monkeypatch.setenv("MMSPARSE_TRITON_TMA", "auto")
    assert launch.use_tma(k.to(dtype), v.to(dtype), 64, 64) == CUDA
    monkeypatch.setenv("MMSPARSE_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="MMSPARSE_TRITON_TMA"):
        launch.use_tma(k, v, 64, 64)


def _record_launches(monkeypatch) -> list:
    """(kernel name, WARP_SPECIALIZE, num_warps) of every launch of the forward and backward."""
    seen = []
    for module in (forward_module, backward_module):
        def record(kernel, *args, _launch=module.launch_items, **kw):
            seen.append((kernel.fn.__name__, kw["WARP_SPECIALIZE"], kw["num_warps"]))
            return _launch(kernel, *args, **kw)

        monkeypatch.setattr(module, "launch_items", record)
    return seen


# name, pattern, tokens, layout block, D, split chunk: CPU sizes, or GPU sizes whose tiles (64 and
# 128 rows) Triton's Hopper pass specialises
WS_RUNS = ([("tiled", Tiled((2, 4, 8), 1), StreamLayout.from_grid((8, 16, 24), order=(2, 4, 8)), 64, 64, None),
            ("dense", Dense(), (1000,), 128, 72, 2)] if CUDA else
           [("tiled", Tiled((2, 2, 4), 1), StreamLayout.from_grid((3, 5, 7), order=(2, 2, 4)), 16, 40, None),
            ("dense", Dense(), (97,), 32, 24, 2)])


@pytest.mark.parametrize("name,pattern,tokens,block,d,chunk", WS_RUNS, ids=[r[0] for r in WS_RUNS])
def test_warp_specialized_kernels_match_truth(name, pattern, tokens, block, d, chunk, set_options, monkeypatch):
    """MMSPARSE_WARP_SPECIALIZE=1 with descriptor loads (MMSPARSE_TRITON_TMA=1 takes them under
    the interpreter) on a layout of full blocks only: all three kernels launch marked, on 4
    warps, their own tiles by descriptor, and give the results of the unmarked launches (bit
    for bit under the interpreter, which runs the mark as plain code) and the float64 truth
    within the budget. CPU: N = 105 and 97 (ragged last blocks), D = 40 and 24 (padded); GPU: D
    = 64 and 72 (padded), N = 1000 (ragged); GQA, split rows (chunk 2); "auto" marks them on the
    GPU only."""
    set_options(split_chunk=chunk)
    monkeypatch.setenv("MMSPARSE_TRITON_TMA", "1")
    layout = build_layout(pattern, tokens, block, block, device=DEV)
    assert layout.num_partial == 0
    assert bool(chunk) == bool(worklist.kernel_program(block_lists(layout), torch.device(DEV)).rows.n_split)
    dtype = torch.bfloat16 if CUDA else torch.float16
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, seed=29 + d)
    scale = d**-0.5
    launches = _record_launches(monkeypatch)
    got = {}
    for mode in ("0", "auto", "1"):
        monkeypatch.setenv("MMSPARSE_WARP_SPECIALIZE", mode)
        launches.clear()
        got[mode] = _kernel_grads(q, k, v, dout, dlse, layout, scale, dtype)
        marked = mode == "1" or (mode == "auto" and CUDA)
        assert {n for n, _, _ in launches} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
        assert all(ws == marked and (warps == tile_configs.WS_NUM_WARPS or not ws) for _, ws, warps in launches)
    truth = _ref_grads(q, k, v, dout, dlse, layout, scale, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, scale, dtype, False)
    _check_budget(got["1"], low, truth, dtype)
    if not CUDA:
        assert all(torch.equal(a, b) for a, b in zip(got["0"], got["1"]))


def test_warp_specialize_only_where_the_pass_compiles():
    """launch.warp_specialize: "0" (the default) marks nothing, "1" a launch whose loop loads
    through descriptors, "auto" that launch on the GPU only; never a launch without descriptors
    (the CPU without MMSPARSE_TRITON_TMA=1, a GPU before Hopper), a masked one (partial blocks,
    key padding) or one whose own tiles a descriptor cannot read."""
    x = torch.zeros(1, 2, 64, 32, dtype=torch.float16, device=DEV)
    unaligned = torch.zeros(1, 2, 64, 36, dtype=torch.float16, device=DEV)[..., :32]  # row stride 72 bytes
    assert KernelOptions().warp_specialize == "0"
    for mode, want in (("0", False), ("auto", CUDA), ("1", True)):
        opts = KernelOptions(warp_specialize=mode)
        assert launch.warp_specialize(True, False, (x,), opts) == want
        assert not launch.warp_specialize(False, False, (x,), opts)
        assert not launch.warp_specialize(True, True, (x,), opts)
        assert not launch.warp_specialize(True, False, (x, unaligned), opts)


def test_warp_specialize_option_is_validated(monkeypatch):
    with pytest.raises(ValueError, match=r"warp_specialize must be auto, 0 or 1, got 'on'"):
        KernelOptions(warp_specialize="on")
    monkeypatch.setenv("MMSPARSE_WARP_SPECIALIZE", "yes")
    with pytest.raises(ValueError, match=r"got 'yes' \(from the environment: MMSPARSE_WARP_SPECIALIZE\)"):
        kernel_options()


def test_warp_specialized_configs_and_tuning_keys():
    """A marked launch runs 4 warps and at most 2 stages in the D_PAD 128 forward (3 overflow
    shared memory); tuned entries are kept apart for the option on and off."""
    assert tile_configs.ws_config("fwd", 128, (128, 128, 8, 3)) == (128, 128, 4, 2)
    assert tile_configs.ws_config("fwd", 64, (128, 64, 8, 3)) == (128, 64, 4, 3)
    assert tile_configs.ws_config("dq", 128, (64, 64, 4, 3)) == (64, 64, 4, 3)
    q = torch.zeros(1, 1, 32, 64, dtype=torch.float16, device=DEV)
    lists = block_lists(build_layout(Dense(), (32,), 16, 16, device=DEV))
    keys = {tile_configs.autotune_key("fwd", 64, q, lists, KernelOptions(warp_specialize=m)) for m in ("0", "1")}
    assert len(keys) == 2


@pytest.mark.parametrize("chunk", [None, 2])
def test_sub_lists_hold_exactly_the_non_empty_tiles(set_options, chunk):
    """The partial-block loops' lists (`sub_lists`) against a brute force over the mask tiles:
    each program's range holds, in order, the loop positions whose kernel tile attends a pair;
    also for the chunks of split rows (chunk=2 splits every row longer than two blocks: the
    global tokens' row and column)."""
    set_options(split_chunk=chunk)
    layout = build_layout(longformer(15, 3) | Local(5), (227,), 64, 64, device=DEV)
    kp = worklist.kernel_program(block_lists(layout), torch.device(DEV))
    tiles, k_ord = (t.cpu() for t in kp.mask_tiles())
    if chunk:
        assert kp.rows.n_split and kp.cols.n_split
    seen_empty = False
    for side, bm, bn in (("q", 32, 16), ("k", 16, 32), ("q", 64, 64)):
        entries, *ranges = (t.cpu() for t in kp.sub_lists(side, bm, bn))
        sq, sk = 64 // bm, 64 // bn
        work = kp.rows if side == "q" else kp.cols
        for items, count, r in ((work.direct, work.n_direct, ranges[0]), (work.split, work.n_split, ranges[1])):
            r = r.reshape(-1, sq if side == "q" else sk, 2)
            for item in range(count):
                _, _, _, p_lo, p_hi, _ = items[item].tolist()
                for t in range(r.shape[1]):
                    want = []
                    if side == "q":  # query tile t, loop over (ordinal, key tile)
                        for i in range(p_lo * sk, p_hi * sk):
                            o, j = divmod(i, sk)
                            tile = tiles[o, t * bm:(t + 1) * bm, j * bn:(j + 1) * bn]
                            want += [i] if tile.any() else []
                            seen_empty |= not tile.any()
                    else:  # key tile t, loop over (column position, query tile)
                        for i in range(p_lo * sq, p_hi * sq):
                            c, j = divmod(i, sq)
                            tile = tiles[int(k_ord[c]), j * bm:(j + 1) * bm, t * bn:(t + 1) * bn]
                            want += [i] if tile.any() else []
                    lo, hi = r[item, t].tolist()
                    assert entries[lo:hi].tolist() == want, (side, bm, bn, item, t)
    assert seen_empty  # the layout has empty kernel tiles: the lists do skip something


def test_partial_heavy_layouts_pick_their_own_forward_tiles():
    """Token-level windows (mostly partial blocks) at D_PAD 128 take the forward tiles of
    CONFIGS_PARTIAL; tile-aligned windows (all blocks full) keep CONFIGS; float32 keeps its own."""
    window = build_layout(Local((3, 5, 7)), (6, 12, 20), 128, 128, device=DEV)
    tiled = build_layout(Tiled((2, 4, 8), 1), StreamLayout.from_grid((8, 16, 24), order=(2, 4, 8)), 128, 128,
                         device=DEV)
    assert tile_configs.partial_heavy(block_lists(window)) and not tile_configs.partial_heavy(block_lists(tiled))
    bf16 = torch.bfloat16
    assert tile_configs.default_config("fwd", 128, bf16, block_lists(window)) == tile_configs.CONFIGS_PARTIAL["fwd"][128]
    assert tile_configs.default_config("fwd", 128, bf16, block_lists(tiled)) == tile_configs.CONFIGS["fwd"][128]
    assert tile_configs.default_config("fwd", 64, bf16, block_lists(window)) == tile_configs.CONFIGS["fwd"][64]  # no entry: the table
    assert tile_configs.default_config("dkdv", 128, bf16, block_lists(window)) == tile_configs.CONFIGS["dkdv"][128]
    assert tile_configs.default_config("fwd", 128, torch.float32, block_lists(window)) == tile_configs.CONFIGS_FP32["fwd"][128]


def test_64_blocks_pick_their_own_tiles_and_match_truth(mask_mode):
    """Layouts of 64 x 64 blocks at D_PAD <= 64 (tile-aligned 14 x 14 grids) take CONFIGS_B64
    (4 warps on 64 x 64 forward tiles, not the table's 8); they run end to end on a stream of
    padded tiles with global tokens and gaps, D = 48 (padded to 64)."""
    from mmsparse.attention import Segment
    from mmsparse.models.schedule import Gaps, StreamGlobal

    seg = Segment("video", (3, 7, 7), offset=64, order=(2, 7, 7), tile_align=64)  # 98 -> 128 a tile
    stream = StreamLayout((seg,), n_global=2, length=64 + seg.span)
    layout = build_layout(Tiled((2, 7, 7), 0) | StreamGlobal(2) | Gaps(), stream, 64, 64, device=DEV)
    bf16 = torch.bfloat16
    for kernel in ("fwd", "dq", "dkdv"):
        assert tile_configs.default_config(kernel, 64, bf16, block_lists(layout)) == tile_configs.CONFIGS_B64[kernel]
    dtype, d = (bf16 if CUDA else torch.float16), 48
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, seed=12)
    scale = d**-0.5
    truth = _ref_grads(q, k, v, dout, dlse, layout, scale, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, scale, dtype, False)
    _check_budget(_kernel_grads(q, k, v, dout, dlse, layout, scale, dtype), low, truth, dtype)


@pytest.mark.parametrize("d", [72, 40])
def test_partial_heavy_tiles_match_truth(d, mask_mode):
    """Layouts of 64-token blocks that are mostly partial blocks run end to end on their own
    tiles, N = 105 (a ragged last block): D = 72 (padded to 128) the forward on CONFIGS_PARTIAL's;
    D = 40 (padded to 64) all three kernels on CONFIGS_B64's."""
    layout = build_layout(Local((3, 3, 3)), (3, 5, 7), 64, 64, device=DEV)
    assert tile_configs.partial_heavy(block_lists(layout))
    bf16 = torch.bfloat16
    if d == 72:
        assert tile_configs.default_config("fwd", 128, bf16, block_lists(layout)) == tile_configs.CONFIGS_PARTIAL["fwd"][128]
    else:
        for kernel in ("fwd", "dq", "dkdv"):
            assert tile_configs.default_config(kernel, 64, bf16, block_lists(layout)) == tile_configs.CONFIGS_B64[kernel]
    dtype = torch.bfloat16 if CUDA else torch.float16
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, seed=d)
    scale = d**-0.5
    truth = _ref_grads(q, k, v, dout, dlse, layout, scale, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, scale, dtype, False)
    _check_budget(_kernel_grads(q, k, v, dout, dlse, layout, scale, dtype), low, truth, dtype)


@pytest.mark.parametrize("n", [96, 97])
@pytest.mark.parametrize("skip", ["1", "0"])
def test_kernel_tiles_smaller_than_layout_blocks(monkeypatch, n, mask_mode, skip):
    """Layout blocks of 64 run as 2 x 4 and 4 x 2 kernel tiles; N = 96 leaves a last layout
    block with one tile past N, N = 97 a ragged tile. With mask tiles, the loops skip the
    kernel tiles that attend nothing (skip "1", the default) or visit them all ("0")."""
    if skip == "0" and mask_mode == "program":
        pytest.skip("skipping empty tiles needs the mask tiles")
    monkeypatch.setenv("MMSPARSE_SKIP_EMPTY_TILES", skip)
    monkeypatch.setitem(tile_configs.FORCED, "fwd", (32, 16, 4, 1))
    monkeypatch.setitem(tile_configs.FORCED, "dq", (32, 16, 4, 1))
    monkeypatch.setitem(tile_configs.FORCED, "dkdv", (16, 32, 4, 1))
    layout = build_layout(longformer(15, 3) | Local(5), (n,), 64, 64, device=DEV)
    dtype, d = (torch.bfloat16 if CUDA else torch.float32), 24
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, seed=3)
    truth = _ref_grads(q, k, v, dout, dlse, layout, 0.3, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, 0.3, dtype, False)
    _check_budget(_kernel_grads(q, k, v, dout, dlse, layout, 0.3, dtype), low, truth, dtype)


SPLIT_RUNS = [(name, chunk) for name in ("longformer", "bigbird", "multimodal", "causal") for chunk in (1, 3)]


@pytest.mark.parametrize("name,chunk", SPLIT_RUNS, ids=[f"{n}-chunk{c}" for n, c in SPLIT_RUNS])
def test_split_rows(set_options, name, chunk, mask_mode):
    """Rows and columns cut into chunks of 1 or 3 blocks (every row split, ragged last chunks,
    rows whose chunks straddle the full and partial lists): merged by LSE in the forward and
    summed in the backward, the result stays within the budget."""
    set_options(split_chunk=chunk)
    layout = _layout(name)
    kp = worklist.kernel_program(block_lists(layout), torch.device(DEV))
    assert kp.rows.n_split > 0 and kp.cols.n_split > 0
    dtype, d = (torch.bfloat16 if CUDA else torch.float32), 40
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, seed=7 + chunk)
    truth = _ref_grads(q, k, v, dout, dlse, layout, d**-0.5, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, d**-0.5, dtype, False)
    _check_budget(_kernel_grads(q, k, v, dout, dlse, layout, d**-0.5, dtype), low, truth, dtype)


@pytest.mark.parametrize("name", ["multimodal", "bigbird", "kernel_tiles"])
def test_mask_tiles_are_the_partial_blocks_of_the_dense_mask(name):
    """Each tile is its partial block of the layout's dense mask (zero past N), in row order;
    k_part_ord finds the same block from the column-ordered list."""
    if name == "kernel_tiles":
        layout = build_layout(longformer(15, 3) | Local(5), (97,), 64, 32, device=DEV)
    else:
        layout = _layout(name)
    tiles, ordinal = worklist.kernel_program(block_lists(layout), torch.device(DEV)).mask_tiles()
    bq, bk, n = layout.block_q, layout.block_k, layout.n
    assert tiles.shape == (layout.num_partial, bq, bk) and tiles.dtype == torch.uint8
    dense = torch.zeros(layout.num_q_blocks * bq, layout.num_k_blocks * bk, dtype=torch.bool, device=DEV)
    dense[:n, :n] = layout.dense_mask()
    blocks = dense.view(layout.num_q_blocks, bq, layout.num_k_blocks, bk).transpose(1, 2)
    qb = torch.repeat_interleave(torch.arange(layout.num_q_blocks, device=DEV), layout.q_part_ptr.long().diff())
    assert torch.equal(tiles.bool(), blocks[qb, layout.q_part_idx.long()])
    kb = torch.repeat_interleave(torch.arange(layout.num_k_blocks, device=DEV), layout.k_part_ptr.long().diff())
    assert torch.equal(tiles[ordinal.long()].bool(), blocks[layout.k_part_idx.long(), kb])


def test_mask_tile_policy(monkeypatch):
    """auto: tiles while they fit MMSPARSE_MASK_TILE_MB; 0 / 1 force; anything else is an error."""
    kp = worklist.kernel_program(block_lists(_layout("multimodal")), torch.device(DEV))
    monkeypatch.delenv("MMSPARSE_MASK_TILES", raising=False)
    assert worklist.use_mask_tiles(kp)
    monkeypatch.setenv("MMSPARSE_MASK_TILE_MB", str(kp.tile_bytes / 2**20 / 2))
    assert not worklist.use_mask_tiles(kp)
    monkeypatch.setenv("MMSPARSE_MASK_TILES", "1")
    assert worklist.use_mask_tiles(kp)
    monkeypatch.setenv("MMSPARSE_MASK_TILES", "0")
    monkeypatch.delenv("MMSPARSE_MASK_TILE_MB")
    assert not worklist.use_mask_tiles(kp)
    monkeypatch.setenv("MMSPARSE_MASK_TILES", "yes")
    with pytest.raises(ValueError, match="MMSPARSE_MASK_TILES"):
        worklist.use_mask_tiles(kp)
    monkeypatch.setenv("MMSPARSE_MASK_TILES", "1")
    dense = worklist.kernel_program(block_lists(_layout("dense")), torch.device(DEV))
    assert not worklist.use_mask_tiles(dense)  # no partial block, nothing to read


def test_mask_tiles_share_one_memory_budget(monkeypatch):
    """Tiles of every cached layout share MMSPARSE_MASK_TILE_MB: building one layout's tiles
    drops the least recently used others' (rebuilt, identical, on their next use)."""
    a = worklist.kernel_program(block_lists(_layout("multimodal")), torch.device(DEV))
    b = worklist.kernel_program(block_lists(_layout("bigbird")), torch.device(DEV))
    for kp in (a, b):
        kp._tiles = None
    monkeypatch.setattr(worklist, "TILE_HOLDERS", type(worklist.TILE_HOLDERS)())
    # a budget that holds either layout's tiles but not both (the two cases' sizes differ, and
    # differ again between the CPU and the GPU sizes of the cases)
    both = a.tile_bytes + b.tile_bytes
    monkeypatch.setenv("MMSPARSE_MASK_TILE_MB", str((both - 1) / 2**20))
    tiles_a = a.mask_tiles()[0].clone()
    b.mask_tiles()
    assert a._tiles is None and b._tiles is not None  # both do not fit: a, the older, was dropped
    assert torch.equal(a.mask_tiles()[0], tiles_a) and b._tiles is None
    monkeypatch.setenv("MMSPARSE_MASK_TILE_MB", str(both / 2**20))
    b.mask_tiles()
    assert a._tiles is not None and b._tiles is not None


def test_long_rows_split_automatically():
    """Global tokens make one row and one column as long as the sequence: they are split, the
    window rows are not; a window or a dense layout splits nothing."""
    layout = build_layout(longformer(33, 8), (1024,), 16, 16, device="cpu")
    kp = worklist.kernel_program(block_lists(layout), torch.device("cpu"))
    assert kp.rows.long_blocks.tolist() == [0] and kp.cols.long_blocks.tolist() == [0]
    assert kp.rows.n_direct == layout.num_q_blocks - 1 and kp.rows.n_split >= 4
    for pattern in (Local((3, 3, 3)), Dense()):
        layout = build_layout(pattern, (4, 8, 8), 16, 16, device="cpu")
        kp = worklist.kernel_program(block_lists(layout), torch.device("cpu"))
        assert kp.rows.n_split == 0 and kp.cols.n_split == 0


def test_batch_and_heads_without_gqa():
    layout = _layout("local3d")
    dtype, d = (torch.bfloat16 if CUDA else torch.float32), 16
    q, k, v, dout, dlse = _inputs(layout.n, dtype, d, shape=(2, 3, 3), seed=4)
    truth = _ref_grads(q, k, v, dout, dlse, layout, d**-0.5, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, d**-0.5, dtype, False)
    _check_budget(_kernel_grads(q, k, v, dout, dlse, layout, d**-0.5, dtype), low, truth, dtype)


def test_autograd_function_and_lse_gradient():
    """The public functional: out and lse both differentiable, default scale 1/sqrt(D)."""
    layout = _layout("causal")
    dtype = torch.float32 if not CUDA else torch.bfloat16
    q, k, v, dout, dlse = _inputs(layout.n, dtype, 32, seed=5)
    qg, kg, vg = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    out, lse = block_sparse_attention(qg, kg, vg, block_lists(layout))
    ((out.float() * dout).sum() + (lse * dlse).sum()).backward()
    truth = _ref_grads(q, k, v, dout, dlse, layout, 32**-0.5, torch.float64, True)
    low = _ref_grads(q, k, v, dout, dlse, layout, 32**-0.5, dtype, False)
    _check_budget((out.detach(), lse.detach(), qg.grad, kg.grad, vg.grad), low, truth, dtype)


@pytest.mark.skipif(not CUDA, reason="determinism of GPU scheduling; the interpreter is serial")
def test_gradients_are_deterministic():
    for name in ("global_local", "longformer"):  # the second with split rows and columns
        layout = _layout(name)
        q, k, v, dout, dlse = _inputs(layout.n, torch.bfloat16, 64, seed=6)
        runs = [_kernel_grads(q, k, v, dout, dlse, layout, 0.125, torch.bfloat16) for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="backend='triton' of sparse_attention needs CUDA tensors")
def test_sparse_attention_triton_backend_matches_reference():
    from mmsparse.attention import sparse_attention

    layout = _layout("local3d")
    q, k, v, dout, _ = _inputs(layout.n, torch.bfloat16, 64, seed=7)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    out, lse = sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
    ref, ref_lse = sparse_attention(q, k, v, layout, backend="reference", return_lse=True)
    assert _err(out, ref) < 2e-2 and _err(lse, ref_lse) < 1e-2


# ---------------------------------------------------------------------------------------------
# Unsupported inputs: clear ValueErrors, no launch
# ---------------------------------------------------------------------------------------------


def _small():
    layout = build_layout(Local(5), (40,), 16, 16, device=DEV)
    q = torch.randn(1, 2, 40, 16, device=DEV)
    return layout, q


def test_head_dim_above_limit_raises():
    layout, _ = _small()
    q = torch.randn(1, 1, 40, 264, device=DEV)
    with pytest.raises(ValueError, match="head_dim 264"):
        block_sparse_attention(q, q, q, block_lists(layout))


def test_unsupported_dtype_raises():
    layout, q = _small()
    q = q.double()
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, q, q, block_lists(layout))


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layout = build_layout(Local(5), (40,), 16, 16)
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(ValueError, match="CUDA"):
        block_sparse_attention(q, q, q, block_lists(layout))


def test_layout_blocks_must_be_multiples_of_16():
    layout = build_layout(Local(5), (40,), 8, 8, device=DEV)
    q = torch.randn(1, 2, 40, 16, device=DEV)
    with pytest.raises(ValueError, match="multiples of 16"):
        block_sparse_attention(q, q, q, block_lists(layout))


def test_shape_mismatches_raise():
    layout, q = _small()
    with pytest.raises(ValueError, match="N=41"):
        block_sparse_attention(*(torch.randn(1, 2, 41, 16, device=DEV),) * 3, block_lists(layout))
    k = torch.randn(1, 3, 40, 16, device=DEV)
    with pytest.raises(ValueError, match="GQA"):
        block_sparse_attention(q, k, k, block_lists(layout))
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, q.half(), q, block_lists(layout))
