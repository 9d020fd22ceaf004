"""tools/device_longbench.sh: the long-clip driver under a time limit, its runs tarred to $OUT
as they finish, and a rerun of the same command going on from where the limit cut it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--smoke", "--device", "cpu", "--arms", "dense,tiled_compress", "--seeds", "0", "--budgets", "steps",
        "--no-timing"]


def _run(out: Path, work: Path, limit: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), LONGBENCH=str(work), PYTHON=sys.executable)
    return subprocess.run(["bash", "tools/device_longbench.sh", "t", str(limit), *ARGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cut_by_the_limit_then_rerun_to_the_report(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cut = _run(out, work, 1)  # the limit ends the driver before the runs finish
    assert cut.returncode == 124, cut.stdout + cut.stderr
    assert (out / "runs-t.tgz").is_file() and (out / "log-t.txt").is_file()
    assert not list(out.glob("longclip-*.md"))  # no report from partial runs

    done = _run(out, work, 300)  # the same command again: the runs finish, the report is written
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list(out.glob("longclip-cpu-*-t.md"))) == 1
    with tarfile.open(out / "runs-t.tgz") as tar:
        names = set(tar.getnames())
    assert {"runs/dense-s0-steps.json", "runs/tiled_compress-s0-steps.json", "spec.json"} <= names
    assert not [n for n in names if n.endswith(".pt") or ".model" in n]  # models and checkpoints stay


def test_usage_errors_name_what_is_missing(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    bad = subprocess.run(["bash", "tools/device_longbench.sh", "t", "soon"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    no_out = subprocess.run(["bash", "tools/device_longbench.sh", "t", "5"], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert no_out.returncode != 0 and "OUT" in no_out.stderr
