"""The `mmsparse` command: one sub-command per job, each registered by the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

# (sub-command, module exposing `register(subparsers)`); a module missing its optional parts
# still leaves the other sub-commands working.
_COMMANDS = (
    ("viz", "mmsparse.attention.viz"),
    ("data", "mmsparse.data.cli"),
    ("train", "mmsparse.train.cli"),
    ("caption", "mmsparse.infer.cli"),
    ("eval", "mmsparse.eval.cli"),
)


def add_subcommand(subparsers, name: str, help: str, doc: str | None, add_arguments, run) -> None:
    """Register sub-command `name`: its arguments come from add_arguments(parser), and
    run(args) -> exit code does the work."""
    p = subparsers.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def module_main(prog: str, doc: str | None, add_arguments, run, argv: list[str] | None = None) -> int:
    """The same job as `python -m <module>`, without the `mmsparse` front."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for _name, module in _COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
