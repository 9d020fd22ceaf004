"""Run the long-clip benchmark v2: every (arm, seed, budget) run, then the report.

    python -m mmsparse.eval.longdriver --out runs/longbench --arms dense,tiled,tiled_compress \\
        --seeds 0,1,2 --budgets steps,flops --parallel 6           # GPU: runs side by side
    python -m mmsparse.eval.longdriver --smoke --out /tmp/lb         # CPU: the harness end to end
    python -m mmsparse.eval.longdriver --report-only --out runs/longbench --from more/runs

Runs go to ``--out/runs`` as one JSON each (``mmsparse.eval.longbench.run_one``); a run already
there is skipped, so a killed driver is rerun with the same arguments and resumes, and seeds run
at different times (or on different machines) are merged by pointing ``--from`` at their run
folders. The report (``longreport``) is written as ``longclip-<device>-<date>-<label>.*`` in
``--out`` (``--results`` moves it, e.g. to bench/results). ``--parallel`` runs that many runs
at once as separate processes on the one GPU (small models leave most of it idle).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import longbench as lb
from . import longreport as lr


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmsparse bench longclip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="benchmark folder (runs/ and the report)")
    p.add_argument("--arms", default="dense,tiled,tiled_compress", help=f"comma list of {sorted(lb.ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="steps,flops", help=f"comma list of {lb.BUDGETS}")
    p.add_argument("--steps", type=int, default=None, help="the equal-steps budget (default: the spec's)")
    p.add_argument("--clips", type=int, default=None, help="eval clips per task and length")
    p.add_argument("--eval-lengths", default=None, help="comma list of frames (default: the spec's)")
    p.add_argument("--train-lengths", default=None, help="comma list of frames (default: the spec's)")
    p.add_argument("--sparse-lengths", default=None,
                   help="comma list of frames the sparse arms also train on in the last phase (dense does not)")
    p.add_argument("--spec", default=None, help="a JSON file of BenchSpec fields overriding the defaults")
    p.add_argument("--smoke", action="store_true", help="the CPU-sized spec (harness check, not accuracy)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (separate processes)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--backend", default="auto", help="sparse attention backend of the models")
    p.add_argument("--from", dest="extra", action="append", default=[], help="more run folders to merge")
    p.add_argument("--report-only", action="store_true", help="merge the finished runs and write the report")
    p.add_argument("--no-timing", action="store_true",
                   help="skip timing each arm's training step alone on the device (timing.json)")
    p.add_argument("--timing", default=None, metavar="JSON",
                   help="step times from bench/longclip_step.py (its JSON) instead of timing each arm here; "
                        "its batch must be the spec's, and it must cover the eval lengths")
    p.add_argument("--label", default="v2", help="report name label")
    p.add_argument("--results", default=None, help="where the report goes (default --out)")
    p.add_argument("--check-backends", default=None, metavar="B1,B2",
                   help="rescore every finished sparse run under these backends (e.g. reference,triton) at the "
                        "shortest eval length; the answers must agree (backends.json, in the report)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: arm,seed,budget in this process
    return p.parse_args(argv)


def make_spec(args) -> lb.BenchSpec:
    spec = lb.BenchSpec(**lb.SMOKE) if args.smoke else lb.BenchSpec()
    d = spec.to_dict()
    if args.spec:
        try:
            d.update(json.loads(Path(args.spec).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"--spec {args.spec}: not a readable JSON file ({err})")
    for key, val in (("steps", args.steps), ("clips", args.clips)):
        if val is not None:
            if val < 1:
                raise SystemExit(f"--{key} must be >= 1, got {val}")
            d[key] = val
    for key, val in (("eval_lengths", args.eval_lengths), ("train_lengths", args.train_lengths),
                     ("sparse_lengths", args.sparse_lengths)):
        if val:
            try:
                d[key] = [int(x) for x in _csv(val)]
            except ValueError:
                raise SystemExit(f"--{key.replace('_', '-')} must be a comma list of frame counts, got {val!r}")
    try:
        spec = lb.BenchSpec.from_dict(d)
    except TypeError as err:
        raise SystemExit(f"--spec: {err} (fields: {sorted(lb.BenchSpec().to_dict())})")
    import numpy as np

    for n in (*spec.all_train_lengths(), *spec.eval_lengths):
        for task in lb.lt.TASKS:
            try:
                lb.lt.plan(task, n, np.random.default_rng(0), spec.task)
            except ValueError as err:
                raise SystemExit(f"length {n}: {err}")
    return spec


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    arms, budgets = _csv(args.arms), _csv(args.budgets)
    try:
        lb.check_arms(arms)
    except ValueError as err:
        raise SystemExit(f"--arms: {err}")
    if set(budgets) - set(lb.BUDGETS):
        raise SystemExit(f"--budgets: unknown {sorted(set(budgets) - set(lb.BUDGETS))}; expected {lb.BUDGETS}")
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        raise SystemExit(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    if args.check_backends:
        _check_backend_names(args.check_backends, device)
    out = Path(args.out)
    runs = out / "runs"
    spec = make_spec(args)
    (out / "spec.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    if args.one:
        arm, seed, budget = args.one.split(",")
        costs = json.loads((out / "costs.json").read_text())
        lb.run_one(spec, arm, int(seed), budget, runs, device, costs, args.backend, progress=False)
        return 0
    if not args.report_only:
        costs = {a: lb.flops_per_step(spec, a) for a in sorted(set(arms) | {"dense"})}
        (out / "costs.json").write_text(json.dumps(costs))
        jobs = [(a, s, b) for s in seeds for a in arms for b in budgets if not (a == "dense" and b == "flops")]
        _run_all(jobs, args, spec, costs, device, runs)
    timing_file = out / "timing.json"
    saved = _beside(out, args.extra, "timing.json")
    timing = json.loads(saved.read_text()) if saved else {}
    if args.timing:  # kept beside the runs, where a later --from merge finds it
        timing.update(step_timing(args.timing, spec))
        out.mkdir(parents=True, exist_ok=True)
        timing_file.write_text(json.dumps(timing))
    if not args.report_only and not args.no_timing:
        for arm in arms:  # after the runs, one arm at a time: nothing else on the device
            if arm not in timing:
                timing[arm] = lb.time_steps(spec, arm, device)
                timing_file.write_text(json.dumps(timing))
                print(f"timed {arm}: {timing[arm]} ms a step", flush=True)
    folders = ([runs] if runs.is_dir() else []) + list(args.extra)  # --report-only may merge --from alone
    if not folders:
        raise SystemExit(f"no runs to report: {runs} does not exist and no --from was given")
    report = lr.merge(folders, spec.key(), timing)
    if args.check_backends:
        report["backend_checks"] = _check_backends(args, spec, runs, device, out)
    elif saved := _beside(out, args.extra, "backends.json"):  # checks of an earlier invocation on these runs
        report["backend_checks"] = json.loads(saved.read_text())
    stem = f"longclip-{_slug(report.get('device') or device)}-{dt.date.today().isoformat()}-{args.label}"
    meta = _versions(report, lb.software())
    try:
        paths = lr.write(report, args.results or out, stem, meta=meta)
    except FileExistsError as err:
        raise SystemExit(f"{err} (--label)")
    print("\n".join(map(str, paths)))
    return 0


def _run_all(jobs, args, spec, costs, device, runs: Path) -> None:
    todo = [j for j in jobs if not _done(runs / f"{j[0]}-s{j[1]}-{j[2]}.json", spec)]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already finished", flush=True)
    if args.parallel <= 1:
        for arm, seed, budget in todo:
            t0 = time.perf_counter()
            lb.run_one(spec, arm, seed, budget, runs, device, costs, args.backend)
            print(f"done {arm} s{seed} {budget} in {time.perf_counter() - t0:.0f} s", flush=True)
        return
    base = [sys.executable, "-m", "mmsparse.eval.longdriver", "--out", args.out, "--device", device,
            "--backend", args.backend]
    if args.smoke:
        base.append("--smoke")
    for flag, val in (("--spec", args.spec), ("--steps", args.steps), ("--clips", args.clips),
                      ("--eval-lengths", args.eval_lengths), ("--train-lengths", args.train_lengths),
                      ("--sparse-lengths", args.sparse_lengths)):
        if val is not None:
            base += [flag, str(val)]
    logs = runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    live: list[tuple[subprocess.Popen, tuple, float]] = []
    failed = []
    # longest runs first (equal-FLOPs sparse runs take the most steps)
    todo.sort(key=lambda j: -lb.steps_for(spec, j[0], j[2], costs)[0])
    while todo or live:
        while todo and len(live) < args.parallel:
            job = todo.pop(0)
            log = open(logs / f"{job[0]}-s{job[1]}-{job[2]}.log", "w")
            proc = subprocess.Popen(base + ["--one", ",".join(map(str, job))], stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            live.append((proc, job, time.perf_counter()))
        time.sleep(2)
        for item in list(live):
            proc, job, t0 = item
            if proc.poll() is not None:
                live.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {logs})"
                if proc.returncode:
                    failed.append(job)
                print(f"{status} {job[0]} s{job[1]} {job[2]} in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print(f"{len(failed)} runs failed: {failed}; the report merges the finished ones", flush=True)


def _check_backend_names(text: str, device: str) -> list[str]:
    """The backends of --check-backends, refused before any run: two or more known names, and
    only those that run on `device` (triton and flash need CUDA)."""
    from mmsparse.kernels.options import BACKENDS

    backends = _csv(text)
    if len(backends) < 2:
        raise SystemExit(f"--check-backends needs two or more backends, got {text!r}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"--check-backends: unknown {unknown}; expected names from {BACKENDS}")
    cuda_only = [b for b in backends if b in ("triton", "flash")]
    if cuda_only and not str(device).startswith("cuda"):
        raise SystemExit(f"--check-backends: {cuda_only} need a CUDA device, and this run is on {device!r}")
    return backends


def _check_backends(args, spec: lb.BenchSpec, runs: Path, device, out: Path) -> list[dict]:
    backends = _check_backend_names(args.check_backends, device)
    checks = []
    for run in sorted(runs.glob("*-s*-*.json")):
        if _done(run, spec) and not run.name.startswith("dense-"):
            checks.append(lb.check_backends(run, backends, min(spec.eval_lengths), spec.val_clips, device, spec))
            print(f"backends {run.stem}: " + json.dumps({k: v for k, v in checks[-1].items() if "_vs_" in k}),
                  flush=True)
    (out / "backends.json").write_text(json.dumps(checks, indent=1))
    return checks


def step_timing(path: str | Path, spec: lb.BenchSpec) -> dict[str, dict[str, float | None]]:
    """{arm: {length: ms}} from a ``bench/longclip_step.py`` result (the same model and step as
    ``longbench.time_steps``, each arm alone on the card); SystemExit naming the file when it is
    not one, or when its batch or lengths do not match `spec`."""
    try:
        data = json.loads(Path(path).read_text())
        rows, batch, lengths = data["rows"], data["batch"], set(data["lengths"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"--timing {path}: not a bench/longclip_step.py result ({err!r})")
    if batch != spec.batch:
        raise SystemExit(f"--timing {path}: timed at batch {batch}, the spec trains at batch {spec.batch}")
    # results without the field timed the only model the bench then built: BASE_MODEL as it was
    # before it named its audio normalisation (which a step's time does not depend on)
    legacy = {k: v for k, v in lb.BASE_MODEL.items() if k != "audio_norm"}
    if json.loads(json.dumps(data.get("model", legacy))) != json.loads(json.dumps(spec.model)):
        raise SystemExit(f"--timing {path}: timed another model than the spec's (its 'model' field)")
    missing = sorted(set(spec.eval_lengths) - lengths)
    if missing:
        raise SystemExit(f"--timing {path}: no times at eval lengths {missing} (it has {sorted(lengths)})")
    stale = [r["arm"] for r in rows if lb.ARMS.get(r["arm"]) != r.get("config")]
    if stale:  # an arm redefined since: its time is not this arm's
        print(f"--timing {path}: arms {stale} were timed with other configs than longbench.ARMS has now; "
              "their times are left out", flush=True)
    return {r["arm"]: {str(n): r["step_ms"][str(n)] for n in spec.eval_lengths} for r in rows if r["arm"] not in stale}


def _beside(out: Path, extra: list[str], name: str) -> Path | None:
    """``out/name``, else the first ``name`` beside a --from run folder (its benchmark folder)."""
    for folder in (out, *(Path(x).parent for x in extra)):
        if (folder / name).is_file():
            return folder / name
    return None


def _done(path: Path, spec: lb.BenchSpec) -> bool:
    try:
        return json.loads(path.read_text()).get("spec_key") == spec.key()
    except (OSError, json.JSONDecodeError):
        return False


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _versions(report: dict, here: dict) -> dict:
    """The report's version line: the runs' versions when they recorded one set (``here``'s
    commit added where the report was merged by other code), else ``here``'s, the merging
    process's, said to be so."""
    runs = report.get("software") or []
    if len(runs) == 1:
        meta = {k: v for k, v in runs[0].items() if v is not None}
        if here.get("commit") != runs[0].get("commit"):
            meta["report merged at commit"] = here.get("commit")
        return meta
    if len(runs) > 1:
        return {"runs made with": " | ".join(", ".join(f"{k} {v}" for k, v in r.items() if v is not None)
                                             for r in runs)}
    return {**{k: v for k, v in here.items() if v is not None},
            "versions": "of the process that merged the report (the runs do not record theirs)"}


if __name__ == "__main__":
    raise SystemExit(main())
