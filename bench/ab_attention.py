"""Same-run A/B of the Triton attention kernels of two (or more) source trees on one card.

    python bench/ab_attention.py --tree old=/tmp/old --tree new=. --only A1,A3,A5,dense --rounds 2

Each tree's own ``bench/attention.py`` runs the selected GPU workloads with the triton backend
only (no anchors, no FlexAttention: they do not change between trees) in a fresh process, the
trees taking turns round by round so that drift of the card shows as spread, not as a
difference. A tree is a checkout (or an export) whose ``mmsparse`` imports from its root
(an older tree with a top-level ``kernels/`` needs the link ``mmsparse/kernels -> ../kernels``).
Prints one table (median fwd+bwd ms over the rounds, each tree against the first) and writes
``attention-<device>-<date>-<label>.{json,md}`` (``bench/common.py`` naming, never overwriting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.common import RESULTS, environment, out_folder, result_stem, slug  # noqa: E402

# run in the tree's own process: its bench.attention, its kernels
CHILD = r"""
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
import bench.attention as A
only = set(sys.argv[2].split(","))
rows = []
for wl in A.gpu_workloads():
    if wl.id in only or wl.name in only:
        rows += A.run_workload(dataclasses.replace(wl, anchors=()), "cuda", ["triton"], int(sys.argv[3]))
print("ROWS" + json.dumps(rows))
"""


def run_tree(path: Path, only: str, reps: int) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), only, str(reps)], capture_output=True, text=True,
                          cwd=path, env=_env(path))
    sys.stderr.write(proc.stderr[-2000:])
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"tree {path}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[4:])


def _env(tree: Path) -> dict:
    """This environment with PYTHONPATH leading to `tree` and to no other mmsparse checkout."""
    import os

    keep = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e and not (Path(e) / "mmsparse").is_dir()]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *keep])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH", help="a source tree (twice or more)")
    p.add_argument("--only", default="A1,A3,A5,dense", help="workload ids or names (bench/attention.py)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--label", default="ab")
    args = p.parse_args(argv)
    trees = {}
    for item in args.tree:
        name, _, path = item.partition("=")
        if not name or not path or not (Path(path) / "bench" / "attention.py").is_file():
            p.error(f"--tree {item!r}: expected NAME=PATH of a tree with bench/attention.py")
        trees[name] = Path(path).resolve()
    if len(trees) < 2 or args.rounds < 1:
        p.error("give at least two --tree and --rounds >= 1")
    out = out_folder(args.out)
    times: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for name, path in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
            for row in run_tree(path, args.only, args.reps):
                key = (row["id"], row["workload"])
                times.setdefault(key, {}).setdefault(name, []).append(row.get("fwd_bwd_ms") or float("nan"))
            print(f"round {r + 1}: {name} done", flush=True)
    names = list(trees)
    header = ("| id | workload | " + " | ".join(f"{n} fwd+bwd ms (rounds)" for n in names) + " | "
              + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |")
    lines = [header, "|---" * (2 + 2 * len(names) - 1) + "|"]
    table = []
    for (wid, wname), per in times.items():
        med = {n: statistics.median(per.get(n, [float("nan")])) for n in names}
        lines.append(f"| {wid} | {wname} | " + " | ".join(
            f"{med[n]:.3f} ({', '.join(f'{t:.3f}' for t in per.get(n, []))})" for n in names) + " | "
            + " | ".join(f"{med[n] / med[names[0]]:.3f}" for n in names[1:]) + " |")
        table.append({"id": wid, "workload": wname, "fwd_bwd_ms": per, "median_ms": med})
    print("\n".join(lines))
    env = environment("cuda")
    stem = result_stem(out, "attention", slug(env["device"]), args.label, env["date"], suffixes=(".json", ".md"))
    Path(f"{stem}.json").write_text(json.dumps(dict(env, trees=names,
                                                    rounds=args.rounds, reps=args.reps, rows=table), indent=1))
    Path(f"{stem}.md").write_text(f"# Triton kernels A/B: {env['device']}\n\ntorch {env['torch']}, triton "
                                  f"{env['triton']}, {env['date']}; trees " + ", ".join(names)
                                  + f"; {args.rounds} rounds, trees in turn\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
