"""Synthetic media with known content: the default data of every recipe and the test fixture.

Each clip is a real H.264 MP4 (yuv420p, ``faststart`` so the index sits before the media data)
with an AAC mono audio track, written with PyAV. What happens in it is drawn from a small
vocabulary so a tiny captioner can learn it:

- a coloured shape (red / green / blue / yellow x circle / square / triangle) appears, moves
  (left / right / up / down) and vanishes at known frames,
- a tone (``high`` 880 Hz or ``low`` 220 Hz) starts and stops at known times,

and the caption says which came first, e.g. ``"a red circle moves left then a high tone plays"``.
A share of the clips (``empty_fraction``; training data: one in eight) shows nothing: the plain
background in silence, captioned ``"nothing happens"`` (``NOTHING``), so a model also learns to
say so of a stretch of video without events (a window of a long clip, say) instead of inventing
one.
Every frame also carries its own index as a 16-bit code of black / white blocks in a band at
the top (``frame_code_height(size)`` rows; bit k at block row k // 8, column k % 8), so tests can
check that a decoder returned exactly the frames it was asked for.

``long=True`` writes needle clips instead: 512 to 4,096 frames (``long_frames``) with a single key
event, a shape and a tone together for one second at a random time (``meta.events`` gives the
seconds). PNG images of one shape each go to ``images/`` with their own ``images.jsonl``.

Everything drawn is a pure function of ``seed``: the same seed gives the same manifests,
captions, events, rendered frames and audio, and the same decoded pixels. The video is encoded
losslessly (libx264 at crf 0, still yuv420p): lossy libx264 (crf 18) gave about one clip in a
hundred a different bitstream, with pixels off by up to ~20, when the machine was busy with
other processes (measured on a 2-core CPU, 32 x 32: the rendered frames and their YUV planes
hash the same in every process, the x264 packets do not), so two training runs that generated
their own data drifted apart (1e-5 in the loss from the first affected batch, ~1e-3 after 40
steps). A lossless stream decodes to its input whatever choices the encoder makes; the files
are 1.1 to 1.5 times larger.

Shapes: frames (T, H, W, 3) uint8 RGB; audio (S,) float32 at ``sample_rate``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from .manifest import write_manifest

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TONES = {"high": 880.0, "low": 220.0}
# The ImageNet mean grey (round(255 * IMAGENET_MEAN)): normalised pixels of the background are
# ~0, so a video token is the shapes in it, not a large offset shared by every token. On the old
# near-black (40, 40, 40) background (-1.1 to -1.4 after normalisation, in every pixel) the
# tiny_cpu captioner learnt the tone and the order of events but ignored the video entirely.
BACKGROUND = (124, 116, 104)
# Version of what the generator writes for a given spec: part of every cache key of generated
# data (training runs, the harness and long-clip benchmarks), so a change to the content (as the
# background above, version 2) regenerates cached sets instead of reusing stale ones.
FORMAT = 3  # 3: lossless video, clips where nothing happens
NOTHING = "nothing happens"  # the caption of a clip without events
CODE_BITS = 16
_BLACK, _WHITE = 16, 235


def frame_code_height(size: tuple[int, int]) -> int:
    """Rows at the top of each frame that hold the frame-index code (two rows of 8 blocks)."""
    return 2 * (size[1] // 8)


def encode_frame_index(frame: np.ndarray, index: int) -> None:
    """Paint ``index`` as 16 black/white blocks into the top band of ``frame`` (H, W, 3), in place."""
    bs = frame.shape[1] // 8
    for k in range(CODE_BITS):
        r, c = divmod(k, 8)
        frame[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = _WHITE if (index >> k) & 1 else _BLACK


def decode_frame_index(frame: np.ndarray) -> int:
    """Read the index painted by ``encode_frame_index`` from a decoded frame (H, W, 3) or (3, H, W).

    Uses the mean of each block's centre, so H.264 ringing at block edges does not matter.
    """
    if frame.shape[0] == 3 and frame.shape[-1] != 3:
        frame = np.moveaxis(frame, 0, -1)
    bs = frame.shape[1] // 8
    m = max(1, bs // 4)
    value = 0
    for k in range(CODE_BITS):
        r, c = divmod(k, 8)
        block = frame[r * bs + m:(r + 1) * bs - m, c * bs + m:(c + 1) * bs - m]
        if float(block.mean()) > (_BLACK + _WHITE) / 2:
            value |= 1 << k
    return value


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    # triangle pointing up: width grows linearly from apex to base
    return (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)


@dataclass(frozen=True)
class ClipPlan:
    """What one synthetic clip contains; times in seconds, frames as [start, end) indices."""

    frames: int
    fps: int
    shape: str
    colour: str
    motion: str | None  # None: the shape stays still (long-mode needle)
    shape_frames: tuple[int, int]
    tone: str
    tone_seconds: tuple[float, float]
    caption: str

    def events(self) -> list[dict]:
        s0, s1 = self.shape_frames
        out = []
        if s1 > s0:
            out.append({"kind": "shape", "shape": self.shape, "colour": self.colour, "motion": self.motion,
                        "start": s0 / self.fps, "end": s1 / self.fps, "start_frame": s0, "end_frame": s1})
        if self.tone_seconds[1] > self.tone_seconds[0]:
            out.append({"kind": "tone", "pitch": self.tone, "freq": TONES[self.tone],
                        "start": self.tone_seconds[0], "end": self.tone_seconds[1]})
        return out


def plan_clip(rng: np.random.Generator, frames: int, fps: int, long: bool = False, empty: bool = False) -> ClipPlan:
    """Draw a clip's events. Short clips: two events with well separated onsets; long: one needle;
    ``empty``: none (background and silence, caption ``NOTHING``)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    tone = list(TONES)[rng.integers(len(TONES))]
    dur = frames / fps
    if empty:
        return ClipPlan(frames, fps, shape, colour, None, (0, 0), tone, (0.0, 0.0), NOTHING)
    if long:
        length = min(frames, fps)  # one second
        s0 = int(rng.integers(0, frames - length + 1))
        t0 = s0 / fps
        caption = f"a {colour} {shape} appears with a {tone} tone"
        return ClipPlan(frames, fps, shape, colour, None, (s0, s0 + length), tone, (t0, t0 + length / fps), caption)
    motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
    shape_first = bool(rng.integers(2))
    early = (0.0, 0.2)   # onset window of the first event, fraction of the clip
    late = (0.45, 0.6)   # onset window of the second event
    a, b = (early, late) if shape_first else (late, early)
    s0 = int(round(frames * rng.uniform(*a)))
    s1 = int(round(frames * rng.uniform(0.85, 1.0)))
    s1 = max(s1, s0 + 2)
    t0 = dur * rng.uniform(*b)
    t1 = min(dur, t0 + dur * rng.uniform(0.25, 0.35))
    shape_ev = f"a {colour} {shape} moves {motion}"
    tone_ev = f"a {tone} tone plays"
    caption = f"{shape_ev} then {tone_ev}" if shape_first else f"{tone_ev} then {shape_ev}"
    return ClipPlan(frames, fps, shape, colour, motion, (s0, s1), tone, (t0, t1), caption)


def render_frames(plan: ClipPlan, size: tuple[int, int], start: int = 0, stop: int | None = None,
                  frame_code: bool = True) -> np.ndarray:
    """Frames [start, stop) of ``plan`` as (T, H, W, 3) uint8 RGB."""
    h, w = size
    stop = plan.frames if stop is None else stop
    band = frame_code_height(size) if frame_code else 0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = max(2.0, min(h - band, w) / 8)
    lo_y, hi_y = band + r, h - 1 - r
    lo_x, hi_x = r, w - 1 - r
    cy0, cx0 = (lo_y + hi_y) / 2, (lo_x + hi_x) / 2
    dx, dy = MOTIONS[plan.motion] if plan.motion else (0, 0)
    s0, s1 = plan.shape_frames
    out = np.empty((stop - start, h, w, 3), np.uint8)
    colour = np.array(COLOURS[plan.colour], np.uint8)
    for i in range(start, stop):
        f = out[i - start]
        f[:] = BACKGROUND
        if s0 <= i < s1:
            p = (i - s0) / max(1, s1 - s0 - 1)  # 0 -> 1 over the shape's life
            cx = cx0 + dx * (p - 0.5) * (hi_x - lo_x)
            cy = cy0 + dy * (p - 0.5) * (hi_y - lo_y)
            f[_shape_mask(plan.shape, yy, xx, cy, cx, r)] = colour
        if frame_code:
            encode_frame_index(f, i)
    return out


def render_audio(plan: ClipPlan, sample_rate: int = 16000) -> np.ndarray:
    """The clip's soundtrack (S,) float32: silence with the tone, 10 ms fades at its ends."""
    n = int(round(plan.frames / plan.fps * sample_rate))
    out = np.zeros(n, np.float32)
    a = int(round(plan.tone_seconds[0] * sample_rate))
    b = min(n, int(round(plan.tone_seconds[1] * sample_rate)))
    t = np.arange(max(0, b - a)) / sample_rate
    env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01) if b > a else t
    out[a:b] = (0.3 * env * np.sin(2 * np.pi * TONES[plan.tone] * t)).astype(np.float32)
    return out


def write_clip(path: str | Path, plan: ClipPlan, size: tuple[int, int] = (64, 64), sample_rate: int = 16000,
               audio: bool = True, frame_code: bool = True, crf: int | None = None, chunk: int = 256,
               codec: str = "libx264") -> Path:
    """Encode ``plan`` into an H.264 (+ AAC) MP4 at ``path``; frames are rendered in chunks.
    ``crf``: None is lossless H.264 (0; see the module's note on determinism), 18 for AV1.

    ``codec="libsvtav1"`` writes AV1 instead: a real file that decord 0.6.0 cannot open (its
    bundled FFmpeg has no AV1 decoder) and PyAV reads, which is what tests of the fallback need.
    """
    chunks = (render_frames(plan, size, start, min(plan.frames, start + chunk), frame_code)
              for start in range(0, plan.frames, chunk))
    wave = render_audio(plan, sample_rate) if audio else None
    return write_media(path, chunks, wave, plan.fps, size, sample_rate, crf, codec)


def write_media(path: str | Path, chunks: Iterable[np.ndarray], wave: np.ndarray | None, fps: int,
                size: tuple[int, int], sample_rate: int = 16000, crf: int | None = None,
                codec: str = "libx264") -> Path:
    """Encode frames (an iterable of (k, H, W, 3) uint8 chunks, H x W = ``size``) and an optional
    mono wave (S,) float32 into an MP4 at ``path``: H.264 (lossless with ``crf`` None) or AV1,
    AAC audio. Written to a temporary name of this process and renamed: never half a file."""
    import av

    if codec not in ("libx264", "libsvtav1"):
        raise ValueError(f"codec must be libx264 or libsvtav1, got {codec!r}")
    if codec == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder unless told not to

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of this process's own: ranks that generate the same data side by side never share
    # a partial file, and the last rename leaves one whole, identical clip
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    with av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as c:
        vs = c.add_stream(codec, rate=Fraction(fps))
        vs.width, vs.height = size[1], size[0]
        vs.pix_fmt = "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": str(0 if crf is None else crf), "preset": "veryfast", "g": str(2 * fps), "bf": "0"}
        else:
            vs.options = {"crf": str(18 if crf is None else crf), "preset": "10", "g": str(2 * fps)}
        ast = None
        if wave is not None:
            ast = c.add_stream("aac", rate=sample_rate)
            ast.layout = "mono"
        pts = 0
        for block in chunks:
            for img in block:
                fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                fr.pts = pts
                pts += 1
                for pkt in vs.encode(fr):
                    c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if ast is not None:
            wave = np.ascontiguousarray(wave, dtype=np.float32)
            for k in range(0, len(wave), 1024):
                af = av.AudioFrame.from_ndarray(wave[None, k:k + 1024], format="fltp", layout="mono")
                af.sample_rate = sample_rate
                af.pts = k
                for pkt in ast.encode(af):
                    c.mux(pkt)
            for pkt in ast.encode():
                c.mux(pkt)
    tmp.replace(path)
    return path


def write_image(path: str | Path, rng: np.random.Generator, size: tuple[int, int]) -> tuple[Path, str]:
    """A PNG of one shape at a random place; returns the path and its caption."""
    import torch
    from torchvision.io import encode_png

    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    h, w = size
    r = max(2.0, min(h, w) / 6)
    cy, cx = rng.uniform(r, h - 1 - r), rng.uniform(r, w - 1 - r)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    img[_shape_mask(shape, yy, xx, cy, cx, r)] = COLOURS[colour]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(torch.from_numpy(img).permute(2, 0, 1).contiguous()).numpy().tobytes())
    return path, f"a {colour} {shape}"


def make_dataset(out_dir: str | Path, clips: int = 16, frames: int = 32, seed: int = 0,
                 size: tuple[int, int] = (64, 64), long: bool = False, fps: int = 8,
                 images: int | None = None, sample_rate: int = 16000,
                 long_frames: tuple[int, int] = (512, 4096), audio: bool = True,
                 frame_code: bool = True, processes: int = 1, long_lengths: str = "range",
                 empty_fraction: float = 0.0) -> Path:
    """Write a synthetic dataset under ``out_dir`` and return the path of its ``manifest.jsonl``.

    Args:
        clips: number of video clips (``videos/clip-XXXX.mp4`` or ``videos/long-XXXX.mp4``).
        frames: frames per clip (ignored with ``long``: drawn from ``long_frames`` per clip).
        long_lengths: how a long clip's length is drawn from ``long_frames`` = (lo, hi):
            ``range`` any integer in [lo, hi]; ``doubling`` one of lo, 2 lo, 4 lo, ... <= hi, so
            a fixed number of sampled frames lands at a handful of frame spacings (clips of
            one spacing share their attention layouts; every other spacing builds its own).
        size: (H, W) of frames and images; H and W must be even (yuv420p) and at least 16.
        images: PNG images in ``images/`` listed in ``images.jsonl``; default ``clips`` (0 with
            ``long``).
        processes: clips encoded side by side in this many processes; the plans are drawn here,
            so the output does not depend on it.
        empty_fraction: share of the (short) clips where nothing happens (``NOTHING``); which
            ones is drawn from its own stream, so the other clips do not depend on it.
    """
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise ValueError(f"size must be even and at least 16 on both sides, got {size}")
    if clips < 0 or (not long and frames < 4):
        raise ValueError(f"need clips >= 0 and frames >= 4, got clips={clips}, frames={frames}")
    lo, hi = long_frames
    if long and not (fps <= lo <= hi < 2 ** CODE_BITS):
        raise ValueError(f"long_frames must satisfy fps <= lo <= hi < {2 ** CODE_BITS}, got {long_frames}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
    if long_lengths not in ("range", "doubling"):
        raise ValueError(f"long_lengths must be 'range' or 'doubling', got {long_lengths!r}")
    doubling = [lo << k for k in range(32) if lo << k <= hi]
    if not long and frames >= 2 ** CODE_BITS:
        raise ValueError(f"frames must be < {2 ** CODE_BITS}, got {frames}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, jobs = [], []
    prefix = "long" if long else "clip"
    for i in range(clips):
        rng = np.random.default_rng([seed, 0 if not long else 1, i])
        if not long:
            n = frames
        elif long_lengths == "doubling":
            n = doubling[int(rng.integers(len(doubling)))]
        else:
            n = int(rng.integers(lo, hi + 1))
        empty = not long and np.random.default_rng([seed, 3, i]).random() < empty_fraction
        plan = plan_clip(rng, n, fps, long=long, empty=empty)
        rel = f"videos/{prefix}-{i:04d}.mp4"
        jobs.append((out / rel, plan))
        records.append({"id": f"{prefix}-{i:04d}", "video": rel, "caption": plan.caption,
                        "frames": n, "fps": fps, "events": plan.events()})
    _write_clips(jobs, (h, w), sample_rate, audio, frame_code, processes)
    manifest = write_manifest(out / "manifest.jsonl", records)
    n_img = (0 if long else clips) if images is None else images
    img_records = []
    for i in range(n_img):
        rng = np.random.default_rng([seed, 2, i])
        rel = f"images/img-{i:04d}.png"
        _, cap = write_image(out / rel, rng, (h, w))
        img_records.append({"id": f"img-{i:04d}", "image": rel, "caption": cap})
    if img_records:
        write_manifest(out / "images.jsonl", img_records)
    return manifest


def _write_clips(jobs: list[tuple[Path, ClipPlan]], size: tuple[int, int], sample_rate: int, audio: bool,
                 frame_code: bool, processes: int) -> None:
    kw = dict(size=size, sample_rate=sample_rate, audio=audio, frame_code=frame_code)
    if processes <= 1 or len(jobs) <= 1:
        for path, plan in jobs:
            write_clip(path, plan, **kw)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    # fork: a child needs nothing but this module, and spawn would re-import torch in each
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=ctx) as pool:
        # longest first, so one long clip does not finish alone at the end
        order = sorted(jobs, key=lambda j: -j[1].frames)
        list(pool.map(partial(write_clip, **kw), [p for p, _ in order], [q for _, q in order]))


def vocabulary() -> list[str]:
    """Every word a synthetic caption can use (for tokenizers and tests)."""
    words = {"a", "then", "moves", "tone", "plays", "appears", "with", *NOTHING.split(), *COLOURS, *SHAPES, *MOTIONS,
             *TONES}
    return sorted(words)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a small synthetic dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_dataset(a.out, clips=a.clips, frames=a.frames, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
