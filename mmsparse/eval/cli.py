"""``mmsparse eval --model DIR --benchmark NAME_OR_MANIFEST``: caption a benchmark, score it, report it.

Benchmarks: a manifest file (captioned and scored with BLEU-1..4, METEOR where Java exists,
ROUGE-L, CIDEr-D against a most-frequent-caption baseline; writes result.json + report.md),
``synthetic[:N]`` (N held-out synthetic clips shaped like the model's training data), or
``longclip[:L1,L2,...]`` (the long-clip benchmark: accuracy of naming a one-second event
against clip length and event position, per model; writes longclip.json/.md/.png). With
``longclip`` several models may be given, as ``--model NAME=DIR`` to label them.

Exit status: 0 done, 2 a wrong model folder, benchmark or argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mmsparse.subcommand import add_subcommand, module_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                   help="a saved model folder (or a run folder with export/); repeat for longclip")
    p.add_argument("--benchmark", required=True, help="a manifest .jsonl, synthetic[:N] or longclip[:L1,L2,...]")
    p.add_argument("--out", default=None, help="report folder (default: eval/<benchmark>)")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the training run's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N clips")
    p.add_argument("--examples", type=int, default=8, help="example captions in the report")
    p.add_argument("--baseline-manifest", default=None,
                   help="training manifest for the most-frequent-caption baseline (default: the run's)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR even where Java exists")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--clips-per-length", type=int, default=8, help="longclip: clips per length")
    p.add_argument("--no-choice", action="store_true", help="longclip: skip the multiple-choice scoring")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="longclip: frame size of the generated clips (default: the first model's training size)")
    p.add_argument("--workers", type=int, default=None,
                   help="longclip: processes writing the clips (default: one per CPU core)")


def _models(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, d = spec.partition("=")
        if not sep:
            d = spec
            p = Path(d)
            name = p.parent.name if p.name == "export" else p.name
        out[name] = d
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from mmsparse.infer import ModelLoadError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = _models(args.model)
    bench = args.benchmark
    out = Path(args.out or Path("eval") / bench.replace(":", "-").replace("/", "_").replace(",", "_"))
    try:
        if bench.split(":", 1)[0] == "longclip" and not Path(bench).is_file():
            from . import longclip
            from .harness import run_synth_spec
            from mmsparse.infer import resolve_model_dir

            arg = bench.partition(":")[2]
            lengths = tuple(int(x) for x in arg.split(",")) if arg else longclip.DEFAULT_LENGTHS
            size = tuple(args.size) if args.size else run_synth_spec(resolve_model_dir(next(iter(models.values()))))["size"]
            summary = longclip.run(models, out, lengths=lengths, clips_per_length=args.clips_per_length,
                                   frames=args.frames, batch=args.batch, device=device, backend=args.backend,
                                   size=size, choice=not args.no_choice, workers=args.workers or os.cpu_count() or 1)
            print(json.dumps(summary, indent=2, default=str))
            print(f"wrote {out / 'longclip.json'}, {out / 'longclip.md'}, {out / 'longclip.png'}", file=sys.stderr)
            return 0
        if len(models) != 1:
            raise ValueError("give one --model for a captioning benchmark (several only for longclip)")
        from .harness import evaluate

        result = evaluate(next(iter(models.values())), bench, out, beam=args.beam, frames=args.frames,
                          batch=args.batch, max_len=args.max_len, device=device, backend=args.backend,
                          limit=args.limit, examples=args.examples, baseline_manifest=args.baseline_manifest,
                          meteor=False if args.no_meteor else None)
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"metrics": result["metrics"], "meteor": result["meteor"],
                      "baseline": result["baseline"]["metrics"], "efficiency": result["efficiency"],
                      "failed": result["failed"]}, indent=2))
    if result["meteor"] != "scored":  # METEOR: null in the JSON above, and why
        from .metrics import NO_JAVA

        why = NO_JAVA if result["meteor"] == "no_java" else "disabled (--no-meteor)"
        print(f"METEOR skipped: {why}", file=sys.stderr)
    print(f"wrote {out / 'result.json'} and {out / 'report.md'}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    add_subcommand(subparsers, "eval", "evaluate a model on a benchmark (metrics, efficiency, report)", __doc__, add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m mmsparse.eval", __doc__, add_arguments, run, argv)
