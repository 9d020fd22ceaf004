"""The `mmsparse` command: one sub-command per job, each registered by the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# (sub-command, module exposing `register(subparsers)`); a module missing its optional parts
# still leaves the other sub-commands working.
_COMMANDS = (
    ("viz", "mmsparse.attention.viz"),
    ("data", "mmsparse.data.cli"),
    ("train", "mmsparse.train.cli"),
    ("caption", "mmsparse.infer.cli"),
    ("eval", "mmsparse.eval.cli"),
)


# `mmsparse bench NAME ...` runs bench/NAME.py of the repository checkout: the benchmarks live
# beside their committed results, outside the package, so they need the checkout an editable
# install (`pip install -e .`) points at.
BENCHMARKS = {
    "attention": "kernel workloads A1-A6 and dense, every backend beside the SDPA anchors",
    "model": "E1: training steps of the base captioner, sparse against dense",
    "data": "E3: data loading, decord against PyAV, clips/s and memory",
    "infer": "E4: captioning inference (batch 8, beam 4), sparse against dense: clips/s, latency, memory",
    "longclip": "E5: long-clip quality v2, sparse schedules against dense (trains and scores; in the package)",
    "longclip_step": "E5 speed: each long-clip arm's training step alone on the device, against dense",
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, argv: list[str], root: Path = REPO_ROOT) -> int:
    """Run ``bench/<name>.py``'s ``main(argv)`` from the checkout at ``root``, imported as
    ``bench.<name>`` (so the processes it spawns can import it too)."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {name!r}")
    if name == "longclip":  # part of the package: runs from any install
        from mmsparse.eval.longdriver import main as longclip

        return int(longclip(argv) or 0)
    return int(bench_module(name, root).main(argv) or 0)


def bench_module(name: str, root: Path = REPO_ROOT):
    """``bench/<name>.py`` of the checkout at ``root``, imported as ``bench.<name>``."""
    if name not in BENCHMARKS or name == "longclip":
        raise ValueError(f"benchmark script must be one of {sorted(set(BENCHMARKS) - {'longclip'})}, got {name!r}")
    script = Path(root) / "bench" / f"{name}.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"mmsparse bench runs the repository's bench/ scripts, and {script} does not exist: this "
            f"mmsparse is not an editable install of a git checkout (clone the repository and run "
            f"`pip install -e .` there, or run `python bench/{name}.py` in the checkout)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"bench.{name}")
    if Path(module.__file__).resolve() != script.resolve():
        raise ImportError(f"bench.{name} imported from {module.__file__}, not {script}: another `bench` "
                          f"package shadows the checkout's")
    return module


def _register_bench(sub) -> None:
    lines = "\n".join(f"  {k:10s} {v}" for k, v in BENCHMARKS.items())
    p = sub.add_parser("bench", help="run a benchmark (bench/<name>.py of the checkout)",
                       description=f"Run a benchmark script of the repository's bench/ folder; the arguments after "
                                   f"NAME go to it (`mmsparse bench attention --help` lists its own).\n\n{lines}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help="attention, model, data or longclip")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of bench/NAME.py")

    def run(args) -> int:
        try:
            return run_bench(args.name, args.args)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    p.set_defaults(func=run)


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
    _register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
