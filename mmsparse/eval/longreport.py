"""Report of the long-clip benchmark v2: merge finished runs, intervals, tables, plots.

``merge(folders)`` reads every ``<arm>-s<seed>-<budget>.json`` (``mmsparse.eval.longbench``)
under the folders, keeps the runs of one spec (refusing a mix: runs of another spec are listed,
not merged), and ``write(report, out, stem)`` writes ``<stem>.json``, ``<stem>.md`` and
``<stem>.png``. Every accuracy cell pools the clips of all seeds with a 95 % Wilson interval and
also gives the seeds' mean and spread (min-max); the majority baseline of each task is the most
frequent answer of its eval clips (balanced sets: 1 / answers). Each run says whether its loss
reached a plateau (``plateau``), so "undertrained" and "cannot learn" are told apart.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from mmsparse.data import longtasks as lt


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of k successes in n trials."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exactly 0 / 1 at k = 0 / n (rounding leaves 1 - 1e-16, an interval that excludes p)
    return (0.0 if k == 0 else max(0.0, mid - half), 1.0 if k == n else min(1.0, mid + half))


def load_runs(folders: Sequence[str | Path]) -> list[dict]:
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"run folder {folder} does not exist")
        for p in sorted(folder.glob("*-s*-*.json")):
            try:
                r = json.loads(p.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}: not a finished run ({err})") from err
            if isinstance(r, dict) and "spec_key" in r and "rows" in r:
                r["_file"] = str(p)
                runs.append(r)
    return runs


def merge(folders: Sequence[str | Path], spec_key: str | None = None,
          timing: dict[str, dict[str, float | None]] | None = None) -> dict[str, Any]:
    """Summaries of every (arm, budget) over its seeds, for runs of one spec (the most common
    one, or `spec_key`); runs of other specs are listed under "other_specs". `timing`: arm ->
    {length: ms of a training step, measured alone on the device} (``longbench.time_steps``)."""
    runs = load_runs(folders)
    if not runs:
        raise ValueError(f"no finished runs (<arm>-s<seed>-<budget>.json) under {list(map(str, folders))}")
    key = spec_key or Counter(r["spec_key"] for r in runs).most_common(1)[0][0]
    mine = [r for r in runs if r["spec_key"] == key]
    if not mine:
        raise ValueError(f"no run of spec {key}; specs present: {sorted({r['spec_key'] for r in runs})}")
    others = sorted({r["_file"] for r in runs if r["spec_key"] != key})
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in mine:
        groups[(r["arm"], r["budget"])].append(r)
    spec = mine[0]["spec"]
    lengths = [int(n) for n in spec["eval_lengths"]]
    arms = []
    for (arm, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "dense", kv[0])):
        seeds = sorted(r["seed"] for r in rs)
        if len(seeds) != len(set(seeds)):
            raise ValueError(f"arm {arm} budget {budget}: seed repeated in {[r['_file'] for r in rs]}")
        arms.append(_summarize(arm, budget, rs, lengths, (timing or {}).get(arm, {})))
    baselines = {}  # the most frequent answer of each task's eval clips (balanced: 1 / answers)
    for task in lt.TASKS:
        truths = Counter(row["truth"] for row in mine[0]["rows"] if row["task"] == task)
        baselines[task] = max(truths.values()) / sum(truths.values()) if truths else None
    return {"spec_key": key, "spec": spec, "lengths": lengths, "arms": arms, "majority": baselines,
            "other_specs": others, "device": mine[0].get("device"),
            # the distinct versions the runs were made with (runs made before runs recorded them: none)
            "software": [dict(t) for t in sorted({tuple(sorted(r["software"].items())) for r in mine
                                                  if r.get("software")})]}


def _cell(rows: list[dict], key: str, per_seed: dict[int, list[dict]]) -> dict[str, Any]:
    vals = [bool(r[key]) for r in rows if key in r]
    k, n = sum(vals), len(vals)
    lo, hi = wilson(k, n)
    seed_acc = [sum(bool(r[key]) for r in rr if key in r) / max(1, sum(key in r for r in rr)) for rr in per_seed.values()]
    return {"acc": k / n if n else None, "n": n, "ci95": [lo, hi], "seed_mean": sum(seed_acc) / len(seed_acc),
            "seed_min": min(seed_acc), "seed_max": max(seed_acc)}


def _summarize(arm: str, budget: str, rs: list[dict], lengths: list[int], step_ms: dict) -> dict[str, Any]:
    cells: dict[str, dict] = {}
    for task in lt.TASKS:
        for n in lengths:
            per_seed = {r["seed"]: [row for row in r["rows"] if row["task"] == task and row["length"] == n] for r in rs}
            rows = [row for rr in per_seed.values() for row in rr]
            cells[f"{task}@{n}"] = {"choice": _cell(rows, "choice_correct", per_seed),
                                    "caption": _cell(rows, "caption_correct", per_seed)}
    probes: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        for n, res in r["probe"].items():
            for name, acc in res.items():
                probes[f"{name}@{n}"].append(acc)
    cost = rs[0]["cost"]["per_length"]
    return {"arm": arm, "budget": budget, "config": rs[0]["arm_config"], "seeds": sorted(r["seed"] for r in rs),
            "steps": rs[0]["steps"], "capped": any(r["capped"] for r in rs),
            "train_flops": rs[0]["train_flops"], "final_loss": [r["final_loss"] for r in rs],
            "train_seconds": [r["train_seconds"] for r in rs],
            "attention_flops_per_clip": {n: c["attention"] for n, c in cost.items()},
            "attention_fraction_of_dense": {n: c["attention"] / c["attention_dense"] for n, c in cost.items()},
            "step_ms": step_ms, "cells": cells,
            "probe": {k: sum(v) / len(v) for k, v in sorted(probes.items())},
            "curves": {r["seed"]: r["curve"] for r in rs},
            "plateau": [plateau(r["curve"]) for r in rs]}


# A run is on its loss plateau when the last fifth of its steps took off less than PLATEAU_DROP
# of the loss, or less than PLATEAU_NATS nats per token: near zero loss a relative test reads the
# noise of a 250-step mean as progress (0.0024 -> 0.0012 is "half" and nothing a task can show).
PLATEAU_DROP = 0.02
PLATEAU_NATS = 0.005


def plateau(curve: list[dict]) -> bool | None:
    """Whether the training loss stopped falling: the mean loss of the curve points in the last
    fifth of the steps is within PLATEAU_DROP (relative) or PLATEAU_NATS (absolute) of the point
    before them (None: too few points)."""
    if len(curve) < 3:
        return None
    last = curve[-1]["step"]
    tail = [c["loss"] for c in curve if c["step"] > 0.8 * last]
    head = [c["loss"] for c in curve if c["step"] <= 0.8 * last]
    if not tail or not head:
        return None
    drop = head[-1] - sum(tail) / len(tail)
    return drop < PLATEAU_NATS or drop / head[-1] < PLATEAU_DROP


def write(report: dict[str, Any], out_dir: str | Path, stem: str, title: str = "Long-clip benchmark v2",
          meta: dict | None = None) -> tuple[Path, Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md, png = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    if any(p.exists() for p in (js, md, png)):
        raise FileExistsError(f"{out}/{stem}.* exists: results are never overwritten; choose another label")
    js.write_text(json.dumps({**report, "meta": meta or {}}, indent=1))
    md.write_text(markdown(report, title, meta))
    plot(report, png)
    return js, md, png


def _f(c: dict | None) -> str:
    if not c or c["acc"] is None:
        return "-"
    return f"{c['acc']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"


def _mean_acc(arm: dict[str, Any], frames: int) -> float:
    """Mean choice accuracy over the tasks at one length (nan where a cell is missing)."""
    accs = [arm["cells"].get(f"{t}@{frames}", {}).get("choice", {}).get("acc") for t in lt.TASKS]
    return float(sum(accs) / len(accs)) if all(x is not None for x in accs) else math.nan


def markdown(report: dict[str, Any], title: str, meta: dict | None = None) -> str:
    spec, lengths = report["spec"], report["lengths"]
    lines = [f"# {title}", ""]
    if meta:
        lines += ["; ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    also = f" (sparse arms also {list(spec['sparse_lengths'])})" if spec.get("sparse_lengths") else ""
    lines += [f"Device: {report.get('device')}; spec {report['spec_key']}: train lengths {spec['train_lengths']}{also}, "
              f"{spec['clips']} eval clips per task and length (held-out seed {spec['eval_seed']}), batch "
              f"{spec['batch']}, {spec['steps']} steps (equal-steps budget; equal-FLOPs arms get dense's training "
              f"FLOPs, capped at {spec['max_flops_factor']}x the steps). Accuracy: pooled over seeds, 95 % Wilson "
              "interval in brackets. Majority baselines (the most frequent answer): "
              + ", ".join(f"{t} {b:.2f}" for t, b in report["majority"].items() if b is not None) + ".", ""]
    dense_ms = next((a["step_ms"] for a in report["arms"] if a["arm"] == "dense"), {})
    lines += ["## Arms", "", "Train step: forward and backward of one batch, each arm alone on the device; "
              "speed-up: dense's step time over the arm's (OOM: did not fit).", "",
              "| arm | budget | seeds | steps | train PFLOPs | final loss (per seed) | on a plateau | attention / dense at "
              + " / ".join(map(str, lengths)) + " | train step ms at " + " / ".join(map(str, lengths))
              + " | speed-up over dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in report["arms"]:
        frac = " / ".join(f"{a['attention_fraction_of_dense'].get(str(n), math.nan):.3f}" for n in lengths)
        ms = " / ".join("-" if str(n) not in a["step_ms"] else "OOM" if a["step_ms"][str(n)] is None
                        else f"{a['step_ms'][str(n)]:.0f}" for n in lengths)
        speed = " / ".join(f"{dense_ms[str(n)] / a['step_ms'][str(n)]:.1f}x" if dense_ms.get(str(n))
                           and a["step_ms"].get(str(n)) else "-" for n in lengths)
        loss = " / ".join(f"{x:.3f}" for x in a["final_loss"])
        flat = " / ".join({True: "yes", False: "no (still falling)", None: "-"}[x] for x in a["plateau"])
        lines.append(f"| {a['arm']} | {a['budget']} | {len(a['seeds'])} | {a['steps']}{' (capped)' if a['capped'] else ''}"
                     f" | {a['train_flops'] / 1e15:.2f} | {loss} | {flat} | {frac} | {ms} | {speed} |")
    lines += ["", "## Cost and accuracy per attention FLOP", "",
              "Encoder attention GFLOPs per clip (forward), and the choice accuracy over the four tasks (mean of "
              "the task cells) per attention TFLOP, at each length.", "",
              "| arm | budget | attention GFLOPs per clip at " + " / ".join(map(str, lengths))
              + " | mean accuracy at " + " / ".join(map(str, lengths))
              + " | accuracy per attention TFLOP at " + " / ".join(map(str, lengths)) + " |", "|---|---|---|---|---|"]
    for a in report["arms"]:
        flops = [a["attention_flops_per_clip"].get(str(n)) for n in lengths]
        acc = [_mean_acc(a, n) for n in lengths]
        lines.append(f"| {a['arm']} | {a['budget']} | " + " / ".join("-" if f is None else f"{f / 1e9:.3g}" for f in flops)
                     + " | " + " / ".join(f"{x:.2f}" for x in acc) + " | "
                     + " / ".join("-" if not f else f"{x / (f / 1e12):.3g}" for x, f in zip(acc, flops)) + " |")
    for metric in ("choice", "caption"):
        lines += ["", f"## {metric} accuracy by task and length (frames)", "",
                  "| arm | budget | " + " | ".join(f"{t} {n}" for t in lt.TASKS for n in lengths) + " |",
                  "|---|---|" + "---|" * (len(lt.TASKS) * len(lengths))]
        for a in report["arms"]:
            lines.append(f"| {a['arm']} | {a['budget']} | "
                         + " | ".join(_f(a["cells"][f"{t}@{n}"][metric]) for t in lt.TASKS for n in lengths) + " |")
    lines += ["", "## Seed spread (choice accuracy: mean, min-max over seeds)", "",
              "| arm | budget | " + " | ".join(f"{t} {n}" for t in lt.TASKS for n in lengths) + " |",
              "|---|---|" + "---|" * (len(lt.TASKS) * len(lengths))]
    for a in report["arms"]:
        cells = [a["cells"][f"{t}@{n}"]["choice"] for t in lt.TASKS for n in lengths]
        lines.append(f"| {a['arm']} | {a['budget']} | " + " | ".join(
            f"{c['seed_mean']:.2f} ({c['seed_min']:.2f}-{c['seed_max']:.2f})" for c in cells) + " |")
    probe_keys = sorted({k for a in report["arms"] for k in a["probe"]})
    if probe_keys:
        lines += ["", "## Linear probe on the encoder's output (accuracy, mean over seeds)", "",
                  "| arm | budget | " + " | ".join(probe_keys) + " |", "|---|---|" + "---|" * len(probe_keys)]
        for a in report["arms"]:
            lines.append(f"| {a['arm']} | {a['budget']} | " + " | ".join(
                f"{a['probe'].get(k, math.nan):.2f}" for k in probe_keys) + " |")
    checks = report.get("backend_checks") or []
    if checks:
        lines += ["", "## The same trained models under each backend (answers must agree)", "",
                  "| run | frames | clips | comparison | same answer | max abs log-likelihood difference |",
                  "|---|---|---|---|---|---|"]
        for c in checks:
            for key, v in ((k, v) for k, v in c.items() if "_vs_" in k):
                lines.append(f"| {c['run']} | {c['frames']} | {c['clips']} | {key} | "
                             f"{v['same_choice']:.3f} | {v['max_abs_ll_diff']:.2e} |")
    if report["other_specs"]:
        lines += ["", f"Runs of other specs, not merged: {len(report['other_specs'])}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = report["lengths"]
    fig, axes = plt.subplots(1, len(lt.TASKS) + 1, figsize=(4 * (len(lt.TASKS) + 1), 3.6))
    for i, a in enumerate(report["arms"]):
        colour, style = f"C{i}", "-" if a["budget"] == "steps" else "--"
        label = f"{a['arm']} ({a['budget']})"
        for ax, task in zip(axes, lt.TASKS):
            ys = [a["cells"][f"{task}@{n}"]["choice"]["acc"] for n in lengths]
            lo = [a["cells"][f"{task}@{n}"]["choice"]["ci95"][0] for n in lengths]
            hi = [a["cells"][f"{task}@{n}"]["choice"]["ci95"][1] for n in lengths]
            ax.errorbar(lengths, ys, yerr=[[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]],
                        fmt=style, marker="o", color=colour, capsize=2, label=label)
        for seed, curve in a["curves"].items():
            axes[-1].plot([c["step"] for c in curve], [c["val_choice"] for c in curve], style, color=colour,
                          alpha=0.7, label=label if str(seed) == str(a["seeds"][0]) else None)
    for ax, task in zip(axes, lt.TASKS):
        if report["majority"].get(task) is not None:
            ax.axhline(report["majority"][task], color="grey", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task} (choice accuracy, 95 % CI)")
        ax.set_xlabel("clip length (frames)")
    axes[-1].set_title("validation choice accuracy vs step")
    axes[-1].set_xlabel("training step")
    axes[-1].set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
