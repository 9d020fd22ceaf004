"""bench/model.py runs in its reduced CPU form and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmsparse import cli


def _bench_model():
    return cli.bench_module("model")


def _result(folder: Path) -> dict:
    """The one result a run wrote into ``folder``."""
    (path,) = folder.glob("model-*.json")
    return json.loads(path.read_text())


def test_bench_model_cpu_smoke(tmp_path):
    mod = _bench_model()
    torch.manual_seed(0)
    assert mod.main(["--cpu-smoke", "--frames", "4", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("model-*.json")
    assert re.fullmatch(r"model-cpu-.+-\d{4}-\d{2}-\d{2}-cpu-smoke\.json", path.name), path.name
    res = json.loads(path.read_text())
    assert res["git_commit"] and res["torch"] == torch.__version__
    assert {r["variant"] for r in res["rows"]} == {"sparse", "aligned", "dense"}
    sparse = next(r for r in res["rows"] if r["variant"] == "sparse")
    assert sparse["tokens_per_s"] > 0 and sparse["density"] < 1.0 and "speedup_vs_dense" in sparse
    # "aligned": the same clips with the block-aligned tiles (tile padding adds positions only)
    aligned = next(r for r in res["rows"] if r["variant"] == "aligned")
    assert aligned["tokens"] == sparse["tokens"] and aligned["positions"] >= sparse["positions"]
    # what ran, a step: the sparse encoder's layers on auto's choice off CUDA, the dense model's
    # on SDPA
    dense = next(r for r in res["rows"] if r["variant"] == "dense")
    depth = len(sparse["attention_backends"]) and sum(sparse["attention_backends"].values())
    assert sparse["attention_backends"] == {"reference": depth} and depth > 0
    assert dense["attention_backends"] == {"dense": depth}


def test_bench_model_keeps_the_cases_before_a_failure(tmp_path, monkeypatch):
    """The result is written after every case: a run cut short (here: the third case raises)
    leaves a JSON of the cases it measured, marked incomplete; a whole run is marked complete."""
    mod = _bench_model()
    real, calls = mod.run_case, []

    def run_case(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt("the call's time limit")
        return real(*args)

    monkeypatch.setattr(mod, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--cpu-smoke", "--frames", "4", "--variants", "sparse,dense,aligned", "--out", str(tmp_path)])
    res = _result(tmp_path)
    assert res["complete"] is False and [r["variant"] for r in res["rows"]] == ["sparse", "dense"]
    assert res["rows"][0]["speedup_vs_dense"] > 0
    monkeypatch.setattr(mod, "run_case", real)
    whole = tmp_path / "whole"
    assert mod.main(["--cpu-smoke", "--frames", "4", "--variants", "sparse,dense", "--out", str(whole)]) == 0
    assert _result(whole)["complete"] is True


def test_bench_model_count_only_counts_the_pooled_keys_bound(tmp_path, capsys):
    """--count-only: each variant's attended pairs, untimed; a bound on the pooled keys
    (compress_keys) takes pairs off as ceil(N / pooled_block) keys a position and layer."""
    from mmsparse.attention.compressed import pooled_block

    mod = _bench_model()
    argv = ["--count-only", "--model", "captioner_tiny", "--size", "32", "--audio-frames", "200",
            "--frames", "64", "--variants", "sparse,dense", "--config", "bounded:compress_block=8;compress_keys=4",
            "--config", "free:compress_block=8;compress_keys=0", "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    res = _result(tmp_path)
    rows = {r["variant"]: r for r in res["rows"]}
    assert all("step_ms" not in r for r in rows.values()) and rows["dense"]["density"] == 1.0
    n = rows["free"]["positions"]
    per_layer = n * (-(-n // 8) - -(-n // pooled_block(n, 8, 4)))  # pooled keys taken off, a position each
    extra = rows["free"]["attended_pairs"] - rows["bounded"]["attended_pairs"]
    assert per_layer > 0 and extra > 0 and extra % per_layer == 0 and extra // per_layer <= 2  # 2 sparse layers at most
    assert "fewer pairs" in capsys.readouterr().out


def test_bench_model_rejects_unknown_variant(tmp_path):
    with pytest.raises(SystemExit):
        _bench_model().main(["--cpu-smoke", "--variants", "sparse,fast", "--out", str(tmp_path)])


def test_bench_model_out_is_a_folder_and_never_overwritten(tmp_path, capsys):
    """--out names a folder; a second run the same day gets a -2 name instead of the first's."""
    mod = _bench_model()
    with pytest.raises(SystemExit):
        mod.main(["--cpu-smoke", "--out", str(tmp_path / "r.json")])
    assert "--out takes a folder" in capsys.readouterr().err
    argv = ["--cpu-smoke", "--frames", "4", "--variants", "sparse", "--steps", "1", "--label", "twice",
            "--out", str(tmp_path)]
    assert mod.main(argv) == 0 and mod.main(argv) == 0
    names = sorted(p.name for p in tmp_path.glob("model-*.json"))
    assert len(names) == 2 and names[0].endswith("-cpu-smoke-twice-2.json"), names
    assert names[1].endswith("-cpu-smoke-twice.json")


def test_bench_model_batch_counts_every_clip(tmp_path):
    """--batch B: B clips a step, tokens/s counts all of them (tokens stays per clip)."""
    mod = _bench_model()
    assert mod.main(["--cpu-smoke", "--frames", "4", "--batch", "3", "--variants", "sparse",
                     "--out", str(tmp_path)]) == 0
    (row,) = _result(tmp_path)["rows"]
    assert row["batch"] == 3 and row["tokens"] > 0
    assert abs(row["tokens_per_s"] - 3 * row["tokens"] / row["step_ms"] * 1e3) < 1e-6 * row["tokens_per_s"]


def test_bench_model_repeats_interleave_and_take_the_median(tmp_path, capsys):
    """--repeats 3: every case runs three times, all cases once before any twice; each row is the
    run of median step time, with every repeat's time and per-repeat speedup beside it."""
    mod = _bench_model()
    assert mod.main(["--cpu-smoke", "--frames", "4", "--variants", "sparse,dense", "--repeats", "3",
                     "--out", str(tmp_path)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["repeat"], r["variant"]) for r in printed] == [(i, v) for i in range(3) for v in ("sparse", "dense")]
    res = _result(tmp_path)
    assert res["repeats"] == 3
    rows = {r["variant"]: r for r in res["rows"]}
    for variant, row in rows.items():
        times = [r["step_ms"] for r in printed if r["variant"] == variant]
        assert row["step_ms_runs"] == times and row["step_ms"] == sorted(times)[1]
    pairs = [d / s for d, s in zip(rows["dense"]["step_ms_runs"], rows["sparse"]["step_ms_runs"])]
    assert rows["sparse"]["speedup_vs_dense_runs"] == pytest.approx(pairs)
    assert rows["sparse"]["speedup_vs_dense"] == pytest.approx(rows["dense"]["step_ms"] / rows["sparse"]["step_ms"])
    with pytest.raises(SystemExit):
        mod.main(["--cpu-smoke", "--repeats", "0", "--out", str(tmp_path / "r0")])


def test_median_row_of_even_counts_and_failures():
    mod = _bench_model()
    runs = [{"step_ms": t, "k": i} for i, t in enumerate((4.0, 1.0, 3.0, 2.0))]
    row = mod.median_row(runs)
    assert row["step_ms"] == 2.0 and row["k"] == 3 and row["step_ms_runs"] == [4.0, 1.0, 3.0, 2.0]
    assert mod.median_row(runs[:1]) == runs[0]  # one run: as it was, no list
    oom = {"error": "out of memory: ..."}
    assert mod.median_row([runs[0], oom]) is oom


def test_bench_model_named_configs_count_real_tokens(tmp_path):
    """--config NAME:... adds a sparse variant with its own overrides; tile padding adds stream
    positions, not tokens, so tokens/s compares it with the packed model on the same media."""
    mod = _bench_model()
    assert mod.main(["--cpu-smoke", "--frames", "8", "--variants", "sparse",
                     "--config", "padded:video_tile=2,3,3;video_tile_align=32",
                     "--out", str(tmp_path)]) == 0
    res = _result(tmp_path)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"sparse", "padded"} and res["configs"]["padded"]["video_tile_align"] == 32
    assert rows["padded"]["tokens"] == rows["sparse"]["tokens"]
    assert rows["padded"]["positions"] > rows["sparse"]["positions"]
    with pytest.raises(ValueError, match="--config"):
        mod.parse_config("video_tile_align=32")
    # "aligned" stands for BLOCK_ALIGNED_224, which the later items override
    name, over = mod.parse_config("tilekey:aligned;compress_block=832;attn_block=128")
    assert name == "tilekey" and over == {**mod.BLOCK_ALIGNED_224, "compress_block": 832, "attn_block": 128}
    with pytest.raises(ValueError, match="tilekey: 'alinged' is neither field=value nor 'aligned'"):
        mod.parse_config("tilekey:alinged;compress_block=832")


@pytest.mark.parametrize("precision", ["bf16", "amp"])
def test_train_step_precisions(precision):
    """bench/model.py's TrainStep: bf16 puts the model in bf16 and steps fp32 master weights that
    the bf16 weights then follow (DeepSpeed's bf16 mode), starting from the fp32 initial weights; amp keeps fp32 weights. Both move every
    trained weight and leave no grads behind."""
    from mmsparse.models import CaptionTask, CaptionTokenizer, create_model

    mod = _bench_model()
    tok = CaptionTokenizer.train([mod.CAPTION, "a low tone plays then a blue square moves up"], vocab_size=300)
    torch.manual_seed(0)
    model = create_model("captioner_tiny", tokenizer=tok, max_frames=8)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    batch = mod.make_batch(4, 32, 200, torch.device("cpu"), 2)
    step = mod.TrainStep(CaptionTask(model), model, batch, precision, torch.device("cpu"))
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert all(p.dtype == want for p in model.parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if precision == "bf16":  # the masters start from the fp32 initial weights, not their bf16 copies
        assert all(torch.equal(m, before[n]) for n, m in zip(names, step.master))
    loss = step()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())
    # what the optimizer steps: the fp32 masters (a 1e-4 step of a norm's weight of 1.0 is below
    # bf16's resolution there, so the bf16 copy of that one stays) or the fp32 weights
    stepped = step.master if precision == "bf16" else step.params
    moved = [n for n, w in zip(names, stepped) if not torch.equal(w.detach(), before[n])]
    assert len(moved) > 0.9 * len(names), f"only {len(moved)} of {len(names)} weights moved"
    if precision == "bf16":
        assert all(m.dtype == torch.float32 for m in step.master)
        assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(step.params, step.master))
    with pytest.raises(ValueError, match="precision"):
        mod.TrainStep(CaptionTask(model), model, batch, "fp8", torch.device("cpu"))



def _tool(script: str, out: Path, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """bash tools/<script> ARGS from the repository root, $OUT = out, this interpreter as $PYTHON."""
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", f"tools/{script}", *args], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_device_e1_script_runs_both_parts(tmp_path):
    """tools/device_e1.sh: the 64-frame and the long part each write their JSON (complete) and
    log into $OUT; a time limit that is not a number is refused before any work."""
    smoke = ["--cpu-smoke", "--frames", "4", "--steps", "1", "--warmup", "0", "--batch", "1"]
    done = _tool("device_e1.sh", tmp_path, "400", *smoke, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = sorted(tmp_path.glob("model-*.json"))
    assert [p.name.split("cpu-smoke-")[1] for p in results] == ["e1-512f-1024f.json", "e1-64f-batch8.json"]
    for p in results:
        res = json.loads(p.read_text())
        assert res["complete"] and {r["variant"] for r in res["rows"]} == {"sparse", "aligned", "every2", "every4",
                                                                            "t8s", "r1", "dense"}
    assert (tmp_path / "e1-64f.log").is_file() and "| 4 | every4 |" in done.stdout
    bad = _tool("device_e1.sh", tmp_path, "soon")
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_device_flash_script_refuses_without_fa4(tmp_path):
    """tools/device_flash.sh stops before any work, naming what is missing, where FlashAttention-4
    does not import (this machine), and refuses a time limit that is not a number."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("FlashAttention is installed here")
    done = _tool("device_flash.sh", tmp_path, "60")
    assert done.returncode == 3 and "flash_attn.cute does not import" in done.stderr
    assert not list(tmp_path.glob("*.json"))
    bad = _tool("device_flash.sh", tmp_path, "soon")
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_bench_model_profile_breaks_the_step_down(tmp_path, capsys):
    """--profile N: each row carries the profiled step's time by category, and a second table
    prints it; the reference backend's attention shows under "attention" (its softmax)."""
    mod = _bench_model()
    assert mod.main(["--cpu-smoke", "--frames", "4", "--variants", "sparse", "--steps", "1", "--profile", "1",
                     "--out", str(tmp_path)]) == 0
    (row,) = _result(tmp_path)["rows"]
    prof = row["profile"]
    assert prof["steps"] == 1 and prof["kernel_ms"] > 0
    assert prof["categories"]["matmul"] > 0 and prof["categories"]["attention"] > 0, prof["categories"]
    assert "ms a step by kernel category" in capsys.readouterr().out


def test_bench_model_kernel_options_per_variant(tmp_path):
    """--config items kernels.FIELD=value set the kernel options while that variant's cases run
    (here compile_blocks, the inductor-compiled blocks); the row records them and is compared
    with the dense-schedule variant of the same options too. A field or value that does not exist
    is refused by name before any case runs."""
    from mmsparse.kernels.options import kernel_options

    mod = _bench_model()
    seen = {}
    run = mod._run_case

    def spy(name, frames, variant, config, args, tok, device):
        seen[variant] = kernel_options().compile_blocks
        return run(name, frames, variant, config, args, tok, device)

    mod._run_case = spy
    try:
        assert mod.main(["--cpu-smoke", "--frames", "4", "--variants", "dense,sparse",
                         "--config", "densec:schedule=dense;kernels.compile_blocks=1",
                         "--config", "sparsec:kernels.compile_blocks=1", "--out", str(tmp_path)]) == 0
    finally:
        mod._run_case = run
    assert seen == {"dense": "0", "sparse": "0", "densec": "1", "sparsec": "1"}
    assert kernel_options().compile_blocks == "0"  # restored after each case
    rows = {r["variant"]: r for r in _result(tmp_path)["rows"]}
    assert rows["sparsec"]["kernels"] == {"compile_blocks": "1"} and "kernels" not in rows["sparse"]
    assert rows["sparsec"]["speedup_vs_dense_same_kernels"] == rows["densec"]["step_ms"] / rows["sparsec"]["step_ms"]
    assert rows["densec"]["schedule"] == "dense" and "speedup_vs_dense_same_kernels" not in rows["densec"]
    with pytest.raises(ValueError, match="kernels.FIELD=value with FIELD one of"):
        mod.parse_config("x:kernels.compile=1")
    with pytest.raises(ValueError, match="compile_blocks must be auto, 0 or 1"):
        mod.parse_config("x:kernels.compile_blocks=2")
