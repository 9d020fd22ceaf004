"""The two helpers every sub-command module uses (train, caption, eval, data): one parser
description serves `mmsparse <job>` and `python -m mmsparse.<job>`. A bottom-layer module, so
the sub-command modules need not import the `mmsparse` command (mmsparse/cli.py) above them."""

from __future__ import annotations

import argparse


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
