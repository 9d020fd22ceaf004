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
``longclip.json``, ``longclip.md`` and ``longclip.png``.
"""

from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path
from typing import Any, Sequence

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
POSITIONS = ("early", "middle", "late")


def event_captions() -> list[str]:
    """Every caption a long synthetic clip can have (the multiple-choice candidates)."""
    from mmsparse.data.synth import COLOURS, SHAPES, TONES

    return [f"a {c} {s} appears with a {t} tone" for c, s, t in product(COLOURS, SHAPES, TONES)]


def make_benchmark(out_dir: str | Path, lengths: Sequence[int] = DEFAULT_LENGTHS, clips_per_length: int = 8,
                   seed: int = 7, size: tuple[int, int] = (32, 32), fps: int = 8) -> Path:
    """Write the clips (once per spec) and return the combined manifest (``manifest.jsonl``).

    Each line keeps the generator's ``events``, ``frames`` and ``fps`` and adds ``length`` and
    ``position`` (the event start as a fraction of the span where it can start)."""
    from mmsparse.data import load_manifest, synth, write_manifest

    root = Path(out_dir)
    spec = json.dumps({"lengths": list(lengths), "clips": clips_per_length, "seed": seed, "size": list(size),
                       "fps": fps})
    manifest = root / "manifest.jsonl"
    done = root / "done.json"
    if done.is_file() and done.read_text() == spec and manifest.is_file():
        return manifest
    records = []
    for n in lengths:
        sub = root / f"len{n}"
        m = synth.make_dataset(sub, clips=clips_per_length, seed=seed + n, size=tuple(size), long=True, fps=fps,
                               long_frames=(n, n), images=0)
        for s in load_manifest(m):
            ev = next(e for e in s.meta["events"] if e["kind"] == "shape")
            span = max(1, n - fps)  # the event lasts fps frames; its start is drawn from [0, n - fps]
            records.append({"id": f"L{n:04d}-{s.id}", "video": str(s.video.relative_to(root.resolve())),
                            "caption": list(s.captions), "frames": n, "fps": fps, "events": s.meta["events"],
                            "length": n, "position": round(ev["start_frame"] / span, 4)})
    write_manifest(manifest, records)
    done.write_text(spec)
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


def score_model(model_dir: str | Path, manifest: str | Path, *, frames: int | None = None, batch: int = 4,
                beam: int = 1, device: str = "cpu", backend: str = "auto", choice: bool = True,
                limit: int | None = None) -> dict[str, Any]:
    """Caption (and multiple-choice score) every clip of the benchmark with one model."""
    import time

    from mmsparse.data import load_manifest
    from mmsparse.infer import Captioner

    samples = load_manifest(manifest)
    if limit:
        samples = samples[:limit]
    cap = Captioner(model_dir, device=device, backend=backend, max_frames=frames)
    cost = AttentionCost(cap.model)
    cands = event_captions() if choice else None
    t0 = time.perf_counter()
    try:
        records = cap.caption(samples, beam=beam, frames=frames, batch=batch, candidates=cands, max_len=16,
                              count_attention=cost)
    finally:
        cost.close()
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
                       attributes_correct=sum(got[k] == want[k] for k in want) / 3)
            if cands is not None:
                row["choice"] = r["choice"]
                row["choice_correct"] = r["choice"] == s.caption
        clips.append(row)
    return {"model": str(cap.model_dir), "schedule": cap.model.cfg.schedule, "frames": frames or cap.preprocess.frames,
            "attention_gflops_per_clip": cost.per_clip() / 1e9, "tokens_per_clip": cost.tokens / max(cost.clips, 1),
            "seconds": round(wall, 2), "clips": clips}


def _acc(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def summarize(scored: dict[str, Any]) -> dict[str, Any]:
    """Accuracies overall, per length and per position bin, and accuracy per attention GFLOP."""
    rows = [r for r in scored["clips"] if "error" not in r]
    lengths = sorted({r["length"] for r in rows})
    out: dict[str, Any] = {"n": len(rows), "errors": len(scored["clips"]) - len(rows)}
    for key in ("caption_correct", "choice_correct", "attributes_correct"):
        out[key] = _acc(rows, key)
        out[f"{key}_by_length"] = {str(n): _acc([r for r in rows if r["length"] == n], key) for n in lengths}
        out[f"{key}_by_position"] = {p: _acc([r for r in rows if position_bin(r["position"]) == p], key)
                                     for p in POSITIONS}
    g = scored["attention_gflops_per_clip"]
    best = out["choice_correct"] if out["choice_correct"] is not None else out["caption_correct"]
    out["accuracy_per_attention_gflop"] = (best / g) if (best is not None and g and g > 0) else None
    return out


def report(results: dict[str, dict[str, Any]], out_dir: str | Path, title: str = "Long-clip benchmark",
           note: str = "") -> tuple[Path, Path, Path]:
    """Write longclip.json, longclip.md and longclip.png for {model name: score_model result}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summ = {name: summarize(r) for name, r in results.items()}
    payload = {name: {**{k: v for k, v in r.items() if k != "clips"}, "summary": summ[name], "clips": r["clips"]}
               for name, r in results.items()}
    js = out / "longclip.json"
    js.write_text(json.dumps({"chance_choice": 1 / len(event_captions()), "note": note, "models": payload}, indent=2))

    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lengths = sorted({int(k) for s in summ.values() for k in s["caption_correct_by_length"]})
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    lines += [f"Multiple-choice chance: 1/{len(event_captions())} = {1 / len(event_captions()):.3f}. "
              "caption: the generated caption names colour, shape and tone; choice: the true caption has "
              "the highest likelihood of the 24.", "",
              "| model | schedule | frames | tokens/clip | attn GFLOPs/clip | caption acc | choice acc | "
              "attribute acc | acc per attn GFLOP | clips | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = summ[name]
        lines.append(f"| {name} | {r['schedule']} | {r['frames']} | {r['tokens_per_clip']:.0f} | "
                     f"{r['attention_gflops_per_clip']:.3f} | {f(s['caption_correct'])} | {f(s['choice_correct'])} | "
                     f"{f(s['attributes_correct'])} | {f(s['accuracy_per_attention_gflop'])} | {s['n']} | {r['seconds']} |")
    for key, label in (("choice_correct", "choice accuracy"), ("caption_correct", "caption accuracy")):
        lines += ["", f"## {label} by clip length (frames) and event position", "",
                  "| model | " + " | ".join(str(n) for n in lengths) + " | " + " | ".join(POSITIONS) + " |",
                  "|---" * (1 + len(lengths) + len(POSITIONS)) + "|"]
        for name in results:
            s = summ[name]
            lines.append(f"| {name} | " + " | ".join(f(s[f'{key}_by_length'].get(str(n))) for n in lengths) + " | "
                         + " | ".join(f(s[f'{key}_by_position'][p]) for p in POSITIONS) + " |")
    md = out / "longclip.md"
    md.write_text("\n".join(lines) + "\n")
    png = out / "longclip.png"
    plot(summ, png, lengths)
    return js, md, png


def plot(summ: dict[str, dict], path: Path, lengths: list[int]) -> Path:
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
        data_dir: str | Path | None = None, note: str = "") -> dict[str, Any]:
    """Generate (or reuse) the benchmark clips, score every model, write the report."""
    manifest = make_benchmark(data_dir or Path(out_dir) / "data", lengths, clips_per_length, seed, size)
    results = {name: score_model(d, manifest, frames=frames, batch=batch, device=device, backend=backend,
                                 choice=choice) for name, d in models.items()}
    report(results, out_dir, note=note)
    return {name: summarize(r) for name, r in results.items()}
