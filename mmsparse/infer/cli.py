"""``mmsparse caption VIDEO_OR_MANIFEST... --model DIR``: caption videos, images or manifests.

Output: JSON Lines (one record per input with id, caption, timings; window mode adds
``segments`` with time stamps) when ``--out`` ends in .jsonl/.json or ``--format jsonl``;
otherwise text, ``<id>\\t<caption>`` per input (window mode: ``<id>\\t[start-end s]\\t<caption>``
per window). An input that cannot be decoded gets an error line (``"error"`` in JSONL,
``<id>\\tERROR <reason>: <message>`` in text) and the rest are still captioned.

Exit status: 0 every input captioned, 1 some inputs failed (each has its error line),
2 the model folder, the arguments or a manifest are wrong (nothing captioned).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, TextIO

from mmsparse.subcommand import add_subcommand, module_main

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def format_text(rec: dict) -> list[str]:
    """Text lines of one record."""
    if "error" in rec:
        return [f"{rec['id']}\tERROR {rec.get('reason', 'error')}: {rec['error']}"]
    if "segments" in rec:
        return [f"{rec['id']}\t[{s['start']:.2f}-{s['end']:.2f} s]\t{s['caption']}" for s in rec["segments"]]
    return [f"{rec['id']}\t{rec['caption']}"]


def write_records(records: Iterable[dict], fh: TextIO, fmt: str) -> tuple[int, int]:
    """Write records as they come (flushed per record); returns (captioned, failed)."""
    ok = bad = 0
    for rec in records:
        if fmt == "jsonl":
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            fh.write("\n".join(format_text(rec)) + "\n")
        fh.flush()
        if "error" in rec:
            bad += 1
        else:
            ok += 1
    return ok, bad


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_MANIFEST",
                   help="video / image files and manifest .jsonl files (their lines keep their ids)")
    p.add_argument("--model", required=True, help="a folder written by save_pretrained (or a run folder with export/)")
    p.add_argument("--beam", type=int, default=4, help="beam width (1: greedy)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames sampled per clip or window (default: the training run's data.frames)")
    p.add_argument("--batch", type=int, default=8, help="clips (or windows) per model call")
    p.add_argument("--window-seconds", type=float, default=None,
                   help="sliding-window mode: caption each window of this many seconds, with time stamps")
    p.add_argument("--window-stride", type=float, default=None, help="seconds between window starts (default: the window)")
    p.add_argument("--max-len", type=int, default=None, help="most caption tokens (default: the decoder's limit)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--max-frames", type=int, default=None, help="raise the model's frame limit for long clips")
    p.add_argument("--out", default=None, help="output file (.jsonl/.json: JSON Lines, else text); default stdout")
    p.add_argument("--format", choices=("text", "jsonl"), default=None, help="default: from --out, text on stdout")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--backend", default="auto", help="attention backend: auto, reference, sdpa, flex, triton")


def run(args: argparse.Namespace) -> int:
    import torch

    from .captioner import Captioner, ModelLoadError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fmt = args.format or ("jsonl" if args.out and Path(args.out).suffix.lower() in (".jsonl", ".json") else "text")
    try:
        cap = Captioner(args.model, device=device, backend=args.backend, max_frames=args.max_frames)
        samples = cap.expand_inputs(args.inputs)  # a broken manifest fails here, before any output
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    out: TextIO = sys.stdout
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.out, "w", encoding="utf-8")
    try:
        records = cap.iter_caption(samples, beam=args.beam, frames=args.frames, batch=args.batch,
                                   window_seconds=args.window_seconds, window_stride=args.window_stride,
                                   max_len=args.max_len, length_penalty=args.length_penalty)
        ok, bad = write_records(records, out, fmt)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"captioned {ok} of {ok + bad} inputs" + (f"; {bad} could not be captioned (see their error lines)" if bad else "")
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return EXIT_PARTIAL if bad else EXIT_OK


def register(subparsers) -> None:
    add_subcommand(subparsers, "caption", "caption videos or manifests with a trained model", __doc__, add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m mmsparse.infer", __doc__, add_arguments, run, argv)
