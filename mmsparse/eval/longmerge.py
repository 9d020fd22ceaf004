"""Merge the long-clip runs a GPU call brought back into a benchmark folder of the same spec.

    python -m mmsparse.eval.longmerge $OUT/runs-v5e.tgz [more.tgz ...] \\
        --into bench/results/longclip-runs/e895aa2dd25a [--driver-log $OUT/log-v5e.txt]

An archive is what ``tools/device_longbench.sh`` tars to $OUT: ``spec.json``, ``costs.json``,
``runs/`` (each finished run's JSON, its metrics JSONL and log) and, when the call made them,
``backends.json`` and ``timing.json``. The folder is a benchmark folder (``longdriver --out``)
or the committed copy of one; the report is then written from it with ``longdriver
--report-only --from <folder>/runs``.

Everything is checked before anything is written, and a refusal names the file and the reason:

- the archive's spec is the folder's (the same spec key): runs of two specs never mix;
- a run is taken when its JSON says it finished under that spec; the metrics and log of a run
  that did not finish (a call cut by its limit) stay out, so the finished run can come later;
- a file the folder holds already is kept when the archive's copy is identical, and refused
  when it differs (two runs of one arm, seed and budget are not merged silently);
- each arm's costs in the archive are recomputed here (``longbench.flops_per_step``) and must
  match; arms the folder lacks are added to its costs.json;
- the backend checks and step timings are added for the runs and arms the folder lacks; an
  entry that differs from the folder's is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import tarfile
from pathlib import Path, PurePosixPath

from mmsparse.fileio import atomic_write_text

from . import longbench as lb


class MergeError(ValueError):
    """An archive that cannot be merged into the folder: what and why."""


def _read_archive(path: Path) -> dict[str, bytes]:
    """{member name: bytes} of the regular files of a runs archive; names checked to stay inside."""
    if not path.is_file():
        raise MergeError(f"{path}: no such archive")
    try:
        with tarfile.open(path) as tar:
            files = {}
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts:
                    raise MergeError(f"{path}: member {m.name!r} points outside the folder")
                files[str(name)] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise MergeError(f"{path}: not a readable tar archive ({err})") from err
    return files


def _json(data: bytes, where: str):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MergeError(f"{where}: not JSON ({err})") from err


def _same_number(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_number(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def plan_merge(archive: Path, folder: Path) -> tuple[dict[Path, bytes], dict[str, list[str]]]:
    """({folder file: new bytes}, what the archive adds: {"runs", "arms", "checks", "timed"}).
    Writes nothing; raises MergeError naming the file and the reason."""
    files = _read_archive(archive)
    for name, data in files.items():
        try:
            data.decode()
        except UnicodeDecodeError:
            raise MergeError(f"{archive}:{name}: not text; an archive holds run JSON, metrics and logs only")
    where = lambda name: f"{archive}:{name}"  # noqa: E731
    if "spec.json" not in files:
        raise MergeError(f"{archive}: no spec.json (not a tools/device_longbench.sh archive)")
    spec = lb.BenchSpec.from_dict(_json(files["spec.json"], where("spec.json")))
    own_spec = folder / "spec.json"
    if not own_spec.is_file():
        raise MergeError(f"{own_spec}: missing; the folder must be a benchmark folder (longdriver --out)")
    mine = lb.BenchSpec.from_dict(json.loads(own_spec.read_text()))
    if mine.key() != spec.key():
        raise MergeError(f"{archive}: its runs are of spec {spec.key()}, the folder's of {mine.key()}")
    writes: dict[Path, bytes] = {}
    added: dict[str, list[str]] = {"runs": [], "arms": [], "checks": [], "timed": []}

    def put(rel: str, data: bytes) -> None:
        dest = folder / rel
        if dest.is_file():
            if dest.read_bytes() != data:
                raise MergeError(f"{dest}: the folder's copy differs from {where(rel)}; not merged")
            return
        writes[dest] = data

    finished, run_arms = [], set()
    for name, data in sorted(files.items()):
        p = PurePosixPath(name)
        if p.parent == PurePosixPath("runs") and p.suffix == ".json":
            run = _json(data, where(name))
            if run.get("spec_key") == spec.key():
                finished.append(p.stem)
                run_arms.add(run.get("arm"))
                if not (folder / name).is_file():
                    added["runs"].append(p.stem)
                put(name, data)
    for name, data in sorted(files.items()):
        p = PurePosixPath(name)
        if p.parts[0] != "runs" or p.suffix == ".json":
            continue
        stem = p.name.split(".")[0]
        if (p.name.endswith(".metrics.jsonl") or p.suffix == ".log") and stem not in finished:
            continue  # a run the limit cut: its finished run comes in a later archive
        put(name, data)

    costs_file = folder / "costs.json"
    costs = json.loads(costs_file.read_text()) if costs_file.is_file() else {}
    theirs = _json(files["costs.json"], where("costs.json")) if "costs.json" in files else {}
    for arm, cost in sorted(theirs.items()):
        if arm not in lb.ARMS:
            raise MergeError(f"{where('costs.json')}: unknown arm {arm!r}")
        here = lb.flops_per_step(spec, arm)
        if not _same_number(json.loads(json.dumps(here)), cost):
            raise MergeError(f"{where('costs.json')}: the costs of {arm!r} are not what this code counts for the spec")
        if arm in costs and not _same_number(costs[arm], cost):
            raise MergeError(f"{costs_file}: the costs of {arm!r} differ from {where('costs.json')}")
        if arm not in costs:
            costs[arm] = cost
            added["arms"].append(arm)
    missing = sorted(run_arms - set(costs))
    if missing:
        raise MergeError(f"{archive}: runs of {missing} but no costs for them in either costs.json")
    if added["arms"]:
        writes[costs_file] = json.dumps(costs).encode()

    checks_file = folder / "backends.json"
    checks = json.loads(checks_file.read_text()) if checks_file.is_file() else []
    by_run = {c["run"]: c for c in checks}
    for c in _json(files["backends.json"], where("backends.json")) if "backends.json" in files else []:
        if c["run"] in by_run:
            if by_run[c["run"]] != c:
                raise MergeError(f"{checks_file}: the backend check of {c['run']} differs from {where('backends.json')}")
            continue
        checks.append(c)
        by_run[c["run"]] = c
        added["checks"].append(c["run"])
    if added["checks"]:
        writes[checks_file] = json.dumps(checks, indent=1).encode()

    timing_file = folder / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    for arm, ms in (_json(files["timing.json"], where("timing.json")) if "timing.json" in files else {}).items():
        if arm in timing:
            if timing[arm] != ms:
                raise MergeError(f"{timing_file}: the step times of {arm!r} differ from {where('timing.json')}")
            continue
        timing[arm] = ms
        added["timed"].append(arm)
    if added["timed"]:
        writes[timing_file] = json.dumps(timing).encode()
    return writes, added


def merge(archives: list[Path], folder: Path, driver_logs: list[Path] = ()) -> dict[str, list[str]]:
    """Merge every archive into `folder` (module doc); all are checked before any is written.
    `driver_logs` (the driver's output, $OUT/log-LABEL.txt) are copied to runs/logs/ under
    their names, refused where a different file of that name is there."""
    folder = Path(folder)
    total: dict[str, list[str]] = {"runs": [], "arms": [], "checks": [], "timed": []}
    for archive in archives:
        writes, added = plan_merge(Path(archive), folder)
        for dest, data in writes.items():  # JSON, JSONL and logs: text
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dest, data.decode())
        for k, v in added.items():
            total[k] += v
    for log in driver_logs:
        log = Path(log)
        if not log.is_file():
            raise MergeError(f"{log}: no such driver log")
        dest = folder / "runs" / "logs" / log.name
        if dest.is_file() and dest.read_bytes() != log.read_bytes():
            raise MergeError(f"{dest}: a different driver log of that name is there; rename {log}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest, log.read_text())
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archives", nargs="+", type=Path, help="runs-LABEL.tgz of tools/device_longbench.sh")
    p.add_argument("--into", required=True, type=Path, help="the benchmark folder (with its spec.json)")
    p.add_argument("--driver-log", action="append", default=[], type=Path,
                   help="the driver's output of the call ($OUT/log-LABEL.txt), kept in runs/logs/")
    args = p.parse_args(argv)
    try:
        for a in args.archives:  # every archive checked before any is written
            plan_merge(a, args.into)
        added = merge(args.archives, args.into, args.driver_log)
    except MergeError as err:
        raise SystemExit(f"longmerge: {err}")
    for k in ("runs", "arms", "checks", "timed"):
        print(f"{k}: {', '.join(added[k]) or '-'}")
    print(f"report: python -m mmsparse.eval.longdriver --report-only --out <new folder> --from {args.into / 'runs'} "
          f"(with the spec's --steps and --eval-lengths)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
