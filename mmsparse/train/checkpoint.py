"""Resumable checkpoints on top of DeepSpeed's, and export to ``save_pretrained``.

Layout of ``<run>/checkpoints``::

    step00000040/                      one DeepSpeed checkpoint (tag = step)
        mp_rank_00_model_states.pt     model + client_state (step, data position, counters) [DeepSpeed]
        *_optim_states.pt              optimizer (+ scheduler) partitions                   [DeepSpeed]
        rank_state_00000.pt ...        this rank's RNG states (torch, cuda, numpy, random)
        complete.json                  written last: every file with its size and sha256
    latest                             the tag of the newest *complete* checkpoint

``latest`` is replaced atomically only after every rank has written its part, every data file
and the folder are fsynced and ``complete.json`` is on disk, so a run killed (or a machine that
crashes) while saving resumes from the previous checkpoint. On resume every file is checked
against ``complete.json`` (present, same size, same hash) before DeepSpeed reads it. A latest
checkpoint that is incomplete, corrupt or unreadable is skipped, with a warning naming the bad
file, for the newest older one that loads; when none does, a ``CheckpointError`` names them all.
Files get the user's umask (0644 by default).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmsparse.fileio import atomic_write_text, fsync_path, replace_dir, set_default_mode, sha256_file

MARKER = "complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, incomplete, corrupt)."""


class WorldSizeMismatch(CheckpointError):
    """A sound checkpoint written by a different number of processes."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def tag_for(step: int) -> str:
    return f"step{step:08d}"




def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _hash_files(tag_dir: Path) -> dict[str, dict]:
    """Every file of the checkpoint with its size and sha256, each fsynced and given the umask's
    mode (DeepSpeed neither flushes its files nor, through torch.save, is asked to); the work is
    split over ranks."""
    rank, world = _rank_world()
    files = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER)
    mine = {}
    for f in files[rank::world]:
        fsync_path(tag_dir / f)
        set_default_mode(tag_dir / f)
        mine[f] = {"size": (tag_dir / f).stat().st_size, "sha256": sha256_file(tag_dir / f)}
    out: dict[str, dict] = {}
    for part in _all_gather(mine):
        out.update(part)
    return out


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` on every rank; move ``latest`` once it is complete."""
    rank, world = _rank_world()
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a partial write of a killed run, or a re-save of the same step
            shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    tag_dir.mkdir(parents=True, exist_ok=True)
    tmp = tag_dir / f"rank_state_{rank:05d}.pt.tmp"
    torch.save({"rank": rank, "world_size": world, "rng": rng_state()}, tmp)
    os.replace(tmp, tag_dir / f"rank_state_{rank:05d}.pt")
    _barrier()
    files = _hash_files(tag_dir)  # every data file fsynced, on every rank
    _barrier()
    if rank == 0:
        for d in sorted({(tag_dir / f).parent for f in files} | {tag_dir}, reverse=True):
            fsync_path(d)  # the files' names, before the marker that vouches for them
        atomic_write_text(tag_dir / MARKER, json.dumps({"tag": tag, "step": step, "world_size": world,
                                                    "config": client_state.get("config"),
                                                    "files": files}, indent=1))
        atomic_write_text(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep, tag)
    _barrier()
    return tag_dir


def _prune(ckpt_dir: Path, keep: int, newest: str) -> None:
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [p for p in tags if (p / MARKER).is_file()]
    drop = complete[:-keep] if keep > 0 else []
    drop += [p for p in tags if not (p / MARKER).is_file() and p.name < newest]  # stale partial writes
    for p in drop:
        shutil.rmtree(p, ignore_errors=True)


def _read_marker(tag_dir: Path) -> dict:
    marker = tag_dir / MARKER
    try:
        data = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {marker} is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint marker {marker} is corrupt: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"checkpoint marker {marker} is corrupt: no file list")
    return data


def latest_tag(ckpt_dir: str | Path) -> str:
    """The tag ``latest`` names, after checking the checkpoint it points at is complete."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {latest} does not exist")
    tag = latest.read_text().strip()
    tag_dir = ckpt_dir / tag
    if not tag or not tag_dir.is_dir():
        raise CheckpointError(f"{latest} names checkpoint {tag!r}, but {tag_dir} does not exist")
    _read_marker(tag_dir)
    return tag


def candidates(ckpt_dir: str | Path) -> list[str]:
    """Tags to try on resume, best first: the one ``latest`` names, then every other checkpoint
    folder, newest first (their markers are checked when they are tried)."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    first = latest.read_text().strip() if latest.is_file() else ""
    others = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")),
                    reverse=True) if ckpt_dir.is_dir() else []
    return ([first] if first else []) + [t for t in others if t != first]


def newest_complete(ckpt_dir: str | Path) -> tuple[str, dict] | None:
    """(tag, marker) of the checkpoint a resume would start from, its files not yet hashed; None
    when there is none. Reads only the markers, so it is cheap and touches nothing."""
    for tag in candidates(ckpt_dir):
        try:
            return tag, _read_marker(Path(ckpt_dir) / tag)
        except CheckpointError:
            continue
    return None


def verify(tag_dir: str | Path) -> dict:
    """Check every file against ``complete.json``; return the marker. Raises CheckpointError."""
    tag_dir = Path(tag_dir)
    marker = _read_marker(tag_dir)
    rank, world = _rank_world()
    problems = []
    names = sorted(marker["files"])
    for name in names[rank::world]:
        meta, path = marker["files"][name], tag_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{path} is truncated or altered: {path.stat().st_size} bytes, expected {meta['size']}")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path} is corrupt: its sha256 differs from the one recorded in {tag_dir / MARKER}")
    problems = sorted(p for part in _all_gather(problems) for p in part)
    if problems:
        raise CheckpointError("cannot resume: " + "; ".join(problems))
    return marker


def _warn(msg: str) -> None:
    if _rank_world()[0] == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def load(engine, ckpt_dir: str | Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from the newest checkpoint that is
    complete and readable; return DeepSpeed's client_state (with ``_tag``: the one used)."""
    ckpt_dir = Path(ckpt_dir)
    tags = candidates(ckpt_dir)
    if not tags:
        raise CheckpointError(f"no checkpoint to resume from: {ckpt_dir / LATEST} does not exist"
                              + ("" if not ckpt_dir.is_dir() else f" and {ckpt_dir} holds no step* folder"))
    problems = []
    for tag in tags:
        try:
            state = _load_tag(engine, ckpt_dir, tag)
        except WorldSizeMismatch:
            raise  # not a damaged checkpoint: an older one would be refused the same way
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            _warn(f"skipped {len(problems)} unusable checkpoint(s) ({'; '.join(problems)}); resuming from "
                  f"the older complete checkpoint {ckpt_dir / tag}")
        return state
    raise CheckpointError("cannot resume: " + "; ".join(problems))


def _load_tag(engine, ckpt_dir: Path, tag: str) -> dict:
    rank, world = _rank_world()
    tag_dir = ckpt_dir / tag
    marker = verify(tag_dir)
    if marker.get("world_size", world) != world:
        raise WorldSizeMismatch(f"checkpoint {tag_dir} was written by {marker['world_size']} processes; "
                              f"this run has {world} (resume with the same number)")
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    except Exception as err:  # DeepSpeed's own errors do not say which file was bad
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}: {type(err).__name__}: {err}") from err
    if path is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {tag_dir}")
    rs = tag_dir / f"rank_state_{rank:05d}.pt"
    try:
        state = torch.load(rs, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read {rs}: {type(err).__name__}: {err}") from err
    set_rng_state(state["rng"])
    client_state = dict(client_state or {})
    client_state["_tag"] = tag
    return client_state


def export_pretrained(engine, model, out_dir: str | Path) -> Path | None:
    """``model.save_pretrained(out_dir)`` on rank 0, with ZeRO-3 partitions gathered first."""
    import contextlib

    rank, _ = _rank_world()
    out_dir = Path(out_dir)
    ctx = contextlib.nullcontext()
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with ctx:
        if rank == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp)
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    fsync_path(f)
            fsync_path(tmp)
            replace_dir(tmp, out_dir)  # the old export is deleted only once the new one is in place
    _barrier()
    return out_dir if rank == 0 else None
