"""Long-clip benchmark v2: train a captioner per attention schedule, score it on long-range tasks.

Legend: B clips, N stream tokens, E encoder width, L caption tokens.

One *run* is (arm, seed, budget): a fresh model of the arm's schedule trained on clips drawn on
the fly (``mmsparse.data.longtasks``: needle, order, count, pair, mixed in every batch), then
scored on a fixed held-out set (its own seed, balanced answers, ``clips`` per task and length):

- **choice**: multiple choice by likelihood among the task's candidate captions;
- **caption**: greedy decoding after the task word, parsed (the words after it must be the truth);
- **probe**: a linear probe (multinomial logistic regression) on the encoder's output tokens
  (mean and max over tokens) for each answer attribute, trained on a separate probe set: an
  encoder that carries the answer and a decoder that fails to read it are told apart.

Budgets: ``steps`` (every arm the same number of steps) and ``flops`` (each sparse arm as many
steps as give the dense arm's training FLOPs at ``steps``, counted from the layouts the model
runs: ``step_flops``). Each run writes ``<arm>-s<seed>-<budget>.json`` atomically into the run
folder with its curve (loss, and choice accuracy on a validation set, against steps), per-step
times and attention FLOPs per clip at every length; ``mmsparse.eval.longreport`` merges every
finished run of one spec into the report. A killed run leaves no JSON and is run again whole;
a finished one is skipped, so an interrupted benchmark resumes without mixing partial results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmsparse.attention.compressed import pooled_keys
from mmsparse.data import longtasks as lt
from mmsparse.fileio import atomic_write_text

BUDGETS = ("steps", "flops")

# Model of the benchmark: 4 + 2 layers of width 128 on 32 x 32 frames (8 video tokens a frame,
# 8,192 at 1,024 frames; an audio token a second), tiles of one second of video (64 tokens, a
# whole attention block) with the tiles a second before and after.
BASE_MODEL = dict(
    embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, tubelet=(2, 8, 8), n_mels=32, audio_patch=16,
    audio_stride=16, modalities=("video", "audio"), video_tile=(4, 4, 4), video_radius=(1, 0, 0),
    audio_tile=(2, 8), audio_radius=(0, 1), n_global=4, av_window=1.0, attn_block=64, segment_align=64,
    max_frames=None, max_audio_frames=None, dec_dim=128, dec_depth=2, dec_heads=4, cross="all",
    vocab_size=384, max_text_len=12, proj_dim=32, audio_norm=lt.AUDIO_NORM,
)

# The schedules compared: name -> ModelConfig overrides on BASE_MODEL (compress_block named in
# every sparse arm: the arms do not move with ModelConfig's default).
ARMS: dict[str, dict] = {
    "dense": dict(schedule="dense"),
    "tiled": dict(schedule="tiled", compress_block=0),
    "tiled_compress": dict(schedule="tiled", compress_block=64),
    "tiled_global16": dict(schedule="tiled", n_global=16, compress_block=0),
    "tiled_compress_pooled": dict(schedule="tiled", compress_block=64, cross="pooled", n_pool=64),
    "tiled_dilated": dict(schedule="tiled_dilated", compress_block=0),
    "tiled_dilated_compress": dict(schedule="tiled_dilated", compress_block=64),
    "tiled_compress_dec8": dict(schedule="tiled", compress_block=64, dec_heads=8, dec_depth=3),
    # tiled_compress with at most 136 pooled keys (ModelConfig.compress_keys), the most it meets
    # in training (133 at 1,024 frames): trained the same, it sees as many pooled keys at every
    # eval length (133 at 8,192 frames, blocks of 512, where tiled_compress has 1,057). Does a
    # fixed number of pooled keys carry count and the needle past the training lengths?
    "tiled_compress_bounded": dict(schedule="tiled", compress_block=64, compress_keys=136),
    # tiled_compress without the video tiles' neighbours in time: a video token attends its own
    # one-second tile (one whole block) and reaches the rest of the clip through the global
    # tokens, AVSync and the pooled keys alone. The geometry of captioner_base_aligned (whole-
    # frame tiles, radius 0), which E1 times faster than the (4, 4, 8) tiles with neighbours:
    # does the branch make up for the narrower reach?
    "tiled_compress_r0": dict(schedule="tiled", compress_block=64, video_radius=(0, 0, 0)),
    # tiled_compress_r0 with Video Swin's shifted windows in odd layers (schedule
    # "tiled_shifted": the tiles move by half a tile in time), so an event that straddles two
    # tiles meets itself at the radius-0 cost; the aligned captioner's geometry with
    # schedule="tiled_shifted"
    "tiled_shifted_compress_r0": dict(schedule="tiled_shifted", compress_block=64, video_radius=(0, 0, 0)),
    # tiled_compress with tiles of half a second (2 tubelets, 32 tokens) and their neighbours in
    # time: every video token sees at least one tubelet step on each side beyond its own tile,
    # at half tiled_compress's video pairs; the captioner form is whole-frame tiles of
    # (2, 14, 14) at radius (1, 0, 0), which keeps the blocks full (video_tile_align=64)
    "tiled_t2_compress": dict(schedule="tiled", compress_block=64, video_tile=(2, 4, 4)),
    # tiled_compress with the neighbours in time in some layers only (video_radius_every): layers
    # 0 and 2 of 4, or layer 0 alone, the rest at radius 0. Count needs one layer that sees a
    # whole event with context (radius 0, shifted and half-second tiles all lost it); does one
    # such layer suffice? The captioner form (aligned whole-frame tiles, radius (1, 0, 0) every
    # 2nd / 4th of 12 layers) attends 0.205 / 0.162 of dense's pairs at 64 frames, all in full
    # blocks, against the default's 0.255 in partial ones
    "tiled_compress_every2": dict(schedule="tiled", compress_block=64, video_radius_every=2),
    "tiled_compress_every4": dict(schedule="tiled", compress_block=64, video_radius_every=4),
    # two-second tiles (8 tubelets, two blocks) at radius 0, odd layers shifted by one second
    # (schedule "tiled_shifted"): a one-second event lies whole inside a window of every even or
    # of every odd layer, wherever it starts, at 8 tubelet steps a video token (tiled_compress:
    # 12, every layer). The captioner form is whole-frame (8, 14, 14) tiles, video_tile_align=64,
    # shifted: 0.194 / 0.0354 / 0.0178 of dense's pairs at 64 / 512 / 1,024 frames (the
    # default 0.255 / 0.0416 / 0.0208 in partial blocks; every2 0.206 / 0.0360 / 0.0180)
    "tiled_shifted_t8_compress": dict(schedule="tiled_shifted", compress_block=64, video_tile=(8, 4, 4),
                                      video_radius=(0, 0, 0)),
}


@dataclass
class BenchSpec:
    """Everything that defines a benchmark's numbers (its hash names the set of runs)."""

    train_lengths: tuple[int, ...] = (256, 512, 1024)
    # short-to-long: (until this fraction of the steps, clip lengths drawn in turn); then
    # train_lengths. Short clips teach what an event is, long ones where to find it
    curriculum: tuple = ((0.25, (64,)), (0.5, (64, 256)))
    eval_lengths: tuple[int, ...] = (256, 1024, 4096)
    # lengths the sparse arms also train on in the last phase (dense, whose step there costs
    # 8-10x theirs, keeps train_lengths): what the 4,096-frame column asks of them
    sparse_lengths: tuple[int, ...] = ()
    clips: int = 128                 # eval clips per task and length
    val_clips: int = 16              # per task, at the longest train length, for the curve
    probe_clips: int = 64            # probe training clips per task (at each eval length <= probe_max)
    probe_max: int = 1024
    batch: int = 32                  # training clips a step (tasks mixed)
    eval_batch: int = 16
    steps: int = 1500                # the equal-steps budget (and dense's, which sets equal FLOPs)
    # equal-FLOPs steps are capped at this many times `steps` (a sparse arm at 1/6 of dense's
    # training FLOPs would need 6x the steps; the report marks a capped arm)
    max_flops_factor: float = 2.0
    lr: float = 2e-3
    warmup: int = 50
    eval_every: int = 250
    eval_seed: int = 20261207        # the held-out set's seed (training draws from the run's seed)
    model: dict = field(default_factory=lambda: dict(BASE_MODEL))
    task: lt.TaskSpec = field(default_factory=lt.TaskSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchSpec":
        d = dict(d)
        d["task"] = lt.TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("task", {}).items()})
        for k in ("train_lengths", "eval_lengths", "sparse_lengths"):
            if k in d:
                d[k] = tuple(d[k])
        if "curriculum" in d:
            d["curriculum"] = tuple((float(f), tuple(int(n) for n in ls)) for f, ls in d["curriculum"])
        return cls(**d)

    def lengths_at(self, step: int, total: int, arm: str = "dense") -> int:
        """The clip length of training step `step` of `total` for `arm`."""
        for until, lengths in self.curriculum:
            if step < until * total:
                return lengths[step % len(lengths)]
        last = self.last_lengths(arm)
        return last[step % len(last)]

    def last_lengths(self, arm: str = "dense") -> tuple[int, ...]:
        """The lengths of the last phase: train_lengths, and sparse_lengths for a sparse arm."""
        return self.train_lengths + (self.sparse_lengths if arm != "dense" else ())

    def all_train_lengths(self, arm: str | None = None) -> tuple[int, ...]:
        """Every length `arm` trains on (None: any arm)."""
        last = self.train_lengths + self.sparse_lengths if arm is None else self.last_lengths(arm)
        return tuple(sorted({n for _, ls in self.curriculum for n in ls} | set(last)))

    def key(self) -> str:
        d = self.to_dict()
        for path, unset in _ADDED_FIELDS.items():  # hashed only when set: earlier runs keep their key
            *outer, name = path
            holder = functools.reduce(dict.get, outer, d)
            value = holder.get(name)
            if (tuple(value) if isinstance(value, (list, tuple)) else value) == unset:
                holder.pop(name, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


# fields added to BenchSpec (and its TaskSpec) after runs were made with it, and their unset value
_ADDED_FIELDS = {("sparse_lengths",): (), ("task", "audio_noise"): lt.AUDIO_NOISE}


SMOKE = dict(train_lengths=(48, 64), eval_lengths=(48, 96), curriculum=((0.5, (48,)),), clips=6, val_clips=3,
             probe_clips=12, probe_max=96, batch=8, eval_batch=8, steps=6, warmup=2, eval_every=3, max_flops_factor=2.0,
             model=dict(BASE_MODEL, embed_dim=32, depth=2, num_heads=2, dec_dim=32, dec_heads=2, n_global=2),
             task=lt.TaskSpec(size=16, shape_px=8, distractors=(1, 2)))


def check_arms(arms: Sequence[str]) -> None:
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"unknown arm(s) {bad}; expected names from {sorted(ARMS)}")


def tokenizer():
    from mmsparse.models.text import CaptionTokenizer

    return CaptionTokenizer.train(lt.all_captions() * 4, vocab_size=384)


def build_model(spec: BenchSpec, arm: str, seed: int, device, backend: str = "auto"):
    from mmsparse.encoders.patch import AUDIO_NORM
    from mmsparse.models import create_model

    check_arms([arm])
    torch.manual_seed(seed)
    # specs without the field (before 2026-12-07's v5) ran with the shift of digital silence
    # the arms' pooled keys are unbounded (compress_keys 0), as when they were first run
    cfg = {"audio_norm": AUDIO_NORM, "compress_keys": 0, **spec.model, **ARMS[arm], "backend": backend}
    model = create_model("captioner_tiny", tokenizer=tokenizer(), **cfg)
    return model.to(device)


# cost ---------------------------------------------------------------------------------------
def attention_pairs(model, layout) -> tuple[float, float]:
    """(computed query-key pairs of the encoder per clip on a StreamLayout, summed over layers;
    the compressed branch counts N x C more), N being the stream's positions."""
    n = layout.length
    pairs = 0.0
    for lay in model.layer_layouts(layout):
        if lay is None:
            pairs += n * n
        else:
            pairs += float(lay.computed_pairs())
            if model.cfg.compress_block:
                pairs += n * pooled_keys(n, model.cfg.compress_block, model.cfg.compress_keys)
    return pairs


def clip_flops(model, batch) -> dict[str, float]:
    """Forward FLOPs per clip: attention (4 E per computed pair), the encoder's and decoder's
    matrix products (2 per parameter and real token: alignment gaps skip them) and the decoder's
    cross-attention. ``attention_dense``: a dense encoder's attention on the same real tokens."""
    from mmsparse.models.schedule import gap_positions

    cfg = model.cfg
    with torch.no_grad():
        layout = model.embed(batch, required=cfg.required_modalities).layout
    n_real = int((~gap_positions(layout)).sum())
    pairs = attention_pairs(model, layout)
    enc_params = sum(p.numel() for blk in model.blocks for p in blk.parameters() if p.ndim > 1)
    dec_params = sum(p.numel() for p in model.decoder.parameters() if p.ndim > 1)
    text = cfg.max_text_len
    attn = 4.0 * cfg.embed_dim * pairs
    other = 2.0 * enc_params * n_real + 2.0 * dec_params * text + 4.0 * cfg.dec_dim * text * n_real * cfg.dec_depth
    return {"attention": attn, "attention_dense": 4.0 * cfg.embed_dim * cfg.depth * n_real ** 2,
            "forward": attn + other}


# data ---------------------------------------------------------------------------------------
def train_batch(spec: BenchSpec, rng: np.random.Generator, frames: int, device) -> dict:
    tasks = [lt.TASKS[i % len(lt.TASKS)] for i in range(spec.batch)]
    plans = [lt.plan(t, frames, rng, spec.task) for t in tasks]
    return lt.render(plans, spec.task, device, seed=int(rng.integers(2 ** 31)))


def eval_plans(spec: BenchSpec, frames: int, per_task: int, seed: int) -> list[lt.ClipPlan]:
    return [p for i, t in enumerate(lt.TASKS) for p in lt.balanced_plans(t, frames, per_task, seed + 7919 * i + frames,
                                                                           spec.task)]


def _encoded(model, plans: list[lt.ClipPlan], spec: BenchSpec, device, seed: int):
    """(clips, memory (b, N, E), pad (b, N)) per chunk of ``eval_batch`` plans, each chunk
    rendered with seed + its index (the same clips for every model)."""
    for part, i in enumerate(range(0, len(plans), spec.eval_batch)):
        chunk = plans[i:i + spec.eval_batch]
        batch = lt.render(chunk, spec.task, device, seed=seed + part)
        with _autocast(device):
            memory, pad, _ = model.encode(batch)
        yield chunk, memory, pad


# training -----------------------------------------------------------------------------------
def caption_loss(model, batch) -> torch.Tensor:
    """Cross-entropy of the answer tokens (everything after <bos> and the task word)."""
    ids = model.tokenize(batch)  # (B, L + 1): <bos> task answer... <eos> <pad>
    logits = model(batch, ids[:, :-1])  # (B, L, V)
    target = ids[:, 1:].clone()
    target[:, 0] = -100  # the task word is the question, not something to predict
    target[target == 0] = -100  # padding
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def _lr(step: int, spec: BenchSpec, total: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = (step - spec.warmup) / max(1, total - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_step(spec: BenchSpec, model, opt, batch: dict, step: int, total: int) -> torch.Tensor:
    """One optimiser step of the benchmark's training on `batch` (step `step` of `total`: the
    learning-rate schedule); returns the loss, detached (reading it would wait for the device)."""
    for g in opt.param_groups:
        g["lr"] = _lr(step, spec, total)
    with _autocast(next(model.parameters()).device):
        loss = caption_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def _autocast(device):
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


# scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def score(model, plans: list[lt.ClipPlan], spec: BenchSpec, device, seed: int, greedy: bool = True,
          keep_ll: bool = False) -> list[dict]:
    """Per clip: task, length, choice correct, caption correct (greedy after the task word);
    `keep_ll`: also each candidate's log-likelihood ("ll")."""
    tok = model.tokenizer
    model.eval()
    rows = []
    for chunk, memory, pad in _encoded(model, plans, spec, device, seed):
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(chunk):
            groups.setdefault(p.task, []).append(i)
        with _autocast(device):
            mem, mpad = model.decoder.prepare_memory(memory, pad)
        for task, idx in groups.items():
            sel = torch.tensor(idx, device=mem.device)
            m = mem.index_select(0, sel)
            mp = None if mpad is None else mpad.index_select(0, sel)
            with _autocast(device):  # the memory's cross keys and values, once for every candidate
                kvs = model.decoder.memory_kvs(m)
            cands = lt.candidates(task)
            ids = tok.batch(cands, model.cfg.max_text_len, device)  # (C, L + 1)
            ll = torch.empty(len(idx), len(cands), device=mem.device)
            for c in range(len(cands)):
                seq = ids[c:c + 1].expand(len(idx), -1)
                with _autocast(device):
                    logits = model.decoder(seq[:, :-1], m, mp, prepared=True, mem_kvs=kvs).float()
                logp = F.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[..., 0]  # (b, L)
                keep = (seq[:, 1:] != 0).float()
                keep[:, 0] = 0.0  # the task word is given
                ll[:, c] = (logp * keep).sum(1)
            choice = ll.argmax(1).tolist()
            texts = _greedy(model, m, mp, task, device, kvs) if greedy else [None] * len(idx)
            for j, i in enumerate(idx):
                p = chunk[i]
                row = {"task": task, "length": p.frames, "truth": p.caption, "choice_correct": cands[choice[j]] == p.caption,
                       "choice": cands[choice[j]], "finite": bool(torch.isfinite(ll[j]).all())}
                if keep_ll:
                    row["ll"] = ll[j].tolist()
                if texts[j] is not None:
                    row["caption"] = texts[j]
                    row["caption_correct"] = texts[j].split() == p.caption.split()
                rows.append(row)
    model.train()
    return rows


def _greedy(model, mem, mpad, task: str, device, mem_kvs=None, max_new: int = 5) -> list[str]:
    from mmsparse.models.text import BOS, EOS

    tok = model.tokenizer
    prompt = [BOS, *tok.encode(task)]
    ids = torch.tensor(prompt, device=mem.device).expand(mem.shape[0], -1)
    done = torch.zeros(mem.shape[0], dtype=torch.bool, device=mem.device)
    for _ in range(max_new):
        with _autocast(device):
            nxt = model.decoder(ids, mem, mpad, prepared=True, mem_kvs=mem_kvs)[:, -1].float().argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    out = []
    for row in ids.tolist():
        gen = row[len(prompt) - 1:]  # from the task word on
        out.append(tok.decode(gen[: gen.index(EOS)] if EOS in gen else gen).strip())
    return out


# linear probe -------------------------------------------------------------------------------
PROBE_TARGETS = {"needle": ("colour", "shape", "tone"), "order": ("first",), "count": ("count",), "pair": ("shape",)}


@torch.no_grad()
def features(model, plans: list[lt.ClipPlan], spec: BenchSpec, device, seed: int) -> torch.Tensor:
    """(clips, 2 E) float32: mean and max of the encoder's output over its real tokens."""
    model.eval()
    out = []
    for _, memory, pad in _encoded(model, plans, spec, device, seed):
        memory = memory.float()
        keep = (~pad).to(memory.device)[..., None]
        mean = (memory * keep).sum(1) / keep.sum(1).clamp(min=1)
        mx = memory.masked_fill(~keep, -math.inf).amax(1)
        out.append(torch.cat([mean, mx], 1).cpu())
    model.train()
    return torch.cat(out)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 200, wd: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features (L-BFGS)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes, dtype=torch.float64)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def probe(model, spec: BenchSpec, device, seed: int) -> dict[str, dict[str, float]]:
    """Probe accuracy per (length, task.attribute) on the eval set, trained on a probe set."""
    out: dict[str, dict[str, float]] = {}
    for frames in [n for n in spec.eval_lengths if n <= spec.probe_max]:
        train_p = eval_plans(spec, frames, spec.probe_clips, spec.eval_seed + 1_000_003 + seed)
        test_p = eval_plans(spec, frames, spec.clips, spec.eval_seed)
        xtr = features(model, train_p, spec, device, seed).double()
        xte = features(model, test_p, spec, device, spec.eval_seed).double()
        mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        res = {}
        for task, attrs in PROBE_TARGETS.items():
            itr = [i for i, p in enumerate(train_p) if p.task == task]
            ite = [i for i, p in enumerate(test_p) if p.task == task]
            for a in attrs:
                labels = sorted({str(train_p[i].answer[a]) for i in itr} | {str(test_p[i].answer[a]) for i in ite})
                ytr = torch.tensor([labels.index(str(train_p[i].answer[a])) for i in itr])
                yte = torch.tensor([labels.index(str(test_p[i].answer[a])) for i in ite])
                lin = fit_probe(xtr[itr], ytr, len(labels))
                res[f"{task}.{a}"] = float((lin(xte[ite]).argmax(1) == yte).double().mean())
        out[str(frames)] = res
    return out


# one run --------------------------------------------------------------------------------------
def flops_per_step(spec: BenchSpec, arm: str, device="cpu") -> dict[str, Any]:
    """Training FLOPs a step (3 x forward, the mean over the training lengths) and attention
    FLOPs per clip at every eval length, from the layouts (no training)."""
    model = build_model(spec, arm, 0, device)
    rng = np.random.default_rng(0)
    per_len = {}
    for frames in sorted(set(spec.all_train_lengths(arm)) | set(spec.eval_lengths)):
        plans = [lt.plan("needle", frames, rng, spec.task)]
        per_len[frames] = clip_flops(model, lt.render(plans, spec.task, device, seed=0))
    # the mean over the steps of the equal-steps budget, curriculum included
    train = float(np.mean([3 * spec.batch * per_len[spec.lengths_at(i, spec.steps, arm)]["forward"]
                           for i in range(spec.steps)]))
    return {"train_flops_per_step": train, "per_length": {str(k): v for k, v in per_len.items()}}


def schedule_flops(spec: BenchSpec, cost: dict, steps: int, arm: str = "dense") -> float:
    """Training FLOPs of `steps` steps of `arm`'s curriculum (``cost``: its ``flops_per_step``)."""
    per = {int(n): 3 * spec.batch * c["forward"] for n, c in cost["per_length"].items()}
    return float(sum(per[spec.lengths_at(i, steps, arm)] for i in range(steps)))


def steps_for(spec: BenchSpec, arm: str, budget: str, costs: dict[str, dict]) -> tuple[int, bool]:
    """(steps, capped) for an arm under a budget; `costs` from ``flops_per_step`` (arm -> ...).
    Equal FLOPs: the fewest steps whose curriculum costs at least dense's `spec.steps`, at most
    ``max_flops_factor`` x `spec.steps` (capped: True when that cap binds)."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; expected one of {BUDGETS}")
    if budget == "steps" or arm == "dense":
        return spec.steps, False
    target = schedule_flops(spec, costs["dense"], spec.steps)
    cap = max(1, int(spec.max_flops_factor * spec.steps))
    lo, hi = 1, cap
    if schedule_flops(spec, costs[arm], cap, arm) < target:
        return cap, True
    while lo < hi:  # FLOPs grow with the step count: bisect for the fewest steps that reach dense's
        mid = (lo + hi) // 2
        if schedule_flops(spec, costs[arm], mid, arm) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo, False


def run_one(spec: BenchSpec, arm: str, seed: int, budget: str, out_dir: str | Path, device="cuda",
            costs: dict | None = None, backend: str = "auto", progress: bool = True) -> Path:
    """Train and score one run; writes ``<arm>-s<seed>-<budget>.json``; returns its path
    (already there: returned untouched). Training state is saved every ``eval_every`` steps to
    ``<arm>-s<seed>-<budget>.ckpt.pt`` (atomically), and a killed run goes on from there."""
    out = Path(out_dir) / f"{arm}-s{seed}-{budget}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and json.loads(out.read_text()).get("spec_key") == spec.key():
        return out
    costs = costs or {a: flops_per_step(spec, a) for a in {arm, "dense"}}
    steps, capped = steps_for(spec, arm, budget, costs)
    model = build_model(spec, arm, seed, device, backend)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05, betas=(0.9, 0.98))
    state = {"step": 0, "rng": np.random.default_rng(seed).bit_generator.state, "curve": [], "losses": [],
             "train_flops": 0.0, "train_seconds": 0.0}
    ckpt = out.with_suffix(".ckpt.pt")
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        if saved.get("spec_key") == spec.key():
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            state = saved["state"]
            print(f"{out.stem}: resumed at step {state['step']} of {steps}", flush=True)
    _train(spec, arm, model, opt, steps, costs, device, state, ckpt, progress, out.stem)
    t0 = time.perf_counter()
    rows = []
    for frames in spec.eval_lengths:
        rows += score(model, eval_plans(spec, frames, spec.clips, spec.eval_seed), spec, device, spec.eval_seed)
    probes = probe(model, spec, device, seed)
    result = {"spec_key": spec.key(), "spec": spec.to_dict(), "arm": arm, "arm_config": ARMS[arm], "seed": seed,
              "budget": budget, "steps": steps, "capped": capped, "train_seconds": round(state["train_seconds"], 1),
              "eval_seconds": round(time.perf_counter() - t0, 1), "train_flops": state["train_flops"],
              "cost": costs[arm], "curve": state["curve"], "final_loss": float(np.mean(state["losses"][-50:])),
              "rows": rows, "probe": probes, "device": _device_name(device), "software": software()}
    model.save_pretrained(model_dir(out))  # for rescoring (check_backends) and inspection
    atomic_write_text(out, json.dumps(result))
    ckpt.unlink(missing_ok=True)
    return out


def model_dir(run_json: Path) -> Path:
    """Where a run keeps its trained model (save_pretrained format)."""
    return run_json.with_name(run_json.stem + ".model")


def check_backends(run_json: str | Path, backends: Sequence[str], frames: int, clips: int, device,
                   spec: BenchSpec | None = None) -> dict[str, Any]:
    """Score one trained run's model on the same eval clips under each backend: the answers
    must agree, and the candidates' log-likelihoods within the low-precision noise. A
    disagreement points at a kernel (or a backend) bug, not at the schedule."""
    from mmsparse.models.captioner import VideoCaptioner

    run_json = Path(run_json)
    spec = spec or BenchSpec.from_dict(json.loads(run_json.read_text())["spec"])
    plans = eval_plans(spec, frames, clips, spec.eval_seed)
    out: dict[str, Any] = {"run": run_json.stem, "frames": frames, "clips": len(plans), "backends": list(backends)}
    scored = {}
    for b in backends:
        model = VideoCaptioner.from_pretrained(model_dir(run_json), map_location=device, backend=b)
        scored[b] = score(model, plans, spec, device, spec.eval_seed, greedy=False, keep_ll=True)
    first = backends[0]
    for b in backends[1:]:
        same = [x["choice"] == y["choice"] for x, y in zip(scored[first], scored[b])]
        diff = max(max(abs(u - v) for u, v in zip(x["ll"], y["ll"])) for x, y in zip(scored[first], scored[b]))
        out[f"{b}_vs_{first}"] = {"same_choice": sum(same) / len(same), "max_abs_ll_diff": diff}
    return out


def _train(spec: BenchSpec, arm: str, model, opt, steps: int, costs: dict, device, state: dict, ckpt: Path,
           progress: bool, name: str) -> None:
    """Steps state["step"] .. steps - 1; the curve, a line of ``<run>.metrics.jsonl`` and the
    checkpoint every ``eval_every`` steps."""
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    val = eval_plans(spec, max(spec.train_lengths), spec.val_clips, spec.eval_seed + 17)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc=name, mininterval=5, leave=False)
    metrics = ckpt.with_name(name + ".metrics.jsonl")
    if metrics.is_file():  # a resumed run: drop the lines of steps after its checkpoint
        kept = [x for x in metrics.read_text().splitlines() if x and json.loads(x)["step"] <= state["step"]]
        metrics.write_text("".join(x + "\n" for x in kept))
    pending: list[torch.Tensor] = []  # losses not read yet: no sync per step
    t0 = time.perf_counter()
    for step in range(state["step"], steps):
        frames = spec.lengths_at(step, steps, arm)
        state["train_flops"] += 3 * spec.batch * costs[arm]["per_length"][str(frames)]["forward"]
        pending.append(train_step(spec, model, opt, train_batch(spec, rng, frames, device), step, steps))
        if bar is not None:
            bar.update(1)
        if (step + 1) % spec.eval_every == 0 or step + 1 == steps:
            state["losses"] += torch.stack(pending).float().tolist()
            pending = []
            rows = score(model, val, spec, device, spec.eval_seed + 17, greedy=False)
            point = {"step": step + 1, "loss": float(np.mean(state["losses"][-spec.eval_every:])),
                     "val_choice": float(np.mean([r["choice_correct"] for r in rows]))}
            state["curve"].append(point)
            with open(metrics, "a") as log:  # a person can follow a run
                log.write(json.dumps({**point, "seconds": round(state["train_seconds"] + time.perf_counter() - t0, 1),
                                      "lr": _lr(step, spec, steps)}) + "\n")
            state["step"], state["rng"] = step + 1, rng.bit_generator.state
            state["train_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if not progress:
                print(f"{name}: step {point['step']}/{steps} loss {point['loss']:.3f} val choice "
                      f"{point['val_choice']:.2f} ({state['train_seconds']:.0f} s)", flush=True)
            if step + 1 < steps:
                tmp = ckpt.with_name(ckpt.name + ".tmp")
                torch.save({"spec_key": spec.key(), "model": model.state_dict(), "opt": opt.state_dict(),
                            "state": state}, tmp)
                os.replace(tmp, ckpt)
    if bar is not None:
        bar.close()


def time_steps(spec: BenchSpec, arm: str, device, repeats: int = 3) -> dict[str, float | None]:
    """Median ms of a training step (forward and backward of `spec.batch` clips) at every eval
    length, None where it does not fit in memory. Run it alone on the device: runs side by side
    would time each other."""
    model = build_model(spec, arm, 0, device)
    rng = np.random.default_rng(0)
    out = {}
    for frames in spec.eval_lengths:
        out[str(frames)] = _time_step(model, spec, frames, device, rng, repeats)
    return out


def _time_step(model, spec: BenchSpec, frames: int, device, rng, repeats: int = 3) -> float | None:
    batch = train_batch(spec, rng, frames, device)
    times = []
    try:
        for _ in range(repeats + 1):
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with _autocast(device):
                loss = caption_loss(model, batch)
            loss.backward()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
    except torch.OutOfMemoryError:
        return None
    finally:
        batch = None
        model.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return float(np.median(times[1:]))


def software() -> dict[str, str | None]:
    """The versions a run was made with: torch, triton (None where not installed) and the code's
    commit (``mmsparse.fileio.git_commit``, abbreviated); kept in each run's JSON, so a report
    merged elsewhere (``longdriver --report-only``) names the runs' versions, not its own."""
    import importlib.metadata

    from mmsparse.fileio import git_commit

    try:  # the installed version, without importing triton outside the kernels
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton, "commit": git_commit(Path(__file__).parent, short=True)}


def _device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"
