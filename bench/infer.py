"""E4: captioning inference of the base captioner, sparse against dense: clips/s, latency p50 / p95, peak memory.

    python bench/infer.py                                  # GPU: 64 and 512 frames, batch 8, beam 4
    python bench/infer.py --frames 64 --beam 1             # greedy decoding
    python bench/infer.py --variants sparse,aligned,dense  # aligned: BLOCK_ALIGNED_224 (registry.py)
    python bench/infer.py --config "every4:aligned;video_radius=1,0,0;video_radius_every=4"
    python bench/infer.py --cpu-smoke                      # tiny model, tiny clips, on the CPU

One call is one batch of clips captioned: the encoder over the clips (the model's sparse
schedule, or dense: the same model with ``schedule="dense"``, SDPA with no mask), then the
decoder's beam search with its KV cache (``VideoCaptioner.generate_ids``). The clips are E1's
(``bench/model.py``): T frames of 224 x 224 plus 10.24 s of audio, random pixels. A randomly
initialised model never emits <eos> first, so every call decodes ``--max-len`` tokens: the
longest a caption may be, the worst case for a trained model. Calls are timed one by one
between device synchronisations, ``--calls`` after ``--warmup``; a row gives latency p50 / p95 /
mean, clips/s (batch over the mean latency), the encoder's share (the encoder alone, timed the
same way), the peak memory of the calls and the sparse / dense ratio of clips/s in the same run.
Weights in bf16 on the GPU (``--precision``), fp32 on the CPU. Decoding media is not included:
E3 (``bench/data.py``) measures it, and ``mmsparse caption`` reports both per input.

Writes bench/results/infer-<device>-<date>[-<label>].json (``--out`` names another folder),
rewritten after every case (``"complete": false`` until the last), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, out_folder, result_stem, slug, synchronizer  # noqa: E402
from bench.model import (CAPTION, _parse_override, case_overrides, make_batch, parse_config,  # noqa: E402
                         real_tokens, variant_names)
from mmsparse.attention.backends import triton_available  # noqa: E402
from mmsparse.fileio import atomic_write_text  # noqa: E402
from mmsparse.models import CaptionTokenizer, create_model  # noqa: E402

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linear between the two nearest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timed_calls(fn, calls: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `calls` calls of fn() after `warmup` untimed ones, each call
    between two device synchronisations (a caption request waits for its answer)."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    sync = synchronizer(device.type)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_case(frames: int, variant: str, args, tok, device: torch.device) -> dict:
    overrides = case_overrides(frames, variant, args.override, args.configs.get(variant, {}))
    torch.manual_seed(0)
    model = create_model(args.model, tokenizer=tok, **overrides).to(device=device, dtype=PRECISIONS[args.precision])
    model.eval()
    batch = make_batch(frames, args.size, args.audio_frames, device, args.batch)
    with torch.no_grad():
        stream = model.embed(batch).layout
    row = {"frames": frames, "variant": variant, "schedule": model.cfg.schedule, "batch": args.batch,
           "beam": args.beam, "max_len": args.max_len, "tokens": real_tokens(stream), "positions": stream.length}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lengths = []

        def caption():
            ids = model.generate_ids(batch, beam=args.beam, max_len=args.max_len)
            lengths.append(sum(len(r) for r in ids) / len(ids))

        def encode():
            with torch.no_grad():
                model.encode(batch)

        calls = timed_calls(caption, args.calls, args.warmup, device)
        enc = timed_calls(encode, args.calls, 1, device)
        mean = sum(calls) / len(calls)
        row.update(latency_ms_p50=percentile(calls, 50), latency_ms_p95=percentile(calls, 95), latency_ms_mean=mean,
                   latency_ms=calls, encode_ms_p50=percentile(enc, 50), clips_per_s=args.batch / mean * 1e3,
                   caption_tokens=sum(lengths) / len(lengths))
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        model = batch = None  # freed before the next case builds its model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Each row with its clips/s over the dense row's of the same frames (same run)."""
    dense = {r["frames"]: r for r in rows if r["variant"] == "dense" and "clips_per_s" in r}
    out = []
    for r in rows:
        r = dict(r)
        d = dense.get(r["frames"])
        if d is not None and r["variant"] != "dense" and "clips_per_s" in r:
            r["speedup_vs_dense"] = r["clips_per_s"] / d["clips_per_s"]
        out.append(r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="64,512")
    p.add_argument("--variants", default="sparse,dense",
                   help="sparse: the model's schedule; aligned: BLOCK_ALIGNED_224 (registry.py); dense: "
                        "schedule='dense'; and the NAMEs of --config")
    p.add_argument("--config", action="append", default=[],
                   help="a named sparse variant, 'NAME:field=value;field=value' (bench/model.py's form)")
    p.add_argument("--override", action="append", default=[], help="ModelConfig field=value, every variant")
    p.add_argument("--batch", type=int, default=8, help="clips a call")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--max-len", type=int, default=32, help="caption tokens decoded (no early <eos>: see above)")
    p.add_argument("--calls", type=int, default=10, help="timed calls a case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--audio-frames", type=int, default=1024)
    p.add_argument("--model", default="captioner_base")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                   help="weights and activations (default: bf16 on the GPU, fp32 on the CPU)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, tiny clips, on the CPU")
    p.add_argument("--out", default=None, help="results folder (default bench/results; the name is chosen here)")
    p.add_argument("--label", default="", help="the result name's label: infer-<device>-<date>-<label>")
    args = p.parse_args(argv)
    for name in ("batch", "beam", "max_len", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    try:
        frames = [int(f) for f in args.frames.split(",")]
        out_dir = out_folder(args.out)
        args.configs = dict(parse_config(c) for c in args.config)
    except ValueError as err:
        p.error(str(err))
    with_kernels = [name for name, c in args.configs.items() if "kernels" in c]
    if with_kernels:
        p.error(f"--config {with_kernels[0]}: kernels.* items are bench/model.py's; set the MMSPARSE_* variables "
                f"for a whole run here")
    if any(f < 1 for f in frames):
        p.error(f"--frames must be positive integers, got {args.frames!r}")
    args.override = dict(_parse_override(o) for o in args.override)
    variants, unknown = variant_names(args.variants, args.configs)
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected sparse, aligned, dense or a --config NAME")
    if args.cpu_smoke:
        device = torch.device("cpu")
        args.model, args.size, args.audio_frames = "captioner_tiny", 32, 200
        args.calls, args.warmup, args.max_len = min(args.calls, 2), min(args.warmup, 1), min(args.max_len, 8)
        if args.frames == p.get_default("frames"):
            frames = [4, 8]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        p.error("no GPU: run with --cpu-smoke for the reduced CPU check")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    tok = CaptionTokenizer.train([CAPTION, "a low tone plays then a blue square moves up"], vocab_size=512)
    env = environment(device.type)
    backend = "reference" if device.type == "cpu" else ("triton" if triton_available() else "flex")
    label = "-".join(x for x in ("cpu-smoke" if args.cpu_smoke else "", args.label) if x)
    out = Path(f"{result_stem(out_dir, 'infer', slug(env['device']), label, env['date'])}.json")
    cases = [(f, v) for f in frames for v in variants]
    rows: list[dict] = []
    for i, (f, v) in enumerate(cases):
        row = run_case(f, v, args, tok, device)
        rows.append(row)
        print(json.dumps({k: x for k, x in row.items() if k != "latency_ms"}), flush=True)
        result = {"workload": "E4", "model": args.model, **env, "sparse_backend": backend, "precision": args.precision,
                  "batch": args.batch, "beam": args.beam, "max_len": args.max_len, "calls": args.calls,
                  "overrides": args.override, "configs": args.configs, "complete": i + 1 == len(cases),
                  "rows": summarise(rows)}
        atomic_write_text(out, json.dumps(result, indent=2, default=str))
    print(f"\n{args.model} on {env['device']} (torch {env['torch']}, triton {env['triton']}, sparse backend {backend}), "
          f"{args.precision}; batch {args.batch}, beam {args.beam}, {args.max_len} tokens a caption, "
          f"{args.calls} calls a case\n")
    print("| frames | variant | tokens a clip | p50 ms | p95 ms | encoder p50 ms | clips/s | peak GB | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in summarise(rows):
        if "error" in r:
            print(f"| {r['frames']} | {r['variant']} | {r['tokens']:,} | {r['error']} ||||||")
            continue
        ratio = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else "-"
        print(f"| {r['frames']} | {r['variant']} | {r['tokens']:,} | {r['latency_ms_p50']:.1f} | "
              f"{r['latency_ms_p95']:.1f} | {r['encode_ms_p50']:.1f} | {r['clips_per_s']:.2f} | "
              f"{r.get('peak_gb', float('nan')):.1f} | {ratio} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
