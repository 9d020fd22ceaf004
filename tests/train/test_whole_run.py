"""A whole run is a test: tiny_cpu with 2 CPU processes (gloo) and ZeRO-2 trains, is killed with
SIGKILL mid-run, resumes with --resume, and its metrics equal the uninterrupted run's exactly
(fp32 on CPU), each run on synthetic media it generated itself. Also: a corrupt or missing checkpoint on resume is an error naming the file.

Launched through the deepspeed launcher as users do. TORCH_EXTENSIONS_DIR points at a stable
cache so the shm-comm op DeepSpeed builds on first use (~60 s) is reused across runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmsparse.train.distributed import free_port, shm_buffer
from mmsparse.train.logs import read_metrics

STEPS, EVERY, KILL_AFTER = 24, 8, 12
COMMON = [f"run.steps={STEPS}", f"checkpoint.every={EVERY}", "run.progress=false", "eval.captions=2",
          "eval.batches=1", "deepspeed.zero_stage=2", "data.synth.clips=8", "data.synth.val_clips=2",
          "data.batch_size=2", "data.num_workers=0", "optim.lr=2e-3", "optim.warmup_steps=5"]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mmsparse-torch-extensions"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(run_dir: Path, *extra: str, procs: int = 2) -> subprocess.Popen:
    port = free_port()
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(procs), "--master_port", str(port),
           "--module", "mmsparse.train", "tiny_cpu", f"run.dir={run_dir}", *COMMON, *extra]
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    # own session: the kill below reaches the launcher and both ranks, and nothing else
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    p.master_port, p.procs = port, procs
    return p


def _shm_left(p: subprocess.Popen) -> list[str]:
    """DeepSpeed's CPU all-reduce files of this run still in /dev/shm (distributed.py unlinks
    them once every rank has mapped them)."""
    return [str(f) for r in range(p.procs) for addr in ("127.0.0.1", "localhost")
            if (f := shm_buffer(r, addr, p.master_port)).exists()]


def _wait(p: subprocess.Popen, run_dir: Path, timeout: float = 480) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"run timed out; log: {_tail(run_dir)}")


def _tail(run_dir: Path) -> str:
    log = run_dir.parent / f"{run_dir.name}.log"
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl", "train")]


@pytest.mark.timeout(1200)
def test_two_process_zero2_kill_and_resume_matches(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()

    # the uninterrupted run
    p = _launch(full)
    assert _wait(p, full) == 0, _tail(full)
    ref = _losses(full)
    assert [s for s, _ in ref] == list(range(1, STEPS + 1))
    first = sum(v for _, v in ref[:4]) / 4
    last = sum(v for _, v in ref[-4:]) / 4
    assert last < first - 0.5, f"loss did not fall: {ref}"
    for f in ("config.yaml", "deepspeed_config.json", "curves.png", "summary.json", "export/config.json",
              "tokenizer.json"):
        assert (full / f).is_file(), f
    assert any((full / "tb").iterdir())
    assert read_metrics(full / "metrics.jsonl", "eval"), "no evaluation record"
    ds = json.loads((full / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 2 * 2

    # the same run in another folder (its own synthetic media, generated anew), killed with
    # SIGKILL after step KILL_AFTER (past the checkpoint at EVERY)
    p = _launch(killed)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if len(_losses(killed)) >= KILL_AFTER:
            break
        time.sleep(0.05)
    assert p.poll() is None, f"the run ended before it could be killed: {_tail(killed)}"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not _shm_left(p), "a killed run left its shared-memory all-reduce files behind"
    done = len(_losses(killed))
    assert EVERY < done < STEPS, done
    assert (killed / "checkpoints" / "latest").read_text().strip() == f"step{EVERY:08d}"

    # starting over in the same folder without --resume is refused
    p = _launch(killed)
    assert _wait(p, killed) != 0
    assert "--resume" in _tail(killed)

    p = _launch(killed, "--resume")
    assert _wait(p, killed) == 0, _tail(killed)
    assert f"resumed from {killed / 'checkpoints' / f'step{EVERY:08d}'}" in _tail(killed)
    got = _losses(killed)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), got
    assert got == ref, "resumed loss curve differs from the uninterrupted run:\n" + "\n".join(
        f"{a} {b}" for a, b in zip(ref, got) if a != b)
    # two runs, one of them killed and resumed, each on media it generated itself: every
    # record of metrics.jsonl is the same, to the bit, but for the timings
    timing = {"step_time", "clips_per_s", "tokens_per_s", "mfu", "time", "seconds"}
    records = lambda run: [{k: v for k, v in r.items() if k not in timing}  # noqa: E731
                           for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert records(killed) == records(full)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder``: its bytes, mode and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(420)
def test_resume_complete_mismatched_and_damaged_checkpoints(tmp_path):
    run = tmp_path / "one"
    run.mkdir()
    base = [sys.executable, "-m", "mmsparse.train", "tiny_cpu", f"run.dir={run}", "run.steps=2",
            "checkpoint.every=1", "run.progress=false", "eval.at_end=false", "checkpoint.export=false",
            "data.synth.clips=4", "data.synth.val_clips=0", "data.batch_size=2"]

    def go(*extra):
        return subprocess.run(base + list(extra), capture_output=True, text=True, env=_env(), timeout=240)

    out = go("--resume")
    assert out.returncode == 5 and f"{run / 'checkpoints' / 'latest'} does not exist" in out.stderr, out.stderr
    os.umask(old := os.umask(0o022))
    out = go()
    assert out.returncode == 0, out.stderr[-3000:]
    # no warning a user cannot act on (CPU accelerator, CUDA_HOME, DeepSpeed reading its scheduler early)
    for noise in ("Setting accelerator to CPU", "CUDA_HOME", "before it has started"):
        assert noise not in out.stdout + out.stderr, (noise, out.stderr[-3000:])
    # files get the umask's mode, not mkstemp's or safetensors' 0600
    expect = 0o666 & ~old
    for f in ("config.yaml", "checkpoints/latest", "checkpoints/step00000002/complete.json", "tokenizer.json",
              "data/train/manifest.jsonl", next((run / "checkpoints" / "step00000002").glob("*optim_states.pt"))):
        assert (run / f).stat().st_mode & 0o777 == expect, (f, oct((run / f).stat().st_mode))

    # the README's resume example on a finished run: says so, exits 0, changes nothing
    before = _snapshot(run)
    out = go("optim.lr=1e-3", "data.frames=16", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is complete" in out.stdout and "optim.lr" in out.stdout and "data.num_frames" in out.stdout, out.stdout
    assert _snapshot(run) == before
    # values that differ from an unfinished run's config are refused, naming the keys
    out = go("optim.lr=1e-3", "data.frames=16", "run.steps=3", "--resume")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "optim.lr: 0.005 -> 0.001" in out.stderr and "data.num_frames: 8 -> 16" in out.stderr, out.stderr
    assert "--init-from" in out.stderr
    assert _snapshot(run) == before

    # a latest checkpoint whose data were cut short after its marker was written (an OS crash
    # before the data reached the disk): the previous complete one is used, with a warning
    tag2, tag1 = run / "checkpoints" / "step00000002", run / "checkpoints" / "step00000001"
    optim2 = next(tag2.glob("*optim_states.pt"))
    with open(optim2, "r+b") as f:
        f.truncate(optim2.stat().st_size // 2)
    out = go("--resume", "run.steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{optim2} is truncated" in out.stderr and f"resuming from the older complete checkpoint {tag1}" \
        in out.stderr, out.stderr[-3000:]
    assert f"resumed from {tag1} at step 1" in out.stdout + out.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl", "train")] == [1, 2, 3]

    # no usable checkpoint left: an error naming every bad file
    tag3 = run / "checkpoints" / "step00000003"
    optim3, optim2 = next(tag3.glob("*optim_states.pt")), next(tag2.glob("*optim_states.pt"))
    data = bytearray(optim3.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim3.write_bytes(bytes(data))
    optim2.unlink()
    out = go("--resume", "run.steps=4")
    assert out.returncode == 5, out.stderr[-3000:]
    assert f"{optim3} is corrupt" in out.stderr and f"{optim2} is missing" in out.stderr, out.stderr[-3000:]


@pytest.mark.timeout(300)
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
    run = tmp_path / "nan"
    cmd = [sys.executable, "-m", "mmsparse.train", "tiny_cpu", f"run.dir={run}", "run.steps=12",
           "optim.lr=1e30", "optim.warmup_steps=1", "optim.grad_clip=0", "run.max_nonfinite_in_row=3",
           "run.progress=false", "checkpoint.every=0", "data.synth.clips=4", "data.synth.val_clips=0",
           "data.batch_size=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 4, text[-3000:]
    assert "non-finite loss on a batch of video (2, 8, 3, 32, 32)" in text
    assert "skipped (2 in a row, 2 in all)" in text
    assert "3 non-finite losses in a row (run.max_nonfinite_in_row=3)" in out.stderr


@pytest.mark.timeout(600)
def test_two_process_zero3_with_activation_checkpointing_trains(tmp_path):
    """ZeRO-3 partitions every parameter: one read outside its owner's forward, or behind a
    non-tensor output, is empty in the backward. Train a few steps to prove none is."""
    run = tmp_path / "zero3"
    run.mkdir()
    p = _launch(run, "run.steps=4", "checkpoint.every=0", "deepspeed.zero_stage=3",
                "deepspeed.activation_checkpointing=true", "eval.every=0", "checkpoint.export=false")
    assert _wait(p, run, timeout=420) == 0, _tail(run)
    assert not _shm_left(p), "the run left its shared-memory all-reduce files behind"
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    losses = _losses(run)
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in losses)
