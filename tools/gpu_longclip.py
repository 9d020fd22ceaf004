#!/usr/bin/env python
"""The long-clip benchmark end to end in one command, inside a wall-clock budget.

    OUT=/path/to/out bash tools/gpu_longclip.sh                 # GPU machine: every pattern
    OUT=/tmp/lc bash tools/gpu_longclip.sh --smoke              # CPU, tiny: proves the pipeline

1. Data: the training and validation needle clips (``longclip.make_train_set``) and the
   benchmark clips (``longclip.make_benchmark``), written once by every CPU core; clips of
   ``--train-frames`` (default 256 to 2,048 frames: with the recipes' 256 sampled frames the
   one-second needle lies in at least one sampled frame), benchmark ``--lengths``.
2. Training: one ``python -m mmsparse.train longclip_<pattern>`` per pattern, all at once,
   each process on one GPU (``CUDA_VISIBLE_DEVICES``, patterns dealt round-robin over the
   GPUs: 4 patterns on 2 GPUs run 2 per GPU), each with ``run.max_minutes`` set to what is left
   of ``--total-minutes`` after the evaluation reserve (``--eval-minutes``), so every run ends
   as a finished run does (checkpoint, export) in time. DataLoader workers share the cores.
3. Evaluation: every exported model scores the benchmark (``longclip.score_model``: caption
   and 24-way multiple choice), split over ``--eval-shards`` processes per model, on the GPUs.
4. Report in ``--out``: ``longclip-<device>-<date>.{md,json,png}`` (accuracy against clip
   length and event position, attention GFLOPs per clip, accuracy per GFLOP; the JSON names
   the GPU, torch, triton and deepspeed versions, the commands and each run's training summary)
   and ``longclip-<device>-<date>-logs.tar.gz`` (training and evaluation logs, metrics,
   curves). A pattern whose training or evaluation failed is listed as failed, with why.

Every size, count and budget is an argument; the defaults are the GPU run (``--smoke`` the CPU
check). Run ``python tools/gpu_longclip.py --help`` for them. Working files (clips, runs) go to
``--work`` (default ``$TMPDIR/mmsparse-longclip``), never into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATTERNS = ("local", "local_global", "local_axial", "dense")
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="report folder (default $OUT)")
    p.add_argument("--work", default=None, help="clips and runs (default $TMPDIR/mmsparse-longclip)")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="recipes longclip_<pattern> to train")
    p.add_argument("--total-minutes", type=float, default=6.5, help="wall-clock budget of the whole command")
    p.add_argument("--eval-minutes", type=float, default=1.25,
                   help="kept free after training for evaluation and the report")
    p.add_argument("--train-clips", type=int, default=1024)
    p.add_argument("--val-clips", type=int, default=32)
    p.add_argument("--train-frames", type=_ints, default=(256, 2048), help="LO,HI frames of training clips")
    p.add_argument("--train-lengths", choices=("range", "doubling"), default="doubling",
                   help="training clip lengths: any in LO..HI, or LO, 2 LO, ... <= HI (default: a few frame "
                        "spacings, so the per-spacing attention layouts are built once and cached)")
    p.add_argument("--lengths", type=_ints, default=(256, 512, 1024, 2048), help="benchmark clip lengths")
    p.add_argument("--clips-per-length", type=int, default=24)
    p.add_argument("--steps", type=int, default=None,
                   help="run.steps (the learning-rate schedule's span; default the recipe's): the runs "
                        "end at the time budget or at this step, whichever comes first")
    p.add_argument("--per-gpu", type=int, default=None, help="training processes per GPU (default: all at once)")
    p.add_argument("--eval-shards", type=int, default=None, help="evaluation processes per model")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="training clips (benchmark clips use their own seeds)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a training config override for every run (repeatable)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check at toy scale: 2 patterns, 16-48-frame clips, 16 sampled frames, fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = p.parse_args(argv)
    if args.smoke:  # only what the caller did not set
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
        smoke = {"--patterns": ("patterns", "local,dense"), "--total-minutes": ("total_minutes", 5.0),
                 "--eval-minutes": ("eval_minutes", 1.5), "--train-clips": ("train_clips", 32),
                 "--val-clips": ("val_clips", 4), "--train-frames": ("train_frames", (16, 48)),
                 "--lengths": ("lengths", (16, 48)), "--clips-per-length": ("clips_per_length", 6),
                 "--eval-batch": ("eval_batch", 4), "--device": ("device", "cpu")}
        for flag, (dest, value) in smoke.items():
            if flag not in given:
                setattr(args, dest, value)
        args.override = ["data.frames=16", "data.batch_size=4", "deepspeed.precision=fp32", "run.threads=1",
                         "optim.warmup_steps=5", "optim.lr=2e-3", *args.override]
    if not args.out:
        p.error("give --out or set OUT")
    return args


# ------------------------------------------------------------------------------------------------
# Machine


def devices(want: str | None) -> tuple[str, list[str]]:
    """(device type, the GPU ids to deal runs over). Leaves CUDA uninitialised here, so the clip
    writers can still be forked."""
    import torch

    if (want or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        return "cpu", []
    n = torch.cuda.device_count()
    if n == 0:
        raise SystemExit("--device cuda but no GPU is visible")
    return "cuda", [str(i) for i in range(n)]


def environment(kind: str, gpus: list[str]) -> tuple[dict, str]:
    """What the report names (device, versions, commit) and the accelerator's name."""
    import torch

    name = torch.cuda.get_device_name(0) if kind == "cuda" else platform.processor() or platform.machine() or "cpu"
    env = {"device": name if kind == "cuda" else f"CPU ({name})", "gpus": len(gpus), "torch": torch.__version__,
           "cuda": torch.version.cuda if kind == "cuda" else None, "python": platform.python_version(),
           "cpu_cores": os.cpu_count()}
    for mod in ("triton", "deepspeed"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as err:  # report what is there, never guess
            env[mod] = f"unavailable ({type(err).__name__})"
    if kind == "cuda":
        env["gpu_names"] = sorted({torch.cuda.get_device_name(int(g)) for g in gpus})
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env, name


def tag(kind: str, gpus: list[str], name: str, smoke: bool) -> str:
    if kind == "cpu":
        return "cpu-smoke" if smoke else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    return slug + (f"x{len(gpus)}" if len(gpus) > 1 else "")


def child_env(gpu: str | None, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # each run is its own single-process group
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


class Job:
    """A child process in its own session (so a kill reaches its DataLoader workers too)."""

    running: list["Job"] = []

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict, deadline: float):
        self.name, self.cmd, self.log, self.deadline = name, cmd, log, deadline
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        self.rc: int | None = None
        self.killed = False
        Job.running.append(self)

    @classmethod
    def kill_all(cls) -> None:
        """End every child still running (this process is being stopped)."""
        for j in cls.running:
            if j.proc.poll() is None:
                os.killpg(j.proc.pid, signal.SIGKILL)

    def poll(self) -> bool:
        """True once finished (killed at its deadline)."""
        if self.rc is None:
            rc = self.proc.poll()
            if rc is None and time.monotonic() > self.deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.killed = True
                rc = self.proc.wait()
            if rc is not None:
                self.rc = rc
                self._fh.close()
        return self.rc is not None

    def tail(self, n: int = 1) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        err = [ln for ln in lines if re.match(r"^(error:|\w*(Error|Exception)\b)", ln.strip())]
        return " / ".join((err or lines)[-n:])[:300] if lines else "(no output)"


def wait_all(jobs: list[Job], what: str) -> None:
    while not all(j.poll() for j in jobs):
        time.sleep(1.0)
    for j in jobs:
        say(f"{what} {j.name}: exit {j.rc}" + (" (killed at its deadline)" if j.killed else ""))


# ------------------------------------------------------------------------------------------------
# Steps


def make_data(args, work: Path, size: tuple[int, int], workers: int) -> tuple[Path, Path, Path]:
    from mmsparse.eval import longclip

    lo, hi = args.train_frames
    train = longclip.make_train_set(work / "data" / "train", args.train_clips, (lo, hi), args.seed, size,
                                    workers=workers, long_lengths=args.train_lengths)
    val = longclip.make_train_set(work / "data" / "val", args.val_clips, (lo, hi), args.seed + 500_000, size,
                                  workers=workers, long_lengths=args.train_lengths)
    bench = longclip.make_benchmark(work / "data" / "bench", args.lengths, args.clips_per_length, size=size,
                                    workers=workers)
    return train, val, bench


def train_all(args, work: Path, manifests: tuple[Path, Path], kind: str, gpus: list[str],
              train_deadline: float) -> dict[str, dict]:
    """Train every pattern (in waves when --per-gpu limits the slots); returns per pattern its run
    folder, exit status, summary and the reason it failed (if it did)."""
    from mmsparse.train.distributed import free_port

    patterns = [p for p in args.patterns.split(",") if p]
    slots = len(patterns) if (kind == "cpu" or not args.per_gpu) else args.per_gpu * len(gpus)
    waves = [patterns[i:i + slots] for i in range(0, len(patterns), slots)]
    cores = os.cpu_count() or 1
    runs: dict[str, dict] = {}
    for w, wave in enumerate(waves):
        left = train_deadline - time.monotonic()
        # this wave's share of what is left; the process start (imports, engine) and its end
        # (final eval, checkpoint, export) come on top of run.max_minutes
        share = left / (len(waves) - w)
        margin = 45.0 if kind == "cuda" else 60.0
        budget = (share - margin) / 60.0
        if budget <= 0.1:
            for p in wave:
                runs[p] = {"dir": None, "failed": f"no time left to train ({left:.0f} s)"}
            continue
        per = max(1, cores // len(wave))
        jobs = []
        ports: set[int] = set()
        for i, pat in enumerate(wave):
            run_dir = work / "runs" / pat
            if run_dir.exists():
                shutil.rmtree(run_dir)
            port = free_port()
            while port in ports:
                port = free_port()
            ports.add(port)
            ov = [f"run.dir={run_dir}", f"run.max_minutes={budget:.3f}", f"data.manifest={manifests[0]}",
                  f"data.val_manifest={manifests[1]}", f"data.num_workers={max(1, per - 1)}",
                  "run.progress=false", "run.tensorboard=false", "run.deterministic=false", "eval.every=0",
                  "eval.batches=2", "eval.captions=8", "checkpoint.every=0"]
            if args.steps:
                ov.append(f"run.steps={args.steps}")
            ov += args.override
            cmd = [sys.executable, "-m", "mmsparse.train", f"longclip_{pat}", *ov]
            env = child_env(gpus[i % len(gpus)] if gpus else None, 2 if kind == "cuda" else 1)
            env["MASTER_PORT"] = str(port)
            jobs.append(Job(pat, cmd, work / "logs" / f"train-{pat}.log", env,
                            deadline=time.monotonic() + share + 30.0))
            say(f"train {pat}: GPU {env.get('CUDA_VISIBLE_DEVICES', '-')}, run.max_minutes={budget:.2f}, "
                f"{max(1, per - 1)} data workers")
        wait_all(jobs, "train")
        for j in jobs:
            run_dir = work / "runs" / j.name
            info: dict = {"dir": str(run_dir), "rc": j.rc, "command": " ".join(j.cmd)}
            summ = run_dir / "summary.json"
            if summ.is_file():
                info["summary"] = json.loads(summ.read_text())
            notes = sorted({ln.split("WARNING")[-1].strip(" :-") for ln in j.log.read_text(errors="replace")
                            .splitlines() if "sparse_attention: auto ->" in ln})
            if notes:
                info["attention_backend_notes"] = notes
            if j.rc != 0 or not (run_dir / "export" / "model.safetensors").is_file():
                info["failed"] = ("killed at its deadline" if j.killed else f"training exited {j.rc}: {j.tail()}")
            runs[j.name] = info
    return runs


def eval_all(args, work: Path, bench: Path, runs: dict[str, dict], kind: str, gpus: list[str],
             deadline: float) -> tuple[dict[str, dict], dict[str, str]]:
    """Score every trained model (shards in parallel); returns results and failures."""
    from mmsparse.eval import longclip

    models = {p: r for p, r in runs.items() if "failed" not in r}
    failed = {p: r["failed"] for p, r in runs.items() if "failed" in r}
    if not models:
        return {}, failed
    cores = os.cpu_count() or 1
    shards = args.eval_shards or max(1, min(8, cores // (2 * len(models))))
    jobs, k = [], 0
    for pat, r in models.items():
        for s in range(shards):
            part = work / "eval" / f"{pat}.{s}.json"
            part.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "score", "--model", str(Path(r["dir"]) / "export"),
                   "--manifest", str(bench), "--shard", f"{s}/{shards}", "--device", kind, "--batch",
                   str(args.eval_batch), "--out", str(part)]
            gpu = gpus[k % len(gpus)] if gpus else None
            k += 1
            jobs.append(Job(f"{pat}.{s}", cmd, work / "logs" / f"eval-{pat}.{s}.log",
                            child_env(gpu, max(1, cores // (shards * len(models)))), deadline))
    say(f"eval: {len(models)} models x {shards} shards")
    wait_all(jobs, "eval")
    results = {}
    for pat, r in models.items():
        parts = [json.loads(p.read_text()) for p in sorted((work / "eval").glob(f"{pat}.*.json"))]
        bad = [j for j in jobs if j.name.startswith(f"{pat}.") and j.rc != 0]
        if not parts:
            failed[pat] = "evaluation failed: " + (bad[0].tail() if bad else "no result")
            continue
        res = longclip.merge_scores(parts)
        res["train"] = {k: r.get("summary", {}).get(k) for k in
                        ("steps", "stopped_by", "seconds", "first_loss", "last_loss", "clips_per_s")}
        if bad:
            res["missing_shards"] = [f"{j.name}: {j.tail()}" for j in bad]
        results[pat] = res
    return results, failed


def write_report(args, out: Path, stem: str, results: dict, failed: dict, runs: dict, env: dict, work: Path,
                 timings: dict, size: tuple[int, int]) -> list[Path]:
    from mmsparse.eval import longclip

    lo, hi = args.train_frames
    missing = {p: r["missing_shards"] for p, r in results.items() if r.get("missing_shards")}
    note = (f"Each pattern trained on {args.train_clips} needle clips of {lo} to {hi} frames ({size[0]}x{size[1]}) "
            f"for the same wall-clock budget (run.max_minutes), all at once on {env['device']} x "
            f"{max(1, env['gpus'])}; "
            f"'train steps' says how far each got ('(time)': stopped by the budget). Benchmark: "
            f"{args.clips_per_length} held-out clips per length.")
    if missing:
        note += f" Evaluation shards missing: {missing}."
    meta = {**env, "date": dt.date.today().isoformat(), "wall_s": round(time.monotonic() - T0, 1),
            "timings_s": timings, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "runs": {p: {k: v for k, v in r.items() if k != "dir"} for p, r in runs.items()}}
    files = list(longclip.report(results, out, title=f"Long-clip benchmark ({env['device']})", note=note,
                                 stem=stem, meta=meta, failed=failed))
    logs = out / f"{stem}-logs.tar.gz"
    with tarfile.open(logs, "w:gz") as tar:
        for f in sorted((work / "logs").glob("*.log")):
            tar.add(f, arcname=f"logs/{f.name}")
        for run in sorted((work / "runs").glob("*")):
            for name in ("config.yaml", "deepspeed_config.json", "metrics.jsonl", "summary.json", "curves.png"):
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}")
    return files + [logs]


def pipeline(args) -> int:
    from mmsparse.train.config import ConfigError, load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "mmsparse-longclip")
    for sub in ("logs", "eval"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    end = T0 + 60.0 * args.total_minutes
    kind, gpus = devices(args.device)
    patterns = [p for p in args.patterns.split(",") if p]
    size = None
    for p in patterns:  # the clips' frame size: the recipes' (one that does not load fails in training)
        try:
            size = tuple(load_config(f"longclip_{p}", args.override).data.synth.size)
            break
        except ConfigError:
            continue
    if size is None:
        raise SystemExit(f"none of the patterns {patterns} has a loadable recipe recipes/longclip_<pattern>.yaml")
    timings: dict[str, float] = {}

    t = time.monotonic()
    train_m, val_m, bench_m = make_data(args, work, size, os.cpu_count() or 1)
    timings["data"] = round(time.monotonic() - t, 1)
    say(f"data: {args.train_clips} + {args.val_clips} training clips, {len(args.lengths)} x "
        f"{args.clips_per_length} benchmark clips in {timings['data']} s ({work / 'data'})")

    env, name = environment(kind, gpus)
    stem = f"longclip-{tag(kind, gpus, name, args.smoke)}-{dt.date.today().isoformat()}"
    say(f"{env['device']} x {max(1, len(gpus))}, torch {env['torch']}, triton {env['triton']}, "
        f"deepspeed {env['deepspeed']}; report {out / stem}.*")

    t = time.monotonic()
    runs = train_all(args, work, (train_m, val_m), kind, gpus, end - 60.0 * args.eval_minutes)
    timings["train"] = round(time.monotonic() - t, 1)
    for p, r in runs.items():
        s = r.get("summary", {})
        say(f"{p}: {s.get('steps')} steps ({s.get('stopped_by')}), loss {s.get('first_loss')} -> "
            f"{s.get('last_loss')}, {s.get('clips_per_s')} clips/s"
            + (f"; FAILED {r['failed']}" if "failed" in r else ""))

    t = time.monotonic()
    results, failed = eval_all(args, work, bench_m, runs, kind, gpus, end - 10.0)
    timings["eval"] = round(time.monotonic() - t, 1)

    files = write_report(args, out, stem, results, failed, runs, env, work, timings, size)
    say("wrote " + ", ".join(str(f) for f in files))
    print((out / f"{stem}.md").read_text())
    return 0 if results and not failed else 1


# ------------------------------------------------------------------------------------------------
# One evaluation shard (a child of the pipeline)


def score(argv) -> int:
    p = argparse.ArgumentParser(prog="gpu_longclip.py score")
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--shard", default="0/1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--audio-backend", default=None, help="default: the training run's")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from mmsparse.eval import longclip

    k, n = (int(x) for x in a.shard.split("/"))
    res = longclip.score_model(a.model, a.manifest, batch=a.batch, device=a.device, shard=(k, n),
                               audio_backend=a.audio_backend)
    tmp = Path(a.out + ".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(a.out)
    print(f"{a.model} shard {a.shard}: {len(res['clips'])} clips in {res['seconds']} s")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped pipeline stops its children
    try:
        return pipeline(args)
    finally:
        Job.kill_all()


if __name__ == "__main__":
    sys.exit(main())
