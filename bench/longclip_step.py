"""Training step of the long-clip benchmark's arms, each alone on the device, against dense.

    python bench/longclip_step.py --arms dense,tiled,tiled_compress --lengths 256,1024,4096 --out bench/results

The model, batch and clips are the long-clip benchmark's (mmsparse/eval/longbench.py BenchSpec):
forward and backward of one batch (bf16 autocast on CUDA), median of --repeats after one
warm-up, one arm at a time. Prints a table (ms and speed-up over dense, the anchor, measured in
the same run) and writes ``longclipstep-<device>-<date>[-<label>].json`` naming the card, torch and
triton. OOM is reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import device_name, environment, out_folder, result_stem, slug  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="dense,tiled,tiled_compress")
    p.add_argument("--lengths", default="256,1024,4096", help="clip lengths in frames")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=None, help="clips a step (default: the benchmark's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default="")
    p.add_argument("--out", default=None, help="result folder (default bench/results)")
    args = p.parse_args(argv)

    import torch

    from mmsparse.eval import longbench as lb

    arms = [a for a in args.arms.split(",") if a]
    try:
        lb.check_arms(arms)
        lengths = tuple(int(x) for x in args.lengths.split(",") if x)
    except ValueError as err:
        raise SystemExit(f"--arms / --lengths: {err}")
    if "dense" not in arms:
        arms.insert(0, "dense")  # the anchor
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.repeats < 1 or (args.batch is not None and args.batch < 1):
        raise SystemExit(f"--repeats and --batch must be >= 1, got {args.repeats}, {args.batch}")
    spec = lb.BenchSpec(eval_lengths=lengths)
    if args.batch:
        spec.batch = args.batch
    ms = {}
    for arm in arms:
        ms[arm] = lb.time_steps(spec, arm, device, repeats=args.repeats)
        print(f"timed {arm}: {ms[arm]}", flush=True)
    rows = []
    for arm in arms:
        speed = {n: (ms["dense"][str(n)] / ms[arm][str(n)]) if ms["dense"][str(n)] and ms[arm][str(n)] else None
                 for n in lengths}
        frac = lb.flops_per_step(spec, arm)
        rows.append({"arm": arm, "config": lb.ARMS[arm], "step_ms": ms[arm],
                     "speedup_over_dense": {str(n): s for n, s in speed.items()},
                     "attention_fraction_of_dense": {
                         str(n): frac["per_length"][str(n)]["attention"] / frac["per_length"][str(n)]["attention_dense"]
                         for n in lengths if str(n) in frac["per_length"]}})
    head = "| arm | " + " | ".join(f"ms at {n}" for n in lengths) + " | " + " | ".join(f"x dense at {n}" for n in lengths) + " |"
    print(head + "\n|" + "---|" * (1 + 2 * len(lengths)))
    for r in rows:
        cells = ["OOM" if r["step_ms"][str(n)] is None else f"{r['step_ms'][str(n)]:.1f}" for n in lengths]
        cells += ["-" if r["speedup_over_dense"][str(n)] is None else f"{r['speedup_over_dense'][str(n)]:.2f}x"
                  for n in lengths]
        print(f"| {r['arm']} | " + " | ".join(cells) + " |")
    stem = result_stem(out_folder(args.out), "longclipstep", slug(device_name(device)), args.label)
    result = {"env": environment(device), "batch": spec.batch, "lengths": list(lengths), "repeats": args.repeats,
              "anchor": "dense (SDPA) in the same run", "model": spec.model, "rows": rows}
    path = stem.with_name(stem.name + ".json")
    path.write_text(json.dumps(result, indent=1))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
