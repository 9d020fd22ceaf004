"""Where a run starts from: the checks of ``--resume`` and the weights of ``--init-from``.

``check_resume`` runs before anything is made or changed: a complete run comes back as its summary,
and a config that differs from the checkpoint's beyond ``RESUME_MAY_CHANGE`` is a ``ResumeMismatch``
naming every differing key. ``init_source`` / ``load_init_weights``: a new run (step 0) from another
run's exported weights and tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from . import checkpoint as ckpt
from .config import TrainConfig, normalized_tree, to_dict


class ResumeMismatch(ValueError):
    """``--resume`` with values that differ from the checkpoint's config."""


# Keys a resume may change: they extend or observe the run without changing what it trains on
# or how (run.steps extends it; the learning-rate schedule keeps the checkpoint's length), or
# choose how the same attention is computed (kernels.*: backend and kernel tuning, e.g. on
# another GPU).
RESUME_MAY_CHANGE = ("run.name", "run.dir", "run.steps", "run.max_minutes", "run.log_every", "run.progress",
                     "run.tensorboard", "run.plot", "run.threads", "data.num_workers", "eval.", "checkpoint.",
                     "kernels.")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Dotted keys whose value in ``cfg`` differs from the checkpoint's ``saved`` config, less
    those a resume may change (``RESUME_MAY_CHANGE``); each as ``key: saved -> new``."""
    a, b = _flat(normalized_tree(saved)), _flat(to_dict(cfg))
    out = []
    for k in sorted(set(a) | set(b)):
        if k in RESUME_MAY_CHANGE or k.startswith(tuple(p for p in RESUME_MAY_CHANGE if p.endswith("."))):
            continue
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return out


def check_resume(cfg: TrainConfig, recipe: str | None = None) -> dict[str, Any] | None:
    """Before anything is made or changed: the summary of a run that is already complete (the
    caller returns it, touching nothing), or None to go on resuming. ``ResumeMismatch`` when
    ``cfg`` differs from the checkpoint's config beyond the keys a resume may change."""
    run_dir = cfg.run_dir()
    found = ckpt.newest_complete(run_dir / "checkpoints")
    if found is None:
        return None  # ckpt.load names what is missing
    tag, marker = found
    saved = marker.get("config")
    if saved is None and (run_dir / "config.yaml").is_file():  # checkpoints older than the marker's copy
        import yaml

        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    step = int(marker.get("step", 0))
    diffs = config_differences(saved, cfg) if isinstance(saved, dict) else []
    new_run = (f"to train with these values from its weights, start a new run: mmsparse train {recipe or 'RECIPE'} "
               f"... run.name=<new name> --init-from {run_dir}")
    if step >= cfg.run.steps:
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"steps": step}
        msg = (f"{run_dir} is complete (checkpoint {tag} at step {step} of run.steps={cfg.run.steps}); nothing "
               f"to resume, nothing changed. To train longer: --resume run.steps=<more>")
        if diffs:
            msg += f". These values differ from the run's and were not applied: {'; '.join(diffs)}; {new_run}"
        if int(os.environ.get("RANK", 0)) == 0:
            print(msg, flush=True)
        return {**summary, "already_complete": True}
    if diffs:
        raise ResumeMismatch(f"cannot resume {run_dir} (checkpoint {tag}, step {step}) with a different config: "
                             f"{'; '.join(diffs)}. A resume may change only {', '.join(RESUME_MAY_CHANGE)}; "
                             f"{new_run}")
    return None


# ------------------------------------------------------------------------------------------------
# --init-from


def init_source(path: str | Path) -> Path:
    """The export folder (model.safetensors, config.json, tokenizer.json) that ``--init-from
    PATH`` names: a run folder (its ``export``) or an export folder."""
    p = Path(path)
    for d in (p / "export", p):
        if (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file():
            return d
    raise FileNotFoundError(f"--init-from {p}: expected a run folder with export/model.safetensors and "
                            f"export/tokenizer.json, or such an export folder (runs export at their end, "
                            f"checkpoint.export=true)")


def load_init_weights(model: nn.Module, export: Path) -> None:
    """Copy the exported weights into ``model``; every parameter must match by name and shape."""
    from safetensors.torch import load_file

    state = load_file(str(export / "model.safetensors"))
    expected = {k: v for k, v in model.state_dict().items() if k != "decoder.head.weight"}  # tied
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} there, {tuple(v.shape)} here" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"--init-from {export}: its weights do not fit model {type(model).__name__} of this config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}); use the "
                         f"same model.name and model.overrides as that run")
    model.load_state_dict(state, strict=False)
