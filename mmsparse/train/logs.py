"""Run logs on rank 0: tqdm progress, tensorboard, ``metrics.jsonl`` and ``curves.png``.

``metrics.jsonl`` holds one JSON object per line: ``{"step", "split": "train"|"eval", ...}``
with floats written at full precision (``repr``), so two runs can be compared exactly. On
resume, records past the resumed step (written by the killed run after its last checkpoint)
are dropped first, so the file always tells one consistent curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmsparse.fileio import atomic_write_text


def read_metrics(path: str | Path, split: str | None = "train") -> list[dict]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if split is None or rec.get("split") == split:
            out.append(rec)
    return out


class RunLogger:
    """Logging sinks of one run; every method is a no-op off rank 0."""

    def __init__(self, run_dir: str | Path, rank: int, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.writer = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training without it
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl.is_file():
            return
        keep = [r for r in read_metrics(self.jsonl, None) if r.get("step", 0) <= step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        rec = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self.writer is not None:
            for k, v in rec.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{split}/{k}", v, step)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=True)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _plain(v: Any) -> Any:
    try:
        import torch

        if isinstance(v, torch.Tensor):
            v = v.detach().float().mean().item() if v.numel() else float("nan")
    except ImportError:
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def plot_curves(jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Training loss, eval loss, learning rate and throughput against step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metrics(jsonl, "train")
    evals = read_metrics(jsonl, "eval")
    if not train:
        return None
    panels = [("loss", "loss"), ("lr", "learning rate"), ("clips_per_s", "clips / s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label="train", lw=1.2)
        if key == "loss":
            ev = [(r["step"], r["loss"]) for r in evals if isinstance(r.get("loss"), (int, float))]
            if ev:
                ax.plot(*zip(*ev), "o-", label="eval", ms=4)
            ax.set_yscale("log")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
