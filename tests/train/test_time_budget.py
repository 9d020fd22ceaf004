"""run.max_minutes: a run with far more steps than its wall-clock budget allows stops after the
step that passes the budget and ends as a finished run does (final evaluation, checkpoint at
that step, export, summary saying why it stopped)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from mmsparse.train.config import ConfigError, load_config
from mmsparse.train.logs import read_metrics

from tests.train.test_whole_run import _env

STEPS = 100_000  # unreachable in the budget
BUDGET_MIN = 0.25


def test_max_minutes_is_checked():
    assert load_config("tiny_cpu").run.max_minutes == 0  # no budget unless asked
    assert load_config("tiny_cpu", ["run.max_minutes=1.5"]).run.max_minutes == 1.5
    with pytest.raises(ConfigError, match=r"run\.max_minutes=-1: must be greater than or equal to 0"):
        load_config("tiny_cpu", ["run.max_minutes=-1"])


@pytest.mark.timeout(300)
def test_budget_ends_the_run_cleanly(tmp_path):
    run = tmp_path / "budget"
    cmd = [sys.executable, "-m", "mmsparse.train", "tiny_cpu", f"run.dir={run}", f"run.steps={STEPS}",
           f"run.max_minutes={BUDGET_MIN}", "run.progress=false", "checkpoint.every=0", "eval.captions=2",
           "eval.batches=1", "data.synth.clips=8", "data.synth.val_clips=2", "data.batch_size=2"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=280)
    wall = time.monotonic() - t0
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["stopped_by"] == "max_minutes" and 1 <= steps < STEPS
    # it stopped soon after the budget: the run's own clock starts in train(), after imports
    assert BUDGET_MIN * 60 <= summary["seconds"] <= BUDGET_MIN * 60 + 60, summary
    assert wall >= BUDGET_MIN * 60
    assert f"run.max_minutes=0.25 spent after step {steps} of {STEPS}" in out.stdout + out.stderr
    train = read_metrics(run / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))  # the last step is logged too
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl", "eval")] == [steps]  # final evaluation
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{steps:08d}"
    assert (run / "export" / "model.safetensors").is_file() and summary["export"] == str(run / "export")
