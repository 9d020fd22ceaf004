"""tools/gpu_longclip.sh end to end on the CPU at toy scale (--smoke): clips written in parallel,
two patterns trained at once under a time budget, every model scored, the report and the logs
archive under the names the GPU run uses. A pattern whose training fails is reported as failed,
with its error, beside the others."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.eval.tiny_run import ROOT, _env


@pytest.mark.timeout(600)
def test_smoke_pipeline(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**_env(), "OUT": str(out)}
    env.pop("OMP_NUM_THREADS")
    cmd = ["bash", str(ROOT / "tools" / "gpu_longclip.sh"), "--smoke", "--work", str(work), "--patterns",
           "local,no_such_pattern", "--total-minutes", "3", "--eval-minutes", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=560)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-4000:]  # 1: a pattern failed, the report is still written
    stems = {p.name.split(".")[0] for p in out.iterdir()}
    assert len(stems) == 2 and all(s.startswith("longclip-cpu-smoke-") for s in stems), sorted(os.listdir(out))
    stem = min(stems, key=len)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}.json", f"{stem}.md", f"{stem}.png", f"{stem}-logs.tar.gz"])

    data = json.loads((out / f"{stem}.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "triton", "deepspeed", "date", "wall_s", "runs"):
        assert meta[key], key
    assert meta["wall_s"] < 3 * 60, meta["timings_s"]
    assert set(data["models"]) == {"local"}
    assert data["failed"]["no_such_pattern"].startswith("training exited 2: error: recipe 'longclip_no_such_pattern'")
    local = data["models"]["local"]
    summ = local["summary"]
    assert summ["n"] == 12 and summ["errors"] == 0  # 2 lengths x 6 clips, all scored
    assert local["train"]["stopped_by"] == "max_minutes" and local["train"]["steps"] >= 1
    assert local["frames"] == 16 and local["attention_gflops_per_clip"] > 0
    assert 0 <= summ["choice_correct"] <= 1 and 0 < data["constant_answer"] <= 1
    run = meta["runs"]["local"]
    assert run["rc"] == 0 and "run.max_minutes=" in run["command"]
    md = (out / f"{stem}.md").read_text()
    assert "| local | local |" in md and "| no_such_pattern | no model: training exited 2" in md
    with tarfile.open(out / f"{stem}-logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/train-local.log", "logs/eval-local.0.log", "runs/local/metrics.jsonl",
            "runs/local/summary.json"} <= names
    assert (Path(work) / "runs" / "local" / "export" / "model.safetensors").is_file()
