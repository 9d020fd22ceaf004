"""The training loop: data, model + task, DeepSpeed engine, steps, evaluation, checkpoints, logs.

One optimizer step = ``deepspeed.grad_accum`` micro-batches per data-parallel rank. Per step
rank 0 logs loss (mean over micro-batches and ranks), learning rate, gradient norm, clips/s,
tokens/s, attention density (when the task reports it) and MFU (GPU, bf16/fp16) to tqdm,
tensorboard and ``metrics.jsonl``. Evaluation (held-out loss and, for captioning, caption
metrics of generated captions) runs every ``eval.every`` steps and at the end.

Time budget: with ``run.max_minutes`` > 0 the run ends after the first step that finishes past
that many minutes from the start of ``train`` (set-up included; at least one step runs), and
ends as a run that reached ``run.steps`` does: final evaluation, checkpoint, export, summary
(``stopped_by: max_minutes``). The learning-rate schedule still spans ``run.steps``. A resumed
run gets a fresh budget.

Determinism on CPU in fp32: data order comes from the resumable sampler, sample content from
(seed, epoch, index), the DataLoader draws its base seed from its own generator (not the global
RNG), and every rank's RNG states are in the checkpoint, so a resumed run repeats the
uninterrupted run's losses exactly; so do two separate runs, each on synthetic media it generated
itself (the video is lossless: see ``mmsparse.data.synth``).

Failures: a non-finite loss on any rank skips that micro-batch on every rank (counted,
``nonfinite_skipped``) and the run stops after ``run.max_nonfinite_in_row`` in a row; an
out-of-memory error is re-raised as ``TrainOOM`` naming the batch's shapes and the knobs that
lower memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from mmsparse.kernels.options import KernelOptions, kernel_options, set_kernel_options

from . import checkpoint as ckpt
from .config import TrainConfig, data_config, save_config, to_dict
from .deepspeed_config import deepspeed_config
from .distributed import Topology, all_mean, any_true, init
from .logs import RunLogger, plot_curves
from .resume import check_resume, init_source, load_init_weights


class NonFiniteLoss(RuntimeError):
    """Too many NaN / inf losses in a row."""


class TrainOOM(RuntimeError):
    """Out of memory, with the batch shape and the knobs that lower memory."""


# ------------------------------------------------------------------------------------------------
# Data


def prepare_data(cfg: TrainConfig, topo: Topology, run_dir: Path) -> tuple[Path, Path | None]:
    """The train and val manifests; the synthetic default data is generated once, by rank 0."""
    import torch.distributed as dist

    d = cfg.data
    if d.manifest:
        train = Path(d.manifest)
        if not train.is_file():
            raise FileNotFoundError(f"data.manifest {train} does not exist")
        val = Path(d.val_manifest) if d.val_manifest else None
        return train, val
    s = d.synth
    root = run_dir / "data"
    train, val = root / "train" / "manifest.jsonl", root / "val" / "manifest.jsonl"
    done = root / "done.json"
    from mmsparse.data import synth

    spec = json.dumps({**to_dict(s), "format": synth.FORMAT}, sort_keys=True)
    if topo.is_main and not (done.is_file() and done.read_text() == spec):
        kw = dict(frames=s.frames, size=tuple(s.size), long=s.long, long_frames=tuple(s.long_frames),
                  long_lengths=s.long_lengths, frame_code=s.frame_code, empty_fraction=s.empty_fraction, images=0)
        synth.make_dataset(root / "train", clips=s.clips, seed=s.seed, **kw)
        if s.val_clips:
            synth.make_dataset(root / "val", clips=s.val_clips, seed=s.seed + 1000, **kw)
        done.write_text(spec)
    if dist.is_initialized():
        dist.barrier()
    return train, (val if s.val_clips else None)


def make_loaders(cfg: TrainConfig, topo: Topology, train_manifest: Path, val_manifest: Path | None):
    from mmsparse.data import make_loader

    seed = cfg.run.seed
    # pinned batches: _to_device's non-blocking copies then leave the host free to queue the step
    pin = topo.device.type == "cuda"
    # rank = data-parallel rank: the members of a sequence-parallel group draw the same clips
    train = make_loader(train_manifest, data_config(cfg, train=True), batch_size=cfg.data.batch_size,
                        num_workers=cfg.data.num_workers, rank=topo.dp_rank, num_replicas=topo.dp,
                        drop_last=True, pin_memory=pin)
    # the iterator's base seed must not come from (and advance) the global RNG: a resumed run
    # creates its iterator at a different point than the uninterrupted one
    train.generator = torch.Generator().manual_seed(seed)
    if len(train.sampler) < cfg.data.batch_size:
        raise ValueError(f"{train_manifest}: {train.sampler.num_samples} samples per data-parallel rank, fewer "
                         f"than data.batch_size={cfg.data.batch_size}")
    val = None
    if val_manifest is not None:
        val = make_loader(val_manifest, data_config(cfg, train=False), batch_size=cfg.data.batch_size,
                          num_workers=cfg.data.num_workers, rank=topo.dp_rank, num_replicas=topo.dp, shuffle=False,
                          pin_memory=pin)
        val.generator = torch.Generator().manual_seed(seed)
    return train, val


@dataclass
class DataPosition:
    epoch: int = 0
    batches: int = 0   # batches of this epoch consumed by the loop


def batches(loader, pos: DataPosition) -> Iterator[dict]:
    """Endless batches across epochs, tracking what the loop has consumed."""
    sampler, dataset = loader.sampler, loader.dataset
    while True:
        sampler.set_epoch(pos.epoch)
        dataset.set_epoch(pos.epoch)
        for batch in loader:
            pos.batches += 1
            yield batch
        pos.epoch += 1
        pos.batches = 0


# ------------------------------------------------------------------------------------------------
# Model and task


class TaskModule(nn.Module):
    """What DeepSpeed wraps: forward(batch) -> (loss, metrics) of the task's training_forward."""

    def __init__(self, task, model: nn.Module):
        super().__init__()
        self.model = model
        self.task = task if isinstance(task, nn.Module) else None
        self._task = task

    def forward(self, batch: dict):
        return self._task.training_forward(batch)


def build_model(cfg: TrainConfig, train_manifest: Path, run_dir: Path, topo: Topology):
    """(model, task, init report or None) from the registry, with the pretrained encoder weights
    of ``model.init`` and the freezing of ``model.freeze``. The caption tokenizer is trained once
    on the train manifest by rank 0 and kept in the run folder (a resumed run reuses it)."""
    import torch.distributed as dist

    from mmsparse import models
    from mmsparse.data.manifest import manifest_captions
    from mmsparse.data.transforms import TransformConfig, pixel_norm
    from mmsparse.models.pretrained import create_initialised, freeze
    from mmsparse.models.text import CaptionTokenizer

    model, report = create_initialised(cfg.model.name, cfg.model.overrides, cfg.model.init,
                                       data_norm=pixel_norm(TransformConfig(normalize=cfg.data.normalize)))
    fz = cfg.model.freeze
    frozen = freeze(model, fz.encoder, fz.patch_embed, fz.blocks)
    if report is not None:
        report.frozen = frozen
    tok_path = run_dir / "tokenizer.json"
    if topo.is_main and not tok_path.is_file():
        tok = CaptionTokenizer.train(manifest_captions(train_manifest), vocab_size=model.cfg.vocab_size)
        tmp = tok_path.with_name("tokenizer.json.tmp")
        tok.save(tmp)
        os.replace(tmp, tok_path)
    if dist.is_initialized():
        dist.barrier()
    model.set_tokenizer(CaptionTokenizer.load(tok_path))
    task_cls = {"caption": models.CaptionTask, "contrastive": models.ContrastiveTask}[cfg.model.task]
    return model, task_cls(model), report


class StreamStats:
    """Counts encoder tokens and the attention density of each block's layout, through hooks."""

    def __init__(self, blocks: nn.ModuleList):
        self.tokens = 0
        self.densities: list[float] = []
        self._cache: dict[int, float] = {}
        blocks[0].register_forward_pre_hook(self._count)
        for blk in blocks:
            blk.register_forward_pre_hook(self._density)

    def _count(self, _m, args):
        if torch.is_grad_enabled():
            x = args[0]
            self.tokens += x.shape[0] * x.shape[1]

    def _density(self, _m, args):
        if not torch.is_grad_enabled():
            return
        layout = args[1] if len(args) > 1 else None
        if layout is None:
            self.densities.append(1.0)
            return
        key = id(layout)
        if key not in self._cache:
            try:
                self._cache[key] = float(layout.density())
            except Exception:  # stats must never break a step
                self._cache[key] = float("nan")
        self.densities.append(self._cache[key])

    def take(self) -> tuple[int, float | None]:
        t, d = self.tokens, self.densities
        self.tokens, self.densities = 0, []
        d = [v for v in d if math.isfinite(v)]
        return t, (sum(d) / len(d) if d else None)


# ------------------------------------------------------------------------------------------------
# Steps


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype | None) -> dict:
    """Tensors to ``device`` (float32 ones cast to ``dtype``), except the entries the tokenizer
    reads on the host (``HOST_KEYS``: padding flags and times stay put, it copies what it needs)."""
    from mmsparse.encoders import HOST_KEYS

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k not in HOST_KEYS:
            v = v.to(device, non_blocking=True)
            if dtype is not None and v.dtype == torch.float32:
                v = v.to(dtype)
        out[k] = v
    return out


def _shapes(batch: dict) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor))


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _oom_message(cfg: TrainConfig, batch: dict) -> str:
    ds = cfg.deepspeed
    return (f"out of memory on a batch of {_shapes(batch)} (data.batch_size={cfg.data.batch_size}, "
            f"data.frames={cfg.data.frames}, deepspeed.zero_stage={ds.zero_stage}, precision={ds.precision}, "
            f"activation_checkpointing={ds.activation_checkpointing}, "
            f"sequence_parallel_size={ds.sequence_parallel_size}). Lower memory with: data.batch_size=<smaller> "
            f"(and deepspeed.grad_accum=<larger> to keep the batch), data.frames=<fewer>, "
            f"deepspeed.activation_checkpointing=true, deepspeed.precision=bf16, deepspeed.zero_stage=3, "
            f"deepspeed.offload_optimizer=cpu, deepspeed.offload_param=cpu, "
            f"deepspeed.sequence_parallel_size=<more GPUs per clip>")


def _scalar_metrics(m: dict) -> dict[str, float]:
    out = {}
    for k, v in (m or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.detach().float().item())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12}


def _peak_flops(cfg: TrainConfig) -> float | None:
    if not torch.cuda.is_available() or cfg.deepspeed.precision == "fp32":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(engine, model, val, cfg: TrainConfig, topo: Topology, dtype) -> dict[str, Any]:
    import contextlib

    import torch.distributed as dist

    engine.eval()
    losses, n = 0.0, 0
    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    gen_ctx = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gen_ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    try:
        val.dataset.set_epoch(0)
        for i, batch in enumerate(val):
            if cfg.eval.batches and i >= cfg.eval.batches:
                break
            b = _to_device(batch, topo.device, dtype)
            loss, _ = engine(b)
            losses += float(loss.float().item())
            n += 1
            want = cfg.eval.captions - len(preds) * topo.dp
            if cfg.model.task == "caption" and want > 0 and hasattr(model, "generate"):
                with gen_ctx:
                    out = model.generate(b, beam=cfg.eval.beam, max_len=cfg.eval.max_len)
                for sid, text, caps in zip(batch["id"], out, batch["captions"]):
                    if topo.sp_rank == 0:
                        preds[sid], refs[sid] = text, list(caps)
    finally:
        engine.train()
    result: dict[str, Any] = {"loss": all_mean(losses / max(n, 1), topo.device)}
    if cfg.model.task == "caption" and cfg.eval.captions > 0:
        parts = [(preds, refs)]
        if dist.is_initialized() and topo.world > 1:
            parts = [None] * topo.world
            dist.all_gather_object(parts, (preds, refs))
        allp, allr = {}, {}
        for p, r in parts:
            allp.update(p)
            allr.update(r)
        if allp and topo.is_main:
            from mmsparse.eval import caption_metrics

            try:
                result.update({k: float(v) for k, v in caption_metrics(allp, allr, meteor=False).items()
                               if isinstance(v, (int, float))})
            except Exception as err:  # metrics must not kill a run
                result["metrics_error"] = f"{type(err).__name__}: {err}"
            result["examples"] = [{"id": k, "pred": allp[k], "ref": allr[k][0]} for k in sorted(allp)[:3]]
    return result


# ------------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def run_kernel_options(cfg: TrainConfig) -> Iterator[KernelOptions]:
    """The config's ``kernels`` section as the program's kernel options while the run lasts (the
    previous ones back after it); yields the options in force, each ``MMSPARSE_*`` environment
    variable that is set overriding its field (``mmsparse.kernels.options``)."""
    previous = set_kernel_options(cfg.kernels)
    try:
        yield kernel_options()
    finally:
        set_kernel_options(previous)


def _changed_options(opts: KernelOptions) -> str:
    """The fields of ``opts`` that differ from the defaults, as ``name=value, ...``."""
    return ", ".join(f"{f.name}={getattr(opts, f.name)!r}" for f in dataclasses.fields(opts)
                     if getattr(opts, f.name) != f.default)


def train(cfg: TrainConfig, *, resume: bool = False, recipe: str | None = None,
          overrides: list[str] | tuple[str, ...] = (), init_from: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final summary (also written to summary.json).

    ``resume``: continue ``<run.dir>/checkpoints``; on a complete run (its checkpoint at
    ``run.steps``) nothing is touched and the run's summary comes back with ``already_complete``;
    values that differ from the checkpoint's config (``config_differences``) are a
    ``ResumeMismatch``. ``init_from``: a new run (step 0, fresh optimizer and schedule) from the
    model weights and tokenizer of another run (its folder, or its ``export`` folder). The
    config's ``kernels`` section sets the kernel options for the run (``run_kernel_options``)."""
    with run_kernel_options(cfg) as opts:
        return _train(cfg, opts, resume=resume, recipe=recipe, overrides=overrides, init_from=init_from)


def _train(cfg: TrainConfig, opts: KernelOptions, *, resume: bool, recipe: str | None,
           overrides: list[str] | tuple[str, ...], init_from: str | Path | None) -> dict[str, Any]:
    started = time.monotonic()  # run.max_minutes counts from here: set-up is part of the budget
    if resume and init_from:
        raise ValueError("--resume continues a run, --init-from starts a new one from another run's weights: "
                         "pass one of them")
    if resume:
        done = check_resume(cfg, recipe)
        if done is not None:
            return done
    from .distributed import quiet_warnings

    quiet_warnings()
    import deepspeed

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    topo = init(cfg.deepspeed.sequence_parallel_size)
    run_dir = cfg.run_dir()
    ckpt_dir = run_dir / "checkpoints"
    if not resume and (ckpt_dir / ckpt.LATEST).is_file():
        raise ckpt.CheckpointError(f"{run_dir} already holds a run ({ckpt_dir / ckpt.LATEST}); pass --resume to "
                                   f"continue it or set run.dir to a new folder")
    ds_cfg = deepspeed_config(cfg, topo.world)
    source = init_source(init_from) if init_from else None
    if topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", recipe, overrides)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_cfg, indent=2))
        if source is not None and not resume:  # the weights' tokenizer, not one trained anew
            shutil.copyfile(source / "tokenizer.json", run_dir / "tokenizer.json")

    seed_all(cfg.run.seed)  # identical initial weights on every rank
    train_manifest, val_manifest = prepare_data(cfg, topo, run_dir)
    model, task, init_report = build_model(cfg, train_manifest, run_dir, topo)
    if init_report is not None and topo.is_main:
        init_report.save(run_dir)
    if source is not None:
        load_init_weights(model, source)
    stats = StreamStats(model.blocks)  # before the sequence-parallel hooks: counts whole streams
    if cfg.deepspeed.activation_checkpointing:
        from .parallel import checkpoint_blocks

        checkpoint_blocks(model.blocks)
    if topo.sp > 1:
        from .parallel import apply_sequence_parallel

        apply_sequence_parallel(model, topo.sp_group, topo.sp_rank, topo.sp)
    module = task if isinstance(task, nn.Module) and model in task.modules() else TaskModule(task, model)
    n_params = sum(p.numel() for p in model.parameters())
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optim.layer_decay < 1:  # parameter groups, each at its layer's lr (models/pretrained.py)
        from mmsparse.models.pretrained import param_groups, scheduler_lrs

        inside = {id(p) for p in model.parameters()}
        params = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.layer_decay,
                              extra=[p for p in params if id(p) not in inside])
        ds_cfg = scheduler_lrs(ds_cfg, params)
    engine, _opt, _, _sched = deepspeed.initialize(model=module, model_parameters=params, config=ds_cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision)
    seed_all(cfg.run.seed + 1 + topo.rank)  # per-rank dropout / drop-path streams
    train_loader, val_loader = make_loaders(cfg, topo, train_manifest, val_manifest)

    step, pos = 0, DataPosition()
    skipped, in_row = 0, 0
    if resume:
        state = ckpt.load(engine, ckpt_dir)
        step = int(state["step"])
        data = state["data"]
        train_loader.sampler.load_state_dict(data["sampler"])
        pos = DataPosition(int(data["epoch"]), int(data["batches"]))
        skipped, in_row = int(state.get("nonfinite_skipped", 0)), int(state.get("nonfinite_in_row", 0))
    log = RunLogger(run_dir, topo.rank, cfg.run.steps, step, cfg.run.progress, cfg.run.tensorboard)
    if resume:
        log.message(f"resumed from {ckpt_dir / state['_tag']} at step {step}")
    log.message(f"{cfg.model.name} ({n_params / 1e6:.2f} M parameters), {topo.world} processes "
                f"(data-parallel {topo.dp} x sequence-parallel {topo.sp}) on {topo.device.type}, "
                f"ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}, run folder {run_dir}")
    if init_report is not None:
        log.message(init_report.summary() + f"\n  (all keys: {run_dir / 'init_report.json'})")
    changed = _changed_options(opts)
    if changed:
        log.message(f"kernel options (the kernels section, MMSPARSE_* variables over it): {changed}")

    def save(at: int) -> None:
        client = {"step": at, "nonfinite_skipped": skipped, "nonfinite_in_row": in_row,
                  "data": {"epoch": pos.epoch, "batches": pos.batches,
                           "sampler": train_loader.sampler.state_dict(consumed=pos.batches * cfg.data.batch_size)},
                  "config": to_dict(cfg)}
        ckpt.save(engine, ckpt_dir, at, client, keep=cfg.checkpoint.keep)

    it = batches(train_loader, pos)
    peak = _peak_flops(cfg)
    last_eval: dict[str, Any] = {}
    accum = cfg.deepspeed.grad_accum
    deadline = started + 60.0 * cfg.run.max_minutes if cfg.run.max_minutes > 0 else None
    out_of_time = False
    try:
        while step < cfg.run.steps:
            t0 = time.perf_counter()
            losses, extras = [], []
            done_micro = 0
            while done_micro < accum:
                batch = _to_device(next(it), topo.device, dtype)
                try:
                    loss, metrics = engine(batch)
                    bad = any_true(not bool(torch.isfinite(loss.detach()).all()), topo.device)
                    if bad:
                        skipped += 1
                        in_row += 1
                        log.message(f"step {step + 1}: non-finite loss on a batch of {_shapes(batch)}; skipped "
                                    f"({in_row} in a row, {skipped} in all)")
                        if in_row >= cfg.run.max_nonfinite_in_row:
                            raise NonFiniteLoss(f"{in_row} non-finite losses in a row (run.max_nonfinite_in_row="
                                                f"{cfg.run.max_nonfinite_in_row}) at step {step + 1}; lower optim.lr, "
                                                f"raise optim.warmup_steps or use deepspeed.precision=bf16/fp32")
                        continue
                    in_row = 0
                    engine.backward(loss)
                    engine.step()
                except RuntimeError as err:
                    if _is_oom(err):
                        raise TrainOOM(_oom_message(cfg, batch)) from err
                    raise
                done_micro += 1
                losses.append(float(loss.detach().float().item()))
                extras.append(_scalar_metrics(metrics))
            step += 1
            # every rank takes the same decision (one all-reduce), so they stop at the same step
            out_of_time = deadline is not None and any_true(time.monotonic() >= deadline, topo.device)
            final = step == cfg.run.steps or out_of_time
            dt = time.perf_counter() - t0
            rec: dict[str, Any] = {"loss": all_mean(sum(losses) / len(losses), topo.device),
                                   "lr": float(engine.get_lr()[0])}
            gn = engine.get_global_grad_norm()
            if gn is not None:
                rec["grad_norm"] = float(gn.item() if isinstance(gn, torch.Tensor) else gn)
            clips = cfg.data.batch_size * accum * topo.dp
            rec.update(step_time=dt, clips_per_s=clips / dt, epoch=pos.epoch, nonfinite_skipped=skipped)
            tokens, density = stats.take()
            if density is not None:
                rec["attention_density"] = density
            if tokens:
                rec["tokens_per_s"] = tokens * topo.dp / dt
                if peak:
                    rec["mfu"] = 6.0 * n_params * tokens * topo.dp / dt / (peak * topo.world)
            for k in sorted({k for e in extras for k in e} - set(rec) - {"tokens"}):
                vals = [e[k] for e in extras if k in e]
                rec[k] = sum(vals) / len(vals)
            if torch.cuda.is_available():
                rec["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            if step % cfg.run.log_every == 0 or final:
                log.log(step, "train", rec)
            log.progress(step, {"loss": rec["loss"], "lr": rec["lr"], "clips/s": rec["clips_per_s"]})
            if out_of_time:
                log.message(f"run.max_minutes={cfg.run.max_minutes:g} spent after step {step} of {cfg.run.steps} "
                            f"({time.monotonic() - started:.0f} s); ending the run here")
            if val_loader is not None and ((cfg.eval.every and step % cfg.eval.every == 0)
                                           or (final and cfg.eval.at_end)):
                last_eval = evaluate(engine, model, val_loader, cfg, topo, dtype)
                log.log(step, "eval", last_eval)
                log.message(f"eval @ {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()
                                                          if isinstance(v, float)))
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (final and cfg.checkpoint.at_end):
                save(step)
            if out_of_time:
                break
    finally:
        log.close()

    summary: dict[str, Any] = {"steps": step, "stopped_by": "max_minutes" if step < cfg.run.steps else "steps",
                               "seconds": round(time.monotonic() - started, 1), "nonfinite_skipped": skipped,
                               "world_size": topo.world,
                               "data_parallel": topo.dp, "sequence_parallel": topo.sp,
                               "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
                               "parameters": n_params, "device": topo.device.type,
                               "eval": {k: v for k, v in last_eval.items() if k != "examples"}}
    if source is not None:
        summary["init_from"] = str(source)
    if cfg.checkpoint.export:
        out = ckpt.export_pretrained(engine, model, run_dir / "export")
        if out is not None:
            summary["export"] = str(out)
    if topo.is_main:
        from .logs import read_metrics

        train_recs = read_metrics(run_dir / "metrics.jsonl", "train")
        if train_recs:
            tail = train_recs[-min(10, len(train_recs)):]
            summary.update(first_loss=train_recs[0]["loss"], last_loss=train_recs[-1]["loss"],
                           clips_per_s=sum(r["clips_per_s"] for r in tail) / len(tail))
            for k in ("tokens_per_s", "mfu", "max_mem_gb", "attention_density"):
                vals = [r[k] for r in tail if isinstance(r.get(k), (int, float))]
                if vals:
                    summary[k] = sum(vals) / len(vals)
        if cfg.run.plot:
            png = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
            if png:
                summary["curves"] = str(png)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

