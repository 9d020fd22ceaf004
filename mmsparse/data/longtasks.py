"""Long-clip tasks: synthetic clips whose questions need information from far-apart times.

Each clip is T frames at ``fps`` of a grey background with faint noise, on which events happen:
an event is a shape (circle / square / triangle) of one colour for one second at a random
place and time, with or without a tone (``high`` 880 Hz or ``low`` 220 Hz) playing meanwhile.
Distractors are grey shapes that no question asks about. Four tasks, each with balanced answers:

- ``needle``: one coloured shape with a tone at a random time; name its colour, shape and tone
  (``"needle red circle high"``; 24 answers).
- ``order``: two coloured shapes of different kinds at least a quarter of the clip apart; which
  came first (``"order circle then square"``; 6 answers).
- ``count``: one kind of coloured shape appears 1 to 4 times, once in each of k equal parts of
  the clip; how many and which (``"count three circle"``; 12 answers).
- ``pair``: three coloured shapes of different kinds at different times, a tone plays with one
  of them; which shape was on screen during the tone (``"pair circle"``; 3 answers).

A caption starts with its task word, which is the question: the decoder is given it as a prompt
and scored on the rest. Everything is drawn from ``numpy.random.Generator(seed)``: a clip is a
pure function of (task, frames, seed), and ``render`` turns plans into the model's batch on any
device (pixels (B, T, 3, H, W) normalised like the data loader's, log-mel audio (B, M, Tm)), so
training draws fresh clips on the GPU every step while evaluation uses a fixed held-out set.

Shapes: frames (T, H, W, 3) uint8; wave (S,) float32.
"""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass, field, replace
from itertools import permutations, product
from typing import Sequence

import numpy as np
import torch

from mmsparse.pixels import IMAGENET_MEAN, IMAGENET_STD
from .audio import log_mel
from .synth import BACKGROUND, COLOURS, SHAPES, TONES

TASKS = ("needle", "order", "count", "pair")
NUMBERS = ("one", "two", "three", "four")
GREY = (200, 200, 200)
FILE_SAMPLE_RATE = 16000  # audio of written clips (AAC has no 4 kHz)
AUDIO_NOISE = 0.003       # amplitude (std) of the clips' background hiss
# (shift, scale) of the log-mel for models of these clips: the shift is their noise floor (the
# hiss's log-mel is -7.9 to -6.2 across the 32 bands at 4 kHz), so silence embeds near 0 and a
# tone near 2.5. With the shift of digital silence (encoders.patch.AUDIO_NORM, log 1e-6) every
# silent patch is 256 values of ~1.5, one offset shared by every audio token, and the benchmark's
# model on audio alone never learnt the tone (bench/results/probe-*-tone-audio-*.json).
AUDIO_NORM = (-8.0, 5.0)


@dataclass(frozen=True)
class TaskSpec:
    """How clips are drawn: frame size, frame rate, shape size, audio rate and features."""

    size: int = 32            # frames are size x size
    fps: int = 8
    shape_px: int = 16        # side of a shape's bounding box
    event_seconds: float = 1.0
    distractors: tuple[int, int] = (2, 4)   # grey shapes per clip, inclusive range
    sample_rate: int = 4000
    n_mels: int = 32
    hop_seconds: float = 0.0625
    noise: float = 4.0        # pixel noise std (0..255)
    audio_noise: float = AUDIO_NOISE   # amplitude (std) of the background hiss
    # shapes' corners on multiples of this many pixels: 8 puts a 16-px shape on exactly 2 x 2 of
    # the encoder's 8-px patches, so telling shapes apart is not the hard part (at 12 px anywhere,
    # a 128-wide model needed ~4x the steps to learn shapes; bench/NOTES.md 2026-12-07)
    align: int = 8

    def __post_init__(self):
        if not 1 <= self.shape_px <= self.size:
            raise ValueError(f"TaskSpec.shape_px must be in 1..size={self.size}, got {self.shape_px}")
        if not 1 <= self.align <= max(1, self.size - self.shape_px):
            raise ValueError(f"TaskSpec.align must be in 1..size - shape_px={self.size - self.shape_px} (or 1), "
                             f"got {self.align}")
        if not self.audio_noise >= 0:  # NaN too
            raise ValueError(f"TaskSpec.audio_noise must be >= 0, got {self.audio_noise}")

    @property
    def event_frames(self) -> int:
        return max(1, int(round(self.event_seconds * self.fps)))


@dataclass
class Event:
    frame: int                # first frame
    shape: str
    colour: tuple[int, int, int]
    x: int
    y: int
    tone: str | None = None


@dataclass
class ClipPlan:
    task: str
    frames: int
    caption: str
    answer: dict
    events: list[Event] = field(default_factory=list)


def candidates(task: str) -> list[str]:
    """Every caption a clip of `task` can have (the multiple-choice options)."""
    if task == "needle":
        return [f"needle {c} {s} {t}" for c, s, t in product(COLOURS, SHAPES, TONES)]
    if task == "order":
        return [f"order {a} then {b}" for a, b in permutations(SHAPES, 2)]
    if task == "count":
        return [f"count {n} {s}" for n, s in product(NUMBERS, SHAPES)]
    if task == "pair":
        return [f"pair {s}" for s in SHAPES]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def all_captions() -> list[str]:
    return [c for t in TASKS for c in candidates(t)]


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def plan(task: str, frames: int, rng: np.random.Generator, spec: TaskSpec = TaskSpec(), answer: int | None = None
         ) -> ClipPlan:
    """One clip of `task` with `frames` frames. `answer` picks the answer index (0 ..
    len(candidates) - 1) for balanced sets; None draws it uniformly."""
    check_task(task)
    ef = spec.event_frames
    slots = frames // ef
    need = {"needle": 1, "order": 2, "count": 4, "pair": 3}[task] + spec.distractors[1]
    if slots < need:
        raise ValueError(f"frames={frames} holds {slots} one-event slots; task {task!r} needs at least {need} "
                         f"(frames >= {need * ef})")
    cands = candidates(task)
    a = int(rng.integers(len(cands))) if answer is None else int(answer) % len(cands)
    caption = cands[a]
    colours = list(COLOURS)
    taken: set[int] = set()

    def place(slot: int, shape: str, colour, tone=None) -> Event:
        taken.add(slot)
        cells = (spec.size - spec.shape_px) // spec.align + 1
        x, y = (int(v) * spec.align for v in rng.integers(0, cells, size=2))
        return Event(slot * ef, shape, colour, x, y, tone)

    def free_slot(lo: int = 0, hi: int | None = None) -> int:
        hi = slots if hi is None else hi
        free = [s for s in range(lo, hi) if s not in taken]
        return int(free[rng.integers(len(free))])

    def coloured() -> tuple[int, int, int]:
        return COLOURS[colours[rng.integers(len(colours))]]

    events: list[Event] = []
    if task == "needle":
        colour, shape, tone = caption.split()[1:]
        events.append(place(free_slot(), shape, COLOURS[colour], tone))
        answer_ = {"colour": colour, "shape": shape, "tone": tone}
    elif task == "order":
        first, second = caption.split()[1], caption.split()[3]
        gap = max(1, slots // 4)
        i = int(rng.integers(0, slots - gap))
        j = int(rng.integers(i + gap, slots))
        events += [place(i, first, coloured()), place(j, second, coloured())]
        answer_ = {"first": first, "second": second}
    elif task == "count":
        word, shape = caption.split()[1:]
        k = NUMBERS.index(word) + 1
        for part in range(k):  # one occurrence in each of k equal parts: spread over the clip
            events.append(place(free_slot(part * slots // k, (part + 1) * slots // k), shape, coloured()))
        answer_ = {"count": k, "shape": shape}
    else:  # pair
        shape = caption.split()[1]
        tone = list(TONES)[rng.integers(len(TONES))]
        for s in SHAPES:
            events.append(place(free_slot(), s, coloured(), tone if s == shape else None))
        answer_ = {"shape": shape}
    lo, hi = spec.distractors
    for _ in range(int(rng.integers(lo, hi + 1))):
        events.append(place(free_slot(), SHAPES[rng.integers(len(SHAPES))], GREY))
    return ClipPlan(task, frames, caption, answer_, sorted(events, key=lambda e: e.frame))


def balanced_plans(task: str, frames: int, n: int, seed: int, spec: TaskSpec = TaskSpec()) -> list[ClipPlan]:
    """`n` clips whose answers cycle through every candidate (balanced), drawn from `seed`."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(candidates(task))) for _ in range(math.ceil(n / len(candidates(task))))])
    return [plan(task, frames, rng, spec, int(order[i])) for i in range(n)]


# rendering ------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _templates(spec: TaskSpec, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Each shape's (s, s) bool mask on `device` (kept: training draws a batch every step)."""
    return {k: v.to(device) for k, v in _template_masks(spec).items()}


@lru_cache(maxsize=16)
def _colour(rgb: tuple[int, int, int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32, device=device)


def _template_masks(spec: TaskSpec) -> dict[str, torch.Tensor]:
    s = spec.shape_px
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    c = s / 2
    circle = (yy - c) ** 2 + (xx - c) ** 2 <= (0.48 * s) ** 2
    square = (yy >= 0.1 * s) & (yy <= 0.9 * s) & (xx >= 0.1 * s) & (xx <= 0.9 * s)
    triangle = (yy >= 0.08 * s) & (yy <= 0.92 * s) & ((xx - c).abs() <= (yy - 0.08 * s) * 0.55)
    return {"circle": circle, "square": square, "triangle": triangle}


def render_frames(plans: Sequence[ClipPlan], spec: TaskSpec = TaskSpec(), device="cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 frames (B, T, H, W, 3) of plans of one length."""
    frames = {p.frames for p in plans}
    if len(frames) != 1:
        raise ValueError(f"render needs plans of one length, got {sorted(frames)}")
    t = frames.pop()
    b, s, ef = len(plans), spec.size, spec.event_frames
    base = _colour(BACKGROUND, str(torch.device(device)))
    noise = torch.randn(b, t, s, s, 1, device=device, generator=generator) * spec.noise
    video = (base + noise).clamp_(0, 255)
    tmpl = _templates(spec, str(torch.device(device)))
    for i, p in enumerate(plans):
        for e in p.events:
            region = video[i, e.frame:e.frame + ef, e.y:e.y + spec.shape_px, e.x:e.x + spec.shape_px]
            inside = tmpl[e.shape][None, :region.shape[1], :region.shape[2], None]
            colour = _colour(tuple(e.colour), str(torch.device(device)))
            # a select, not ``region[:, mask] = colour``: boolean indexing waits for the device
            # (it counts the mask first), once per event, and training draws a batch a step
            region.copy_(torch.where(inside, colour, region))
    return video.round_().to(torch.uint8)


def render_wave(plans: Sequence[ClipPlan], spec: TaskSpec = TaskSpec(), device="cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, S) float32 mono audio: faint noise and each toned event's tone (10 ms fades)."""
    t = plans[0].frames
    sr = spec.sample_rate
    n = int(round(t / spec.fps * sr))
    wave = torch.randn(len(plans), n, device=device, generator=generator) * spec.audio_noise
    dur = int(round(spec.event_seconds * sr))
    ts = torch.arange(dur, device=device, dtype=torch.float32) / sr
    fade = int(0.01 * sr)
    env = torch.ones(dur, device=device)
    env[:fade] = torch.linspace(0, 1, fade, device=device)
    env[-fade:] = torch.linspace(1, 0, fade, device=device)
    for i, p in enumerate(plans):
        for e in p.events:
            if e.tone is None:
                continue
            a = int(round(e.frame / spec.fps * sr))
            m = min(dur, n - a)
            wave[i, a:a + m] += (0.3 * env * torch.sin(2 * math.pi * TONES[e.tone] * ts))[:m]
    return wave


@lru_cache(maxsize=8)
def _normalisation(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std (1, 1, 3, 1, 1) on `device`, kept (a host-to-device copy every
    batch waits for the device)."""
    shape = (1, 1, 3, 1, 1)
    return (torch.tensor(IMAGENET_MEAN, device=device).view(shape), torch.tensor(IMAGENET_STD, device=device).view(shape))


def to_batch(frames: torch.Tensor, wave: torch.Tensor, spec: TaskSpec = TaskSpec()) -> dict:
    """The model's batch from uint8 frames (B, T, H, W, 3) and waves (B, S): pixels normalised
    as the data loader does (ImageNet mean / std), log-mel audio, frame times."""
    b, t = frames.shape[:2]
    mean, std = _normalisation(str(frames.device))
    # (x / 255 - mean) / std, not pixels.normalize_pixels' x * (1 / 255): the last bit of every
    # pixel is part of what a benchmark spec's key names (its committed runs replay step for step)
    video = (frames.permute(0, 1, 4, 2, 3).float() / 255.0 - mean) / std  # (B, T, 3, H, W)
    mel = log_mel(wave, spec.sample_rate, spec.n_mels, hop_seconds=spec.hop_seconds)  # (B, M, Tm)
    times = (torch.arange(t, dtype=torch.float64) / spec.fps).expand(b, t).clone()
    return {"video": video, "audio": mel, "video_times": times, "audio_hop_seconds": spec.hop_seconds,
            "audio_start": torch.zeros(b, dtype=torch.float64)}


def render(plans: Sequence[ClipPlan], spec: TaskSpec = TaskSpec(), device="cpu", seed: int | None = None) -> dict:
    """Plans of one length -> the model's batch on `device` (with "caption" and "task")."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
    batch = to_batch(render_frames(plans, spec, device, gen), render_wave(plans, spec, device, gen), spec)
    batch["caption"] = [p.caption for p in plans]
    batch["task"] = [p.task for p in plans]
    return batch


# files ------------------------------------------------------------------------------------------
def write_task_set(out_dir, tasks: Sequence[str], frames: int, clips: int, seed: int, spec: TaskSpec = TaskSpec()):
    """`clips` balanced clips of every task in `tasks` at `frames` frames, written as lossless
    H.264 + AAC MP4s with a manifest (``manifest.jsonl``: video, caption, and in ``meta`` the task,
    answer, events and frames), the same clips ``balanced_plans`` draws from `seed`. Returns the
    manifest path."""
    from pathlib import Path

    from .manifest import write_manifest
    from .synth import write_media

    for t in tasks:
        check_task(t)
    root = Path(out_dir)
    records = []
    for i, task in enumerate(tasks):
        for j, p in enumerate(balanced_plans(task, frames, clips, seed + 7919 * i + frames, spec)):
            name = f"{task}-{frames:05d}-{j:04d}.mp4"
            gen = torch.Generator().manual_seed(seed + 104_729 * i + j)
            video = render_frames([p], spec, generator=gen)[0].numpy()
            # AAC takes 8 kHz and up: the file's audio is drawn at 16 kHz (the tones are analytic);
            # a reader resamples it to the model's rate
            wave = render_wave([p], replace(spec, sample_rate=FILE_SAMPLE_RATE), generator=gen)[0].numpy()
            write_media(root / name, [video], wave, spec.fps, (spec.size, spec.size), FILE_SAMPLE_RATE)
            records.append({"id": name[:-4], "video": name, "caption": p.caption, "task": task, "frames": frames,
                            "fps": spec.fps, "answer": p.answer,
                            "events": [dict(vars(e), colour=list(e.colour)) for e in p.events]})
    manifest = root / "manifest.jsonl"
    write_manifest(manifest, records)
    return manifest


def load_task_set(manifest, spec: TaskSpec = TaskSpec(), backend: str = "pyav", device="cpu") -> tuple[dict, list[dict]]:
    """Decode a written task set (``write_task_set``) with a real decoder into the model's batch
    (the same layout as ``render``: every clip must have one length) and its manifest records."""
    import json
    from pathlib import Path

    import numpy as np

    from .audio import read_audio
    from .decode import read_frames

    root = Path(manifest).parent
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{manifest}: no clips")
    lengths = {r["frames"] for r in records}
    if len(lengths) != 1:
        raise ValueError(f"{manifest}: clips of one length are batched together, got lengths {sorted(lengths)}")
    frames, waves = [], []
    for r in records:
        video, _ = read_frames(root / r["video"], np.arange(r["frames"]), backend=backend)
        frames.append(torch.from_numpy(video))
        n = int(round(r["frames"] / spec.fps * spec.sample_rate))
        wave = read_audio(root / r["video"], spec.sample_rate, backend=backend)[:n]
        waves.append(torch.from_numpy(np.pad(wave, (0, n - len(wave)))))
    batch = to_batch(torch.stack(frames).to(device), torch.stack(waves).to(device), spec)
    batch["caption"] = [r["caption"] for r in records]
    batch["task"] = [r["task"] for r in records]
    return batch, records

