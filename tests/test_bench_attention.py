"""bench/attention.py on the CPU: the closed-form Flex anchor runs beside the reference backend,
its ratio column is filled, and a closed form that disagrees with the layout becomes an error
row instead of a timing; `--ab` times the triton kernels under each value of a kernel option in
turn."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import attention as bench
from bench import flex_closed
from mmsparse.attention import Local, Tiled, longformer


def test_cpu_run_times_flex_closed_beside_the_reference(tmp_path, capsys):
    assert bench.main(["--quick", "--only", "A1,A3", "--out", str(tmp_path), "--label", "t"]) == 0
    (path,) = tmp_path.glob("attention-*-t.json")
    res = json.loads(path.read_text())
    assert res["fa4"] == "not on the CPU"
    by = {(r["id"], r["backend"]): r for r in res["rows"]}
    assert {i for i, _ in by} == {"A1-cpu", "A3-cpu"}
    for wid in ("A1-cpu", "A3-cpu"):
        closed, ref = by[wid, "flex_closed"], by[wid, "reference"]
        assert "error" not in closed and closed["fwd_ms"] > 0 and closed["fwd_bwd_ms"] is None  # no CPU backward
        assert closed["x_flex_closed_fwd"] == 1.0 and ref["x_flex_closed_fwd"] > 0
        assert "x_flex_closed_fwd_bwd" not in ref
        assert 0 < closed["utilization"] <= 1 and closed["block_mask_build_ms"] >= 0
        assert (wid, "flex_flash") not in by  # CUDA only
    assert by["A3-cpu", "flex_closed"]["utilization"] == 1.0  # tile-aligned: every block full
    md = path.with_suffix(".md").read_text()
    assert "| x flex_closed |" in md and "| flex_closed |" in md and " (fwd) |" in md
    assert "| flex_closed |" in capsys.readouterr().out


WL = bench.Workload("t", "window (3,3,5) on (3,5,7)", Local((3, 3, 5)), (3, 5, 7), 2, 16)


def test_a_closed_form_that_attends_other_pairs_is_an_error_row(monkeypatch):
    monkeypatch.setattr(bench, "closed_form", lambda pattern, stream: flex_closed.dense_mask_mod())
    rows = bench.run_workload(WL, "cpu", ["reference"], reps=1)
    (row,) = [r for r in rows if r["backend"] == "flex_closed"]
    assert "fwd_ms" not in row and row["error"].startswith("closed-form mask_mod attends 11025 pairs, the layout 4725")
    assert "error: closed-form mask_mod attends" in bench.format_row(row)
    assert all("x_flex_closed_fwd" not in r for r in rows)


def test_patterns_without_a_closed_form_get_no_flex_closed_row(monkeypatch):
    monkeypatch.setattr(bench, "closed_form", lambda pattern, stream: None)
    rows = bench.run_workload(WL, "cpu", ["reference"], reps=1)
    assert [r["backend"] for r in rows] == ["reference", "sdpa_dense"]


def test_closed_form_candidates_cover_the_gpu_workloads():
    """Every GPU workload but BigBird (random blocks) has a closed form, so its Flex rows get
    the closed-form anchor."""
    missing = {w.name for w in bench.gpu_workloads() if flex_closed.closed_form(w.pattern, w.stream) is None}
    assert missing == {"BigBird (513, 64 global, 3 random), 16x64"}


def test_failures_are_rows_with_their_reason():
    base = dict(id="A3", workload="w", order="raster", backend="flex_flash", fwd_ms=1.0, fwd_bwd_ms=None,
                fwd_tflops=1.0, fwd_bwd_tflops=None, density=0.5, block_density=0.5, utilization=1.0,
                layout_build_ms=1.0)
    line = bench.format_row(dict(base, bwd_error="NotImplementedError: no backward"))
    assert "| 1.000 | error: NotImplementedError: no backward |" in line
    assert bench.format_row(dict(base, error="not installed")).endswith("| flex_flash | error: not installed |")
    assert bench.describe(RuntimeError("\n  CuTe template failed\nmore")) == "RuntimeError: CuTe template failed"


def test_fa4_says_when_it_is_not_installed():
    try:
        import flash_attn.cute  # noqa: F401
    except ModuleNotFoundError:
        assert bench.fa4() == (None, "not installed")
    else:  # installed: a callable and its version
        fn, version = bench.fa4()
        assert callable(fn) and version


def test_longformer_closed_form_is_counted_exactly():
    """The pair count the benchmark compares (block_mask_pairs) on a union with global tokens."""
    pattern, stream = longformer(15, 3), bench.Workload("x", "x", longformer(15, 3), (97,), 1, 8).stream
    mask_mod = flex_closed.closed_form(pattern, stream)
    block_mask = flex_closed.closed_block_mask(pattern, stream, block=16)
    want = int(flex_closed.evaluate(mask_mod, 97).sum())
    assert flex_closed.block_mask_pairs(block_mask, mask_mod, 97)[0] == want


def test_help_names_the_anchors(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("flex_closed", "flex_flash", "fa4_dense", "--only"))


@pytest.mark.parametrize("wl", [w for w in bench.gpu_workloads() if "BigBird" not in w.name],
                         ids=lambda w: f"{w.id}-{w.name}")
def test_closed_forms_agree_with_the_program_at_benchmark_sizes(wl):
    """Whole rows of the GPU workloads' masks (corner and random queries, every key) from the
    closed form against the pattern's mask program: the grids there are tile multiples and
    far larger than the pair-by-pair tests' grids."""
    mask_mod = flex_closed.closed_form(wl.pattern, wl.stream)
    program = wl.pattern.lower(wl.stream)
    n = wl.n
    gen = torch.Generator().manual_seed(0)
    q = torch.cat([torch.tensor([0, 1, n // 2, n - 2, n - 1]), torch.randint(0, n, (27,), generator=gen)])[:, None]
    k = torch.arange(n)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    assert torch.equal(mask_mod(zero, zero, q, k).expand(q.shape[0], n), program.evaluate(q, k))


TINY = bench.Workload("t-cpu", "tile window r=1 on (2,4,8), 2x16", Tiled((2, 2, 4), 1), (2, 4, 8), 2, 16,
                      order=(2, 2, 4), triton_block=16)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")  # the interpreter
def test_ab_runs_each_value_on_the_triton_kernels(tmp_path, monkeypatch):
    """--ab on the CPU (the block-sparse kernels under the interpreter): one row naming both
    values, each with every round's times, medians and the ratio to the first, its outputs
    compared with the first value's; the result files named after the option, the variable
    restored afterwards."""
    monkeypatch.setattr(bench, "cpu_workloads", lambda: [TINY])
    monkeypatch.setenv("MMSPARSE_WARP_SPECIALIZE", "auto")
    assert bench.main(["--ab", "warp_specialize=0,1", "--quick", "--rounds", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("attention-*-ab-warp_specialize.json")
    res = json.loads(path.read_text())
    assert (res["ab"], res["variable"], res["arms"], res["rounds"]) == ("warp_specialize", "MMSPARSE_WARP_SPECIALIZE",
                                                                       ["0", "1"], 2)
    (row,) = res["rows"]
    assert "error" not in row and row["backend"] == "triton" and row["blocks"] == "16x16"
    for value, arm in row["arms"].items():
        assert len(arm["fwd_ms"]) == len(arm["fwd_bwd_ms"]) == 2 and arm["fwd_bwd_ms_median"] > 0
        assert arm["max_rel_diff"] == 0.0  # float32: no descriptors, so the same kernels
    assert row["arms"]["0"]["fwd_ms_ratio"] == 1.0 and row["arms"]["1"]["fwd_bwd_ms_ratio"] > 0
    md = path.with_suffix(".md").read_text()
    assert "| fwd ms, warp_specialize = 0 / 1 | fwd 1 over 0 |" in md and "| t-cpu |" in md
    assert os.environ["MMSPARSE_WARP_SPECIALIZE"] == "auto"


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_ab_takes_the_values_in_turn(monkeypatch):
    """Round 1 times A then B, round 2 B then A, each under its own variable value."""
    monkeypatch.delenv("MMSPARSE_TRITON_TMA", raising=False)
    seen = []
    for name in ("measure_forward", "measure_backward"):
        monkeypatch.setattr(bench, name, lambda *a, name=name: seen.append(
            (name[8:], os.environ["MMSPARSE_TRITON_TMA"])) or 1.0)
    row = bench.run_ab(TINY, "cpu", "tma", "MMSPARSE_TRITON_TMA", ("0", "1"), reps=1, rounds=2)
    assert seen == [("forward", "0"), ("backward", "0"), ("forward", "1"), ("backward", "1"),
                    ("forward", "1"), ("backward", "1"), ("forward", "0"), ("backward", "0")]
    assert row["arms"]["1"]["fwd_ms"] == [1.0, 1.0] and "MMSPARSE_TRITON_TMA" not in os.environ


@pytest.mark.parametrize("arg,match", [
    ("warp_specialize=0", "two or more different values"),
    ("warp_specialize=1,1", "two or more different values"),
    ("no_such_option=0,1", "not a kernel option"),
    ("warp_specialize=0,on", "warp_specialize must be auto, 0 or 1, got 'on'"),
])
def test_ab_rejects_bad_arguments(arg, match, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--ab", arg])
    assert match in capsys.readouterr().err
