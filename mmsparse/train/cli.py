"""``mmsparse train RECIPE [key=value ...]``: the train sub-command (also ``python -m mmsparse.train``).

Under the deepspeed launcher (``deepspeed --num_gpus N --module mmsparse.train RECIPE ...``) every
process runs this same entry point; the launcher's ``--local_rank=K`` argument is accepted and
ignored (the rank comes from the environment).
"""

from __future__ import annotations

import argparse
import json
import sys

from mmsparse.subcommand import add_subcommand, module_main

EXIT_CONFIG, EXIT_OOM, EXIT_NONFINITE, EXIT_CHECKPOINT = 2, 3, 4, 5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe path or a name in recipes/ (e.g. tiny_cpu)")
    # REMAINDER, so options may follow the overrides (the flags found there are taken out in run)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="dotted overrides of the config tree, e.g. optim.lr=3e-4 data.frames=128")
    p.add_argument("--resume", action="store_true",
                   help="continue from <run.dir>/checkpoints/latest; on a complete run, say so and change nothing. "
                        "Values that differ from the checkpoint's config are refused, except run.steps, "
                        "run.max_minutes, logging, eval.* and checkpoint.*")
    p.add_argument("--init-from", metavar="RUN", default=None,
                   help="start a new run (step 0, fresh optimizer) from the weights and tokenizer of another "
                        "run: its folder or its export folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--print-deepspeed-config", action="store_true",
                   help="print the generated DeepSpeed JSON and exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --print-deepspeed-config: the process count to size batches for "
                        "(default: $WORLD_SIZE or 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _flags_among_overrides(args: argparse.Namespace) -> None:
    rest, it = [], iter(args.overrides)
    for item in it:
        if item in ("--resume", "--print-config", "--print-deepspeed-config"):
            setattr(args, item[2:].replace("-", "_"), True)
        elif item == "--world-size":
            args.world_size = int(next(it))
        elif item == "--init-from":
            args.init_from = next(it, None)
        elif item.startswith("--init-from="):
            args.init_from = item.split("=", 1)[1]
        elif item.startswith("--world-size="):
            args.world_size = int(item.split("=", 1)[1])
        elif item.startswith(("--local_rank", "--local-rank")):
            if "=" not in item:
                next(it, None)
        else:
            rest.append(item)
    args.overrides = rest


def run(args: argparse.Namespace) -> int:
    import os

    _flags_among_overrides(args)
    import yaml

    from .config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.print_deepspeed_config:
            from .deepspeed_config import deepspeed_config

            world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
            print(json.dumps(deepspeed_config(cfg, world), indent=2))
            return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG

    from .checkpoint import CheckpointError
    from .loop import NonFiniteLoss, TrainOOM, train
    from .resume import ResumeMismatch, init_source

    if args.init_from is not None:
        try:
            if args.resume:
                raise ValueError("--resume continues a run and --init-from starts a new one: pass one of them")
            init_source(args.init_from)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_CONFIG
    exit_codes = ((ConfigError, EXIT_CONFIG), (ResumeMismatch, EXIT_CONFIG), (TrainOOM, EXIT_OOM),
                  (NonFiniteLoss, EXIT_NONFINITE), (CheckpointError, EXIT_CHECKPOINT))
    try:
        summary = train(cfg, resume=args.resume, recipe=args.recipe, overrides=args.overrides,
                        init_from=args.init_from)
    except tuple(cls for cls, _ in exit_codes) as err:
        print(f"error: {err}", file=sys.stderr)
        return next(code for cls, code in exit_codes if isinstance(err, cls))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items()}, indent=2))
    return 0


def register(subparsers) -> None:
    add_subcommand(subparsers, "train", "train a recipe (DeepSpeed; CPU with gloo when no GPU)", __doc__, add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m mmsparse.train", __doc__, add_arguments, run, argv)
