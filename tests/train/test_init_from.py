"""`mmsparse train ... --init-from RUN` starts a new run (step 0) from another run's exported
weights and tokenizer; it cannot be combined with --resume, and a folder without an export is
refused before anything is made."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmsparse.train.logs import read_metrics
from tests.eval.tiny_run import ROOT, _env, trained_tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return trained_tiny(tmp_path_factory)


def _train(run, *extra):
    cmd = [sys.executable, "-m", "mmsparse.train", "tiny_cpu", f"run.dir={run}", "run.steps=1", "run.progress=false",
           "eval.at_end=false", "checkpoint.at_end=false", "checkpoint.export=false", "run.tensorboard=false",
           "run.plot=false", "optim.lr=1e-5", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)


@pytest.mark.timeout(600)
def test_a_new_run_starts_from_another_runs_weights(tiny_run, tmp_path):
    out = _train(tmp_path / "new", "--init-from", str(tiny_run))
    assert out.returncode == 0, out.stderr[-3000:]
    # the same synthetic data the source run learnt: its first loss is the trained model's
    # (~0.3), not a fresh model's (~6.3)
    (first,) = read_metrics(tmp_path / "new" / "metrics.jsonl", "train")
    assert first["step"] == 1 and first["loss"] < 1.5, first
    assert (tmp_path / "new" / "tokenizer.json").read_text() == (tiny_run / "export" / "tokenizer.json").read_text()
    assert json.loads(out.stdout[out.stdout.index("{"):])["init_from"] == str(tiny_run / "export")

    out = _train(tmp_path / "both", "--resume", "--init-from", str(tiny_run))
    assert out.returncode == 2 and "pass one of them" in out.stderr, out.stderr[-2000:]
    out = _train(tmp_path / "bad", f"--init-from={tmp_path / 'nothing'}")
    assert out.returncode == 2 and "export/model.safetensors" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "both").exists() and not (tmp_path / "bad").exists()
