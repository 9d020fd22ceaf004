"""``mmsparse data``: synth (write synthetic media), convert (annotation files -> manifest),
check (decode every sample of a manifest and report failures)."""

from __future__ import annotations

import argparse
import sys


def _synth(args: argparse.Namespace) -> int:
    from .synth import make_dataset

    if args.tasks:
        from .longtasks import TASKS, write_task_set

        tasks = TASKS if args.tasks == "all" else tuple(t for t in args.tasks.split(",") if t)
        try:
            path = write_task_set(args.out, tasks, args.frames, args.clips, args.seed)
        except ValueError as err:
            print(f"error: --tasks / --frames: {err}", file=sys.stderr)
            return 2
        print(path)
        return 0

    path = make_dataset(args.out, clips=args.clips, frames=args.frames, seed=args.seed,
                        size=tuple(args.size), long=args.long, fps=args.fps, images=args.images,
                        long_frames=tuple(args.long_frames), audio=not args.no_audio,
                        long_lengths=args.long_lengths)
    print(path)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    try:
        report = convert(args.format, args.ann, args.out, video_pattern=args.video_pattern, split=args.split)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {report}")
    for s in report.skipped[:20]:
        print(f"  skipped {s}")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Decode every sample once; print each bad one once (path, reason, detail) on stdout, files
    only the fallback backend reads as ``fallback``, and the counts on stderr. A sample's audio
    track is decoded whole and checked against its declared duration (``audio.read_audio``),
    not only the window the dataset reads."""
    import logging

    from . import DataConfig, MediaDataset
    from .audio import read_audio
    from .errors import MediaError

    try:
        fallback = None if args.fallback == "none" else args.fallback
        ds = MediaDataset(args.manifest, DataConfig(backend=args.backend, num_frames=args.frames, strict=True,
                                                    require_audio=args.require_audio, min_frames=1,
                                                    video_fallback=fallback, audio_backend=args.audio_backend))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = ds.cfg
    data_log = logging.getLogger("mmsparse.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # every failure and fallback is printed below, once
    bad = 0
    try:
        for i, s in enumerate(ds.samples):
            rescued = ds.stats.fallbacks
            try:
                ds[i]
                src = (s.audio or s.video) if c.load_audio else None
                if src is not None:
                    try:
                        read_audio(src, c.sample_rate, backend=c.audio_backend)
                    except MediaError as err:
                        if err.reason != "no_audio":
                            raise
            except MediaError as err:
                ds.stats.record(err, warn=False)
                bad += 1
                print(f"{err.path}\t{err.reason}\t{err.detail}")
            if ds.stats.fallbacks > rescued:  # readable, but only by the fallback backend: listed, not bad
                path, backend, detail = ds.stats.recent_fallbacks[-1]
                print(f"{path}\tfallback\t{backend} read it; {args.backend}: {detail}")
    finally:
        data_log.setLevel(level)
    print(ds.stats.summary().splitlines()[0].replace("sample loads", "samples"), file=sys.stderr)
    return 1 if bad else 0


def register(subparsers) -> None:
    """Add ``data`` with its sub-commands to the ``mmsparse`` parser."""
    p = subparsers.add_parser("data", help="media data: synthetic sets, annotation converters, checks",
                              description=__doc__)
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synth", help="write synthetic H.264+AAC clips, PNG images and a manifest")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--clips", type=int, required=True)
    s.add_argument("--frames", type=int, default=32, help="frames per clip (ignored with --long)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    s.add_argument("--fps", type=int, default=8)
    s.add_argument("--images", type=int, default=None, help="PNG images (default: --clips; 0 with --long)")
    s.add_argument("--long", action="store_true", help="needle clips of 512..4096 frames with one key event")
    s.add_argument("--long-frames", type=int, nargs=2, default=[512, 4096], metavar=("MIN", "MAX"))
    s.add_argument("--long-lengths", choices=("range", "doubling"), default="range",
                   help="long clip lengths: any in MIN..MAX, or MIN, 2 MIN, 4 MIN, ... <= MAX")
    s.add_argument("--no-audio", action="store_true", help="write video-only files")
    s.add_argument("--tasks", default=None, metavar="T1,T2|all",
                   help="long-clip benchmark v2 clips instead (needle, order, count, pair; --clips of each, "
                        "balanced answers, --frames each; mmsparse/data/longtasks.py)")
    s.set_defaults(func=_synth)

    c = sub.add_parser("convert", help="convert MSR-VTT / ActivityNet Captions / YouCook2 annotations")
    c.add_argument("format", choices=["msrvtt", "activitynet", "youcook2"])
    c.add_argument("--ann", required=True, help="annotation JSON file")
    c.add_argument("--out", required=True, help="manifest.jsonl to write")
    c.add_argument("--video-pattern", default="videos/{id}.mp4",
                   help="video path relative to the manifest; fields {id}, {split}, {recipe_type}")
    c.add_argument("--split", default=None, help="keep one split (MSR-VTT split / YouCook2 subset)")
    c.set_defaults(func=_convert)

    k = sub.add_parser("check", help="decode every sample of a manifest; print failures (path, reason)")
    k.add_argument("manifest")
    k.add_argument("--backend", default="pyav", choices=["pyav", "decord"])
    k.add_argument("--fallback", default="auto", choices=["auto", "decord", "pyav", "none"],
                   help="backend tried when --backend's decoder fails (auto: the other one)")
    k.add_argument("--audio-backend", default="pyav", choices=["pyav", "decord"])
    k.add_argument("--frames", type=int, default=4)
    k.add_argument("--require-audio", action="store_true")
    k.set_defaults(func=_check)
