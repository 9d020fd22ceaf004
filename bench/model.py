"""E1: training-step throughput of the `captioner_base` video captioner, sparse vs dense.

    python bench/model.py                         # GPU: 64 / 512 / 1,024 frames, sparse and dense
    python bench/model.py --frames 64 --steps 5   # a subset
    python bench/model.py --frames 64 --batch 8   # 8 clips a step: a GPU-bound 64-frame step
    python bench/model.py --checkpointing         # activation checkpointing on model.blocks
    python bench/model.py --override video_radius=1,1,0   # any ModelConfig field
    python bench/model.py --config "tile64:video_tile=4,14,14;video_radius=0;video_tile_align=64"
                                                  # named sparse variants beside sparse and dense
    python bench/model.py --config "tilekey:aligned;compress_block=832"   # on the aligned tiles
    python bench/model.py --config "densec:schedule=dense;kernels.compile_blocks=1" \
                          --config "alignedc:aligned;kernels.compile_blocks=1"   # kernel options a case
    python bench/model.py --frames 64 --batch 8 --repeats 3   # each case 3 times, interleaved
    python bench/model.py --frames 64 --batch 8 --profile 2   # + kernel time by category a step
    python bench/model.py --cpu-smoke             # reduced CPU run (tiny model): checks it runs

Each row: clip of T frames of 224x224 plus 10.24 s of audio (1,024 log-mel frames, AST patches:
1,212 tokens) as one stream, batch 1 (``--batch``), AdamW step included (CaptionTask loss).
Precision (``--precision``): ``bf16`` (default) is the recipes' DeepSpeed bf16 mode, bf16 weights
and activations with fp32 master weights in the optimizer; ``amp`` is torch autocast over fp32
weights (the convention of results before 2026-12-03: every step then re-casts the weights and runs
the norms in fp32, about 25 ms of copies at 64 frames x 8 clips, the same for sparse and dense).
The sparse model uses the config's pattern schedule with backend "auto" (triton when the
kernels import, else flex); the dense model is the same model with `schedule="dense"`, i.e.
SDPA with no mask in its default dispatch (cuDNN on Hopper). Reported: step ms, tokens/s, MFU,
peak memory, the sparse/dense speedup. MFU counts attended FLOPs of the encoder: 6 x N x (12 E^2) per layer for the
matmuls (forward + backward) plus 3.5 x 4 x (attended pairs) x E per layer for attention
(docs/benchmarks.md's convention), over the measured 790 TFLOP/s bf16 peak of an H100. N and
tokens/s count real tokens only; the positions of alignment gaps and tile padding
(``--override video_tile_align=64``) are reported beside them ("positions").
A ``--config`` item ``kernels.FIELD=value`` sets that field of the kernel options
(mmsparse.kernels.options) while the variant's cases run; such a row records them
(``kernels``) and, beside its speedup over ``dense``, its speedup over the dense-schedule variant
run with the same kernel options (``speedup_vs_dense_same_kernels``): one process, same run,
times a kernel option on both sides of the ratio.
``--repeats R`` runs every (frames, variant) case R times, the cases interleaved (all of them
once, then again), so that a drift of the machine between processes or over minutes (dense
steps at 64 frames x 8 move 223-228 ms from run to run on the H200) reaches sparse and dense
alike; each row is then the run of median step time, with every run's step time
(``step_ms_runs``) and the speedup of each repeat over that repeat's dense run
(``speedup_vs_dense_runs``) beside it.
Writes bench/results/model-<gpu>-<date>[-<label>].json (``--label``; a name taken already gets
``-2``, ``-3``: bench/common.py; ``--out`` names another folder), rewritten after every case
(``"complete": false`` until the last), so a run cut short keeps the cases it measured, and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, lower_median, mean_step_ms, out_folder, profile_breakdown, result_stem, slug  # noqa: E402
from mmsparse.models import CaptionTask, CaptionTokenizer, create_model  # noqa: E402
from mmsparse.models.registry import BLOCK_ALIGNED_224  # noqa: E402
from mmsparse.attention.compressed import pooled_keys  # noqa: E402
from mmsparse.attention.backends import backend_counts, triton_available  # noqa: E402
from mmsparse.fileio import atomic_write_text  # noqa: E402
from mmsparse.kernels.options import MODE_FIELDS, KernelOptions, set_kernel_options  # noqa: E402

PEAK_TFLOPS = 790.0  # measured bf16 matmul peak of the H100 (docs/benchmarks.md)
CAPTION = "a red circle moves left then a high tone plays"


class _Checkpointed(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


class TrainStep:
    """One optimizer step of ``task`` (forward, backward, AdamW) in one of ``PRECISIONS``:

    - ``bf16``: the model in bf16; each step copies the grads into fp32 master weights, steps a
      fused AdamW on those and copies them back, as DeepSpeed's bf16 mode does (recipes'
      ``deepspeed.precision: bf16``).
    - ``amp``: fp32 weights, forward under bf16 autocast, AdamW on the weights.
    - ``fp32``: no casting at all (the CPU smoke run).
    """

    PRECISIONS = ("bf16", "amp", "fp32")

    def __init__(self, task, model: nn.Module, batch: dict, precision: str, device):
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {self.PRECISIONS}, got {precision!r}")
        self.task, self.batch, self.precision, self.device = task, batch, precision, device
        fused = device.type == "cuda"
        self.params = [p for p in model.parameters() if p.requires_grad]
        if precision == "bf16":
            self.master = [p.detach().float().clone() for p in self.params]
            model.to(torch.bfloat16)
            self.opt = torch.optim.AdamW(self.master, lr=1e-4, fused=fused)
        else:
            self.master = None
            self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=fused)

    def __call__(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "amp"):
            loss, _ = self.task.training_forward(self.batch)
        loss.backward()
        if self.master is not None:
            for m, p in zip(self.master, self.params):
                m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        if self.master is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        for p in self.params:
            p.grad = None
        return loss


def make_batch(frames: int, size: int, audio_frames: int, device, batch: int = 1) -> dict:
    """``batch`` clips of the same shape: media on ``device``; masks and times on the host, where
    the training loop leaves them (``mmsparse.encoders.HOST_KEYS``)."""
    b = batch
    return {
        "video": torch.randn(b, frames, 3, size, size, device=device),
        "video_mask": torch.ones(b, frames, dtype=torch.bool),
        "video_times": (torch.arange(frames, dtype=torch.float64) / 30.0).expand(b, frames).clone(),
        "audio": torch.randn(b, 128, audio_frames, device=device),
        "audio_mask": torch.ones(b, audio_frames, dtype=torch.bool),
        "audio_start": torch.zeros(b, dtype=torch.float64), "audio_hop_seconds": 0.01,
        "caption": [CAPTION] * b, "captions": [[CAPTION]] * b, "id": [f"bench{i}" for i in range(b)],
    }


def _parse_override(text: str):
    key, _, value = text.partition("=")
    if "," in value:
        return key, tuple(int(v) for v in value.split(","))
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


def encoder_flops(model, batch) -> tuple[int, int, int, float]:
    """(real tokens, stream positions, attended pairs summed over layers, train FLOPs of the
    encoder). Real tokens are the global tokens and the segments' tokens: the stream's alignment
    gaps and tile padding (`segment_align`, `*_tile_align`) are computed but not counted, so
    tokens/s and MFU compare models of different padding on the same media. A compressed branch
    (`compress_block`) adds N x (its pooled keys: ceil(N / compress_block), at most
    `compress_keys`) pairs a sparse layer (every position attends every pooled key)."""
    with torch.no_grad():
        stream = model.embed(batch)
    layout = stream.layout
    n, e, depth = layout.length, model.cfg.embed_dim, model.cfg.depth
    real = real_tokens(layout)
    pairs = 0
    cb = model.cfg.compress_block
    pooled = pooled_keys(n, cb, model.cfg.compress_keys) if cb else 0
    for lay in model.layer_layouts(layout):
        pairs += n * n if lay is None else lay.attended_pairs() + n * pooled
    flops = 6.0 * real * 12 * e * e * depth + 3.5 * 4.0 * pairs * e
    return real, n, pairs, flops


KERNEL_FIELDS = tuple(f for f in KernelOptions.__dataclass_fields__ if f != "split_chunk")


def real_tokens(layout) -> int:
    """A stream's tokens: its global tokens and its segments', not its alignment gaps."""
    return layout.n_global + sum(s.numel for s in layout.segments)


def parse_config(text: str) -> tuple[str, dict]:
    """"NAME:field=value;field=value" -> (NAME, overrides): a named sparse variant. An item
    "aligned" (no value) stands for the fields of BLOCK_ALIGNED_224, which later items override:
    "tilekey:aligned;compress_block=832". Items "kernels.FIELD=value" go to overrides["kernels"],
    the kernel options of the variant's cases (a KernelOptions field, checked here)."""
    name, sep, body = text.partition(":")
    if not sep or not name or name == "dense":
        raise ValueError(f"--config must be NAME:field=value;..., NAME not 'dense', got {text!r}")
    overrides: dict = {}
    for item in (o.strip() for o in body.split(";")):
        if item == "aligned":
            overrides.update(BLOCK_ALIGNED_224)
        elif item.startswith("kernels."):
            field, _, value = item[len("kernels."):].partition("=")
            if field not in KERNEL_FIELDS or not value:
                raise ValueError(f"--config {name}: {item!r}: expected kernels.FIELD=value with FIELD one of "
                                 f"{KERNEL_FIELDS}")
            parsed = _parse_override(item[len("kernels."):])[1]
            # the modes are strings ("auto", "0", "1"), which the parse would make numbers
            kernels = {**overrides.get("kernels", {}), field: str(parsed) if field in MODE_FIELDS else parsed}
            try:
                KernelOptions(**kernels)
            except (TypeError, ValueError) as err:
                raise ValueError(f"--config {name}: {item!r}: {err}") from err
            overrides["kernels"] = kernels
        elif "=" in item:
            overrides.update([_parse_override(item)])
        elif item:
            raise ValueError(f"--config {name}: {item!r} is neither field=value nor 'aligned'")
    return name, overrides


def run_case(name, frames, variant, args, tok, device):
    """One (frames, variant) case, under the variant's kernel options (its kernels.* items)."""
    config = dict(args.configs.get(variant, {}))
    kernels = config.pop("kernels", {})
    previous = set_kernel_options(**kernels)
    try:
        row = _run_case(name, frames, variant, config, args, tok, device)
    finally:
        set_kernel_options(previous)
    if kernels:
        row["kernels"] = kernels
    return row


def case_overrides(frames: int, variant: str, override: dict, config: dict) -> dict:
    """The ModelConfig overrides of a (frames, variant) case: `override` (every variant's), the
    variant's own (dense: schedule="dense"; aligned: BLOCK_ALIGNED_224; a --config NAME: its
    `config`, kernels.* items removed)."""
    overrides = dict(max_frames=max(frames, 64), **override)
    if variant == "dense":
        overrides["schedule"] = "dense"
    elif variant == "aligned":  # the block-aligned tiles of captioner_base_aligned
        overrides.update(BLOCK_ALIGNED_224)
    overrides.update(config)
    return overrides


def variant_names(variants: str, configs: dict) -> tuple[list[str], list[str]]:
    """(the cases' variants: the comma list `variants` and then every --config NAME not in it,
    the names among them that are neither sparse, aligned, dense nor a --config NAME)."""
    names = variants.split(",")
    names += [c for c in configs if c not in names]
    return names, [v for v in names if v not in ("sparse", "aligned", "dense") and v not in configs]


def _run_case(name, frames, variant, config, args, tok, device):
    overrides = case_overrides(frames, variant, args.override, config)
    torch.manual_seed(0)
    model = create_model(name, tokenizer=tok, **overrides).to(device)
    if args.checkpointing:
        for i, blk in enumerate(model.blocks):
            model.blocks[i] = _Checkpointed(blk)
    batch = make_batch(frames, args.size, args.audio_frames, device, args.batch)
    n, positions, pairs, flops = encoder_flops(model, batch)  # per clip
    row = {"frames": frames, "variant": variant, "schedule": model.cfg.schedule, "batch": args.batch, "tokens": n,
           "positions": positions,
           "attended_pairs": pairs, "density": pairs / (model.cfg.depth * n * n), "train_flops": flops * args.batch}
    if args.count_only:  # the layouts' pairs alone: what attention costs against dense, untimed
        return row
    task = CaptionTask(model)
    step = TrainStep(task, model, batch, args.precision, device)

    try:
        with backend_counts() as used:  # what auto chose: attention calls a step, by backend
            ms, loss = mean_step_ms(step, args.steps, args.warmup, device.type,
                                    torch.cuda.reset_peak_memory_stats if device.type == "cuda" else None)
        row["attention_backends"] = {k: n // (args.steps + args.warmup) for k, n in sorted(used.items())}
        row.update(step_ms=ms, tokens_per_s=args.batch * n / ms * 1e3, loss=float(loss.detach()),
                   mfu=args.batch * flops / (ms / 1e3) / (PEAK_TFLOPS * 1e12))
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if args.profile:  # after the timed steps, so the profiler's overhead stays out of step_ms
            row["profile"] = profile_breakdown(step, args.profile, device.type)
    except torch.cuda.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        del model, task, step, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def median_row(runs: list[dict]) -> dict:
    """The run of median step time among the repeats of one case (the lower median for an even
    count), with every run's step time beside it; a failed run (out of memory) stands for the case."""
    failed = [r for r in runs if "step_ms" not in r]
    if failed:
        return failed[0]
    row = dict(lower_median(runs, key=lambda r: r["step_ms"]))
    if len(runs) > 1:
        row["step_ms_runs"] = [r["step_ms"] for r in runs]
    return row


def summarise(runs: dict[tuple, list], repeats: int) -> list[dict]:
    """The rows of the cases run so far: each case's median run, with its speedup over the dense
    case of the same frames (and, over repeats, each repeat's over that repeat's dense run)."""
    rows = [median_row(r) for r in runs.values()]
    by = {(r["frames"], r["variant"]): r for r in rows}
    # the dense-schedule rows by (frames, kernel options): a variant run under kernel options is
    # also compared with dense under the same ones
    dense_by = {(r["frames"], json.dumps(r.get("kernels", {}), sort_keys=True)): r for r in rows
                if r["variant"] == "dense" or r.get("schedule") == "dense"}
    for r in rows:
        d = dense_by.get((r["frames"], json.dumps(r.get("kernels", {}), sort_keys=True)))
        if r.get("kernels") and d and d is not r and "step_ms" in r and "step_ms" in d:
            r["speedup_vs_dense_same_kernels"] = d["step_ms"] / r["step_ms"]
        d = by.get((r["frames"], "dense"))
        if r["variant"] != "dense" and d and "step_ms" in r and "step_ms" in d:
            r["speedup_vs_dense"] = d["step_ms"] / r["step_ms"]
            if repeats > 1:  # each repeat against the dense run of the same repeat
                r["speedup_vs_dense_runs"] = [a["step_ms"] / b["step_ms"] for a, b in
                                              zip(runs[r["frames"], "dense"], runs[r["frames"], r["variant"]])]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="64,512,1024")
    p.add_argument("--variants", default="sparse,aligned,dense",
                   help="sparse: the model's schedule; aligned: BLOCK_ALIGNED_224 (registry.py) on it; "
                        "dense: schedule='dense'; and the NAMEs of --config")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1,
                   help="run every case this many times, interleaved; rows are the median runs")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--audio-frames", type=int, default=1024)
    p.add_argument("--model", default="captioner_base")
    p.add_argument("--batch", type=int, default=1,
                   help="clips a step (1: at 64 frames the step is then host-bound, NOTES v9 measured, 2026-12-02)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--precision", choices=TrainStep.PRECISIONS, default="bf16",
                   help="bf16: bf16 weights, fp32 master (DeepSpeed bf16, the recipes); amp: bf16 autocast "
                        "over fp32 weights (results before 2026-12-03); the CPU smoke run always uses fp32")
    p.add_argument("--override", action="append", default=[], help="ModelConfig field=value")
    p.add_argument("--config", action="append", default=[],
                   help="a named sparse variant, 'NAME:field=value;field=value' (added to --variants)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps of each case: kernel time by category "
                        "(attention, matmul, copy, ...) in the JSON and a second table (0: off)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, tiny clips, on the CPU")
    p.add_argument("--count-only", action="store_true",
                   help="no timing: count each variant's attended pairs (density against dense), any device")
    p.add_argument("--out", default=None, help="results folder (default bench/results; the name is chosen here)")
    p.add_argument("--label", default="", help="the result name's label: model-<device>-<date>-<label>")
    args = p.parse_args(argv)
    try:
        out_dir = out_folder(args.out)
    except ValueError as err:
        p.error(str(err))
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    args.override = dict(_parse_override(o) for o in args.override)
    args.configs = dict(parse_config(c) for c in args.config)
    variants, unknown = variant_names(args.variants, args.configs)
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected sparse, aligned, dense or a --config NAME")
    if args.cpu_smoke:
        device, args.precision = torch.device("cpu"), "fp32"
        args.model, args.size, args.audio_frames = "captioner_tiny", 32, 200
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        if args.frames == p.get_default("frames"):
            args.frames = "4,8"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.count_only:
        device = torch.device("cpu")
    else:
        p.error("no GPU: run with --cpu-smoke for the reduced CPU check, or --count-only")
    tok = CaptionTokenizer.train([CAPTION, "a low tone plays then a blue square moves up"], vocab_size=512)
    env = environment(device.type)
    gpu = env["device"]
    backend = "reference" if device.type == "cpu" else ("triton" if triton_available() else "flex")
    label = "-".join(x for x in ("cpu-smoke" if args.cpu_smoke else "", "count" if args.count_only else "", args.label)
                     if x)
    out = Path(f"{result_stem(out_dir, 'model', slug(gpu), label, env['date'])}.json")
    runs: dict[tuple, list] = {}  # (frames, variant) -> its rows, one a repeat
    cases = [(rep, int(f), v) for rep in range(args.repeats) for f in args.frames.split(",") for v in variants]
    for i, (rep, frames, variant) in enumerate(cases):
        row = run_case(args.model, frames, variant, args, tok, device)
        runs.setdefault((frames, variant), []).append(row)
        print(json.dumps(dict(row, repeat=rep) if args.repeats > 1 else row), flush=True)
        # the result so far after every case (atomic): a run cut short keeps what it measured
        rows = summarise(runs, args.repeats)
        result = {"workload": "E1", "model": args.model, **env, "sparse_backend": backend, "precision": args.precision,
                  "checkpointing": args.checkpointing, "repeats": args.repeats,
                  "overrides": {k: v for k, v in args.override.items()},
                  "configs": args.configs, "complete": i + 1 == len(cases), "rows": rows}
        atomic_write_text(out, json.dumps(result, indent=2, default=str))
    by = {(r["frames"], r["variant"]): r for r in rows}
    triton_version = env["triton"]
    print(f"\n{args.model} on {gpu} (torch {env['torch']}, triton {triton_version}, sparse backend {backend})\n")
    runs_note = f"; median of {args.repeats} interleaved runs, speedup range over the repeats" if args.repeats > 1 else ""
    print(f"batch {args.batch} clips a step, precision {args.precision}; tokens per clip{runs_note}\n")
    print("| frames | variant | tokens | density | step ms | tokens/s | MFU | peak GB | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_ms" not in r and "error" not in r:  # --count-only
            dense = by.get((r["frames"], "dense"))
            ratio = f"{dense['attended_pairs'] / r['attended_pairs']:.1f}x fewer pairs" if dense and r is not dense else "-"
            print(f"| {r['frames']} | {r['variant']} | {r['tokens']:,} | {r['density']:.4f} | - | - | - | - | {ratio} |")
            continue
        if "error" in r:
            print(f"| {r['frames']} | {r['variant']} | {r['tokens']} | {r['density']:.3f} | {r['error']} |||||")
            continue
        speedup = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else "-"
        if "speedup_vs_dense_runs" in r:
            speedup += f" ({min(r['speedup_vs_dense_runs']):.2f}-{max(r['speedup_vs_dense_runs']):.2f})"
        if "speedup_vs_dense_same_kernels" in r:
            speedup += f"; {r['speedup_vs_dense_same_kernels']:.2f}x dense with {r['kernels']}"
        print(f"| {r['frames']} | {r['variant']} | {r['tokens']:,} | {r['density']:.3f} | {r['step_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['mfu'] * 100:.1f} % | {r.get('peak_gb', float('nan')):.1f} | "
              f"{speedup} |")
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        cats = sorted({c for r in profiled for c in r["profile"]["categories"]},
                      key=lambda c: -max(r["profile"]["categories"].get(c, 0.0) for r in profiled))
        print(f"\nms a step by kernel category ({profiled[0]['profile']['steps']} profiled steps; busy: kernel time "
              f"over wall time)\n")
        print("| frames | variant | wall ms | busy | " + " | ".join(cats) + " |")
        print("|---|---|---|---|" + "---|" * len(cats))
        for r in profiled:
            pr = r["profile"]
            print(f"| {r['frames']} | {r['variant']} | {pr['wall_ms']:.1f} | {pr['busy']:.2f} | "
                  + " | ".join(f"{pr['categories'].get(c, 0.0):.1f}" for c in cats) + " |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
