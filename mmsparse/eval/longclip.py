"""The long-clip benchmark: does the model name a one-second event hidden in a long clip?

Clips come from the synthetic ``--long`` generator (``mmsparse.data.synth``, ``long=True``):
each has one key event (a coloured shape and a tone together for one second) at a random time;
its caption is ``"a <colour> <shape> appears with a <tone> tone"``. Lengths run from 256 to
4,096 frames (8 fps: 32 s to 8.5 min); every length gets the same number of clips.

Two scores per clip:

- **caption**: the generated caption names the event: its colour, shape and tone words are the
  event's (the first colour / shape / tone word of the caption is taken).
- **choice**: multiple choice by likelihood: the model's log-likelihood of each of the 24
  possible event captions (4 colours x 3 shapes x 2 tones) given the clip; correct when the
  true one ranks first (chance 1/24).

Accuracy is reported against clip length and against the event's position in the clip (its
start as a fraction of the span where it can start: early / middle / late thirds), per model,
with the encoder's attention cost per clip (FLOPs of the computed attention blocks, from the
block layouts the model ran) and accuracy per attention GFLOP. ``report`` writes
``longclip.json``, ``longclip.md`` and ``longclip.png`` (``stem`` renames them).

Honest numbers: a clip that cannot be decoded is counted and listed, not scored; a clip whose
candidate log-likelihoods are not finite (a diverged model) is scored wrong; the report gives
next to chance (1/24) the best score a model that ignores its input can reach (always naming
the benchmark's most frequent caption), and lists models that were meant to be compared but
produced no model (``failed``).

Clips are generated in fixed parts of ``PART_CLIPS`` clips (``make_benchmark``,
``make_train_set``), so ``workers`` processes can write them side by side and the clips do not
depend on the worker count.
"""

from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path
from typing import Any, Sequence

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
POSITIONS = ("early", "middle", "late")
ATTRIBUTES = ("colour", "shape", "tone")   # what a caption must name (chance 1/4, 1/3, 1/2)
PART_CLIPS = 8          # clips per generation job
PART_SEED = 1_000_003   # seed step between the parts of one set


def event_captions() -> list[str]:
    """Every caption a long synthetic clip can have (the multiple-choice candidates)."""
    from mmsparse.data.synth import COLOURS, SHAPES, TONES

    return [f"a {c} {s} appears with a {t} tone" for c, s, t in product(COLOURS, SHAPES, TONES)]


def _make_part(kw: dict) -> Path:
    from mmsparse.data import synth

    return synth.make_dataset(**kw)


def _make_parts(jobs: list[dict], workers: int) -> list[Path]:
    """``synth.make_dataset(**job)`` for every job, in ``workers`` processes: forked (no
    re-import of torch per worker), or spawned once this process has initialised CUDA."""
    if workers <= 1 or len(jobs) <= 1:
        return [_make_part(kw) for kw in jobs]
    import multiprocessing as mp
    import sys
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_initialized()
    method = "fork" if "fork" in mp.get_all_start_methods() and not cuda else "spawn"
    with warnings.catch_warnings():
        # fork with threads alive: the children only render and encode, they take no lock of ours
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context(method)) as pool:
            return list(pool.map(_make_part, jobs))


def _parts(clips: int) -> list[tuple[int, int]]:
    """(part index, clips in it) covering ``clips``."""
    return [(j, min(PART_CLIPS, clips - j * PART_CLIPS)) for j in range(math.ceil(clips / PART_CLIPS))]


def _cached(root: Path, spec: str) -> bool:
    done = root / "done.json"
    return done.is_file() and done.read_text() == spec and (root / "manifest.jsonl").is_file()


# No frame-index band in the long-clip clips: it exists for the decoders' exactness tests, and at
# 32x32 it is a quarter of every frame, changing every frame, around a needle of ~6 pixels.
FRAME_CODE = False


def make_benchmark(out_dir: str | Path, lengths: Sequence[int] = DEFAULT_LENGTHS, clips_per_length: int = 8,
                   seed: int = 7, size: tuple[int, int] = (32, 32), fps: int = 8, workers: int = 1) -> Path:
    """Write the clips (once per spec) and return the combined manifest (``manifest.jsonl``).

    Each line keeps the generator's ``events``, ``frames`` and ``fps`` and adds ``length`` and
    ``position`` (the event start as a fraction of the span where it can start). Part j of
    length n is drawn with seed ``seed + n + j * PART_SEED``."""
    from mmsparse.data import load_manifest, synth, write_manifest

    root = Path(out_dir)
    spec = json.dumps({"lengths": list(lengths), "clips": clips_per_length, "seed": seed, "size": list(size),
                       "fps": fps, "part": PART_CLIPS, "frame_code": FRAME_CODE, "format": synth.FORMAT})
    manifest = root / "manifest.jsonl"
    if _cached(root, spec):
        return manifest
    import os
    import sys

    if int(os.environ.get("RANK", 0)) == 0:  # minutes for long lengths: say what is happening
        print(f"writing the long-clip benchmark: {clips_per_length} clips of each of {list(lengths)} frames into "
              f"{root} with {workers} processes (once; later runs reuse them)", file=sys.stderr, flush=True)
    jobs, keys = [], []
    for n in lengths:
        for j, m in _parts(clips_per_length):
            jobs.append(dict(out_dir=root / f"len{n}" / f"part{j:03d}", clips=m, seed=seed + n + j * PART_SEED,
                             size=tuple(size), long=True, fps=fps, long_frames=(n, n), images=0,
                             frame_code=FRAME_CODE))
            keys.append((n, j))
    records = []
    for (n, j), m in zip(keys, _make_parts(jobs, workers)):
        for i, s in enumerate(load_manifest(m)):
            ev = next(e for e in s.meta["events"] if e["kind"] == "shape")
            span = max(1, n - fps)  # the event lasts fps frames; its start is drawn from [0, n - fps]
            records.append({"id": f"L{n:04d}-{j * PART_CLIPS + i:04d}",
                            "video": str(s.video.relative_to(root.resolve())),
                            "caption": list(s.captions), "frames": n, "fps": fps, "events": s.meta["events"],
                            "length": n, "position": round(ev["start_frame"] / span, 4)})
    write_manifest(manifest, records)
    (root / "done.json").write_text(spec)
    return manifest


def make_train_set(out_dir: str | Path, clips: int, long_frames: tuple[int, int] = (256, 2048), seed: int = 0,
                   size: tuple[int, int] = (32, 32), fps: int = 8, workers: int = 1,
                   long_lengths: str = "range") -> Path:
    """Needle clips of random lengths in ``long_frames`` (drawn as ``synth.make_dataset``'s
    ``long_lengths`` says) to train on (the recipes' data, written in parallel); returns the
    combined ``manifest.jsonl``. Part j is drawn with seed
    ``seed + j * PART_SEED``: keep ``seed`` away from the benchmark's (``seed + length``)."""
    from mmsparse.data import load_manifest, synth, write_manifest

    root = Path(out_dir)
    spec = json.dumps({"clips": clips, "long_frames": list(long_frames), "seed": seed, "size": list(size),
                       "fps": fps, "part": PART_CLIPS, "long_lengths": long_lengths, "frame_code": FRAME_CODE,
                       "format": synth.FORMAT})
    manifest = root / "manifest.jsonl"
    if _cached(root, spec):
        return manifest
    parts = _parts(clips)
    jobs = [dict(out_dir=root / f"part{j:03d}", clips=m, seed=seed + j * PART_SEED, size=tuple(size), long=True,
                 fps=fps, long_frames=tuple(long_frames), long_lengths=long_lengths, images=0,
                 frame_code=FRAME_CODE) for j, m in parts]
    records = []
    for (j, _), m in zip(parts, _make_parts(jobs, workers)):
        for s in load_manifest(m):
            records.append({"id": f"p{j:03d}-{s.id}", "video": str(s.video.relative_to(root.resolve())),
                            "caption": list(s.captions), "frames": s.meta["frames"], "fps": s.meta["fps"],
                            "events": s.meta["events"]})
    write_manifest(manifest, records)
    (root / "done.json").write_text(spec)
    return manifest


def position_bin(position: float) -> str:
    return POSITIONS[min(2, int(position * 3))]


def parse_event(caption: str) -> dict[str, str | None]:
    """The first colour, shape and tone word of a caption."""
    from mmsparse.data.synth import COLOURS, SHAPES, TONES

    words = caption.lower().replace(",", " ").split()
    pick = lambda vocab: next((w for w in words if w in vocab), None)  # noqa: E731
    return {"colour": pick(COLOURS), "shape": pick(SHAPES), "tone": pick(TONES)}


def truth_event(meta: dict) -> dict[str, str]:
    shape = next(e for e in meta["events"] if e["kind"] == "shape")
    tone = next(e for e in meta["events"] if e["kind"] == "tone")
    return {"colour": shape["colour"], "shape": shape["shape"], "tone": tone["pitch"]}


class AttentionCost:
    """Encoder attention FLOPs per clip, from the layouts the blocks run (forward pre-hooks):
    4 * E * (computed query-key pairs) per layer (QK^T and PV, 2 FLOPs per multiply-add), the
    computed pairs being N^2 for a dense layer and the listed blocks' pairs for a sparse one."""

    def __init__(self, model):
        self.embed_dim = model.cfg.embed_dim
        self.flops = 0.0
        self.clips = 0
        self.tokens = 0
        self.active = True
        self._pairs: dict[int, int] = {}
        self._handles = [blk.register_forward_pre_hook(self._hook) for blk in model.blocks]
        self._first = model.blocks[0]

    def _hook(self, module, args):
        if not self.active:
            return
        x, layout = args[0], (args[1] if len(args) > 1 else None)
        b, n = x.shape[0], x.shape[1]
        if layout is None:
            pairs = n * n
        else:
            key = id(layout)
            if key not in self._pairs:
                self._pairs[key] = int(layout.computed_pairs())
            pairs = self._pairs[key]
        self.flops += 4.0 * self.embed_dim * pairs * b
        if module is self._first:
            self.clips += b
            self.tokens += n * b

    def per_clip(self) -> float:
        return self.flops / self.clips if self.clips else float("nan")

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _run_data_extra(model_dir: Path) -> dict:
    """The data settings of the run that trained an exported model (empty when there is no run):
    ``data`` itself, with ``data.extra`` of configs saved before 2026-12 under it."""
    import yaml

    cfg = model_dir.parent / "config.yaml"
    try:
        tree = yaml.safe_load(cfg.read_text()) if cfg.is_file() else None
    except yaml.YAMLError:
        tree = None
    data = (tree or {}).get("data") if isinstance(tree, dict) else None
    if not isinstance(data, dict):
        return {}
    extra = data.get("extra")
    return {**(extra if isinstance(extra, dict) else {}), **data}


def _bar(total: int, desc: str):
    """A tqdm bar of ``total`` clips on stderr, on rank 0 only (None elsewhere)."""
    import os

    if int(os.environ.get("RANK", 0)) != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="clip", mininterval=1.0, dynamic_ncols=True)


def score_model(model_dir: str | Path, manifest: str | Path, *, frames: int | None = None, batch: int = 4,
                beam: int = 1, device: str = "cpu", backend: str = "auto", choice: bool = True,
                limit: int | None = None, shard: tuple[int, int] | None = None,
                audio_backend: str | None = None, progress: bool = True, label: str | None = None) -> dict[str, Any]:
    """Caption (and multiple-choice score) every clip of the benchmark with one model; with
    ``progress`` a bar of clips done on stderr (rank 0 only), named ``label`` (default: the folder).

    ``shard=(k, n)`` scores clips k, k + n, k + 2n, ... only (``merge_scores`` joins the
    shards); ``audio_backend`` (decord / pyav) defaults to the training run's
    ``data.extra.audio_backend``, so clips are decoded as the model was trained."""
    import time

    from mmsparse.data import load_manifest
    from mmsparse.infer import Captioner
    from mmsparse.infer.captioner import load_preprocess, resolve_model_dir

    samples = load_manifest(manifest)
    if limit:
        samples = samples[:limit]
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard}")
        samples = samples[k::n]
    pre = None
    audio_backend = audio_backend or _run_data_extra(resolve_model_dir(model_dir)).get("audio_backend")
    if audio_backend:
        pre = load_preprocess(resolve_model_dir(model_dir))
        pre.extra = {**pre.extra, "audio_backend": audio_backend}
    cap = Captioner(model_dir, device=device, backend=backend, max_frames=frames, preprocess=pre)
    cost = AttentionCost(cap.model)
    cands = event_captions() if choice else None
    groups: dict[int, list] = {}
    for s in samples:  # one length per batch: no clip is padded, so no score depends on its batch mates
        groups.setdefault(int(s.meta["length"]), []).append(s)
    t0 = time.perf_counter()
    records = []
    bar = _bar(len(samples), f"longclip {label or Path(model_dir).name}") if progress else None
    try:
        for n in sorted(groups):
            for r in cap.iter_caption(groups[n], beam=beam, frames=frames, batch=batch, candidates=cands,
                                      max_len=16, count_attention=cost):
                records.append(r)
                if bar is not None:
                    bar.update(1)
    finally:
        cost.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    by_id = {s.id: s for s in samples}
    clips = []
    for r in records:
        s = by_id[r["id"]]
        row = {"id": r["id"], "length": int(s.meta["length"]), "position": float(s.meta["position"]),
               "truth": s.caption}
        if "error" in r:
            row["error"] = r["error"]
        else:
            got, want = parse_event(r["caption"]), truth_event(s.meta)
            row.update(caption=r["caption"], caption_correct=got == want,
                       attributes_correct=sum(got[k] == want[k] for k in want) / 3,
                       **{f"{k}_correct": got[k] == want[k] for k in want})
            if cands is not None:
                finite = all(math.isfinite(v) for v in r["choice_logprobs"])
                row["choice"] = r["choice"]
                # NaN / inf likelihoods rank nothing: a diverged model scores wrong, not by luck
                row["choice_correct"] = finite and r["choice"] == s.caption
                if not finite:
                    row["nonfinite"] = True
        clips.append(row)
    return {"model": str(cap.model_dir), "schedule": cap.model.cfg.schedule, "frames": frames or cap.preprocess.frames,
            "attention_gflops_per_clip": cost.per_clip() / 1e9, "tokens_per_clip": cost.tokens / max(cost.clips, 1),
            "attention_clips": cost.clips, "seconds": round(wall, 2), "clips": clips}


def merge_scores(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``score_model`` result from the results of its shards (clip-weighted costs, the
    slowest shard's seconds)."""
    if not parts:
        raise ValueError("merge_scores needs at least one part")
    n = sum(p.get("attention_clips", 0) for p in parts)
    weigh = lambda key: (sum(p[key] * p["attention_clips"] for p in parts if p.get("attention_clips"))  # noqa: E731
                         / n if n else float("nan"))
    return {**{k: v for k, v in parts[0].items() if k != "clips"},
            "attention_gflops_per_clip": weigh("attention_gflops_per_clip"),
            "tokens_per_clip": weigh("tokens_per_clip"),
            "attention_clips": n, "seconds": max(p["seconds"] for p in parts),
            "clips": sorted((c for p in parts for c in p["clips"]), key=lambda c: (c["length"], c["id"]))}


def _acc(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def constant_answer_accuracy(results: dict[str, dict[str, Any]]) -> float | None:
    """The best accuracy of a model that ignores its input: always the benchmark's most frequent
    caption (counted over every clip scored by any model)."""
    from collections import Counter

    truths = {c["id"]: c["truth"] for r in results.values() for c in r["clips"]}
    return max(Counter(truths.values()).values()) / len(truths) if truths else None


def summarize(scored: dict[str, Any]) -> dict[str, Any]:
    """Accuracies overall, per length and per position bin, and accuracy per attention GFLOP."""
    rows = [r for r in scored["clips"] if "error" not in r]
    lengths = sorted({r["length"] for r in rows})
    out: dict[str, Any] = {"n": len(rows), "errors": len(scored["clips"]) - len(rows),
                           "nonfinite": sum(1 for r in rows if r.get("nonfinite"))}
    for key in ("caption_correct", "choice_correct", "attributes_correct", *(f"{a}_correct" for a in ATTRIBUTES)):
        out[key] = _acc(rows, key)
        out[f"{key}_by_length"] = {str(n): _acc([r for r in rows if r["length"] == n], key) for n in lengths}
        out[f"{key}_by_position"] = {p: _acc([r for r in rows if position_bin(r["position"]) == p], key)
                                     for p in POSITIONS}
    g = scored["attention_gflops_per_clip"]
    best = out["choice_correct"] if out["choice_correct"] is not None else out["caption_correct"]
    out["accuracy_per_attention_gflop"] = (best / g) if (best is not None and g and g > 0) else None
    return out


def report(results: dict[str, dict[str, Any]], out_dir: str | Path, title: str = "Long-clip benchmark",
           note: str = "", *, stem: str = "longclip", meta: dict[str, Any] | None = None,
           failed: dict[str, str] | None = None) -> tuple[Path, Path, Path]:
    """Write <stem>.json, <stem>.md and <stem>.png for {model name: score_model result}.

    A result may carry ``train`` (its run's summary: steps, stopped_by, seconds, last_loss),
    shown beside its scores; ``meta`` (e.g. GPU, library versions) goes into the JSON and under
    the title; ``failed`` names models meant to be compared that produced no model, and why."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    failed = dict(failed or {})
    summ = {name: summarize(r) for name, r in results.items()}
    payload = {name: {**{k: v for k, v in r.items() if k != "clips"}, "summary": summ[name], "clips": r["clips"]}
               for name, r in results.items()}
    chance, const = 1 / len(event_captions()), constant_answer_accuracy(results)
    js = out / f"{stem}.json"
    js.write_text(json.dumps({"chance_choice": chance, "constant_answer": const, "note": note, "meta": meta or {},
                              "failed": failed, "models": payload}, indent=2))

    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lengths = sorted({int(k) for s in summ.values() for k in s["caption_correct_by_length"]})
    lines = [f"# {title}", ""]
    if meta:
        lines += ["; ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))), ""]
    if note:
        lines += [note, ""]
    lines += [f"Multiple-choice chance: 1/{len(event_captions())} = {chance:.3f}; a model that ignores its input "
              f"scores at most {f(const)} (always the most frequent caption). caption: the generated caption names "
              "colour, shape and tone; choice: the true caption has the highest likelihood of the 24; colour / "
              "shape / tone: each named right by the caption (chance 0.25 / 0.33 / 0.50: the tone is heard, colour "
              "and shape are seen).", "",
              "| model | schedule | train steps | last loss | frames | tokens/clip | attn GFLOPs/clip | caption acc | "
              "choice acc | attribute acc | colour / shape / tone | acc per attn GFLOP | clips | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s, t = summ[name], r.get("train") or {}
        steps = "-" if t.get("steps") is None else f"{t['steps']}" + (
            " (time)" if t.get("stopped_by") == "max_minutes" else "")
        loss = f"{t['last_loss']:.3f}" if isinstance(t.get("last_loss"), (int, float)) else "-"
        clips = f"{s['n']}" + (f" ({s['errors']} errors)" if s["errors"] else "") + (
            f" ({s['nonfinite']} non-finite)" if s["nonfinite"] else "")
        lines.append(f"| {name} | {r['schedule']} | {steps} | {loss} | {r['frames']} | {r['tokens_per_clip']:.0f} | "
                     f"{r['attention_gflops_per_clip']:.3f} | {f(s['caption_correct'])} | {f(s['choice_correct'])} | "
                     f"{f(s['attributes_correct'])} | {' / '.join(f(s[f'{a}_correct']) for a in ATTRIBUTES)} | "
                     f"{f(s['accuracy_per_attention_gflop'])} | {clips} | "
                     f"{r['seconds']} |")
    for name, why in failed.items():
        lines.append(f"| {name} | no model: {why} |" + " - |" * 12)
    for key, label in (("choice_correct", "choice accuracy"), ("caption_correct", "caption accuracy")):
        lines += ["", f"## {label} by clip length (frames) and event position", "",
                  "| model | " + " | ".join(str(n) for n in lengths) + " | " + " | ".join(POSITIONS) + " |",
                  "|---" * (1 + len(lengths) + len(POSITIONS)) + "|"]
        for name in results:
            s = summ[name]
            lines.append(f"| {name} | " + " | ".join(f(s[f'{key}_by_length'].get(str(n))) for n in lengths) + " | "
                         + " | ".join(f(s[f'{key}_by_position'][p]) for p in POSITIONS) + " |")
    md = out / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    png = out / f"{stem}.png"
    plot(summ, png, lengths, const)
    return js, md, png


def plot(summ: dict[str, dict], path: Path, lengths: list[int], constant: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    chance = 1 / len(event_captions())
    for i, (name, s) in enumerate(summ.items()):
        colour = f"C{i}"
        for key, style, lab in (("choice_correct", "-", "choice"), ("caption_correct", "--", "caption")):
            ys = [s[f"{key}_by_length"].get(str(n)) for n in lengths]
            a.plot(lengths, [math.nan if y is None else y for y in ys], style, marker="o", color=colour,
                   label=f"{name} ({lab})")
            ps = [s[f"{key}_by_position"][p] for p in POSITIONS]
            b.plot(range(3), [math.nan if y is None else y for y in ps], style, marker="o", color=colour,
                   label=f"{name} ({lab})")
    for ax in (a, b):
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="choice chance")
        if constant is not None:
            ax.axhline(constant, color="black", lw=0.8, ls="-.", label="constant answer")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    a.set_xscale("log", base=2)
    a.set_xticks(lengths, [str(n) for n in lengths])
    a.set_xlabel("clip length (frames, 8 fps)")
    a.set_title("accuracy vs clip length")
    b.set_xticks(range(3), list(POSITIONS))
    b.set_xlabel("event position in the clip")
    b.set_title("accuracy vs event position")
    b.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(models: dict[str, str | Path], out_dir: str | Path, *, lengths: Sequence[int] = DEFAULT_LENGTHS,
        clips_per_length: int = 8, frames: int | None = None, batch: int = 4, device: str = "cpu",
        backend: str = "auto", size: tuple[int, int] = (32, 32), seed: int = 7, choice: bool = True,
        data_dir: str | Path | None = None, note: str = "", workers: int = 1) -> dict[str, Any]:
    """Generate (or reuse) the benchmark clips, score every model, write the report."""
    manifest = make_benchmark(data_dir or Path(out_dir) / "data", lengths, clips_per_length, seed, size,
                              workers=workers)
    results = {name: score_model(d, manifest, frames=frames, batch=batch, device=device, backend=backend,
                                 choice=choice, label=name) for name, d in models.items()}
    report(results, out_dir, note=note)
    return {name: summarize(r) for name, r in results.items()}
