"""model.task=contrastive through the real training loop: `mmsparse.train tiny_cpu` (one CPU
process, DeepSpeed ZeRO-2 fp32) runs a few steps of symmetric InfoNCE, logs finite losses and the
task's own metrics every step, evaluates, and exports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mmsparse.train.logs import read_metrics

from tests.train.test_whole_run import _env

STEPS, BATCH = 4, 4


@pytest.mark.timeout(300)
def test_contrastive_task_trains(tmp_path):
    run = tmp_path / "contrastive"
    cmd = [sys.executable, "-m", "mmsparse.train", "tiny_cpu", f"run.dir={run}", "model.task=contrastive",
           f"run.steps={STEPS}", f"data.batch_size={BATCH}", "run.progress=false", "run.tensorboard=false",
           "run.plot=false", "checkpoint.every=0", "eval.captions=2", "eval.batches=1", "data.synth.clips=8",
           "data.synth.val_clips=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=280)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    train = read_metrics(run / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0, r
        assert 0.0 <= r["acc_media_to_text"] <= 1.0 and 0.0 <= r["acc_text_to_media"] <= 1.0, r
        assert 1.0 < r["logit_scale"] <= 100.0, r  # exp of the learned temperature, clamped at 100
        assert r["nonfinite_skipped"] == 0
    # InfoNCE over a batch of BATCH pairs starts near log(BATCH) (caption cross-entropy over the
    # 512-word vocabulary would start near log 512 = 6.2): the contrastive loss is what trained
    assert abs(train[0]["loss"] - math.log(BATCH)) < 0.5, train[0]

    evals = read_metrics(run / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [STEPS] and math.isfinite(evals[0]["loss"])
    assert "CIDEr-D" not in evals[0]  # no captions are generated for a contrastive model
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["stopped_by"] == "steps"
    assert (run / "export" / "model.safetensors").is_file()
