"""Small media files with known frames, written with PyAV only, for the cross-backend tests.

Each frame is a smooth colour gradient with a bright square that moves with the frame index and
the index painted as a block code at the top (``synth.encode_frame_index``), so a decoded frame
says which source frame it is, and its orientation shows whether rotation metadata was applied.

Legend: N frames, H x W frame size (as stored, before any rotation).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from mmsparse.data import synth


def make_frames(n: int, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W, 3) uint8 test frames: gradient, moving square, index code on top."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([40 + 150 * xx / max(1, w - 1), 40 + 150 * yy / max(1, h - 1),
                     np.full((h, w), 120.0)], -1)
    out = np.empty((n, h, w, 3), np.uint8)
    code = synth.frame_code_height(size)
    side = max(4, min(h - code, w) // 4)
    for i in range(n):
        img = base.copy()
        y0 = code + (3 * i) % max(1, h - code - side)
        x0 = (5 * i) % max(1, w - side)
        img[y0:y0 + side, x0:x0 + side] = (230, 60, 60)
        out[i] = img.astype(np.uint8)
        synth.encode_frame_index(out[i], i)
    return out


def write_video(path: str | Path, frames: np.ndarray, codec: str = "libx264", *, fmt: str | None = None,
                pix_fmt: str = "yuv420p", rate: int = 8, pts: list[int] | None = None,
                time_base: Fraction | None = None, rotation: int | None = None, options: dict | None = None,
                packet_pts=None) -> Path:
    """Encode ``frames`` (N, H, W, 3) with ``codec`` into ``path`` and return it.

    ``pts``: each frame's timestamp in ``time_base`` units (variable frame rate); default 0..N-1
    at ``rate``. ``rotation``: degrees counter-clockwise, written as the stream's display matrix.
    ``packet_pts``: a function mapping an encoded packet's pts to the pts it is written with
    (a container with a timestamp gap: the packets keep their bytes, the times skip).
    """
    import av

    path = Path(path)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(rate))
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = pix_fmt
        if time_base is not None:
            s.time_base = time_base
            s.codec_context.time_base = time_base
        s.options = dict(options or {})
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, img in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            fr.pts = i if pts is None else pts[i]
            if time_base is not None:
                fr.time_base = time_base
            for pkt in s.encode(fr):
                _mux(c, pkt, packet_pts)
        for pkt in s.encode():
            _mux(c, pkt, packet_pts)
    return path


def _mux(c, pkt, packet_pts) -> None:
    if packet_pts is not None and pkt.pts is not None:
        new = packet_pts(pkt.pts)
        shift = new - pkt.pts
        pkt.pts = new
        if pkt.dts is not None:
            pkt.dts += shift
    c.mux(pkt)


def rewrite_audio(src: str | Path, dst: str | Path, damage) -> Path:
    """Copy ``src`` to ``dst`` packet by packet (no re-encoding), passing each audio packet's
    bytes through ``damage(k, data) -> bytes`` (k counts audio packets from 0)."""
    import av

    dst = Path(dst)
    with av.open(str(src)) as i, av.open(str(dst), "w", format=i.format.name.split(",")[0]) as o:
        out = {s.index: o.add_stream_from_template(s) for s in i.streams}
        k = 0
        for p in i.demux():
            if p.dts is None:  # the demuxer's end-of-stream packets
                continue
            index = p.stream.index
            if p.stream.type == "audio":
                q = av.Packet(damage(k, bytes(p)))
                q.pts, q.dts, q.time_base = p.pts, p.dts, p.time_base
                k += 1
                p = q
            p.stream = out[index]
            o.mux(p)
    return dst


def write_tone(path: str | Path, seconds: float = 3.0, sample_rate: int = 16000, codec: str = "libopus",
               fmt: str = "matroska") -> Path:
    """A mono 440 Hz tone, audio only."""
    import av

    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sample_rate)) / sample_rate)).astype(np.float32)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=sample_rate)
        s.layout = "mono"
        for k in range(0, len(wave), 960):
            f = av.AudioFrame.from_ndarray(wave[None, k:k + 960], format="flt", layout="mono")
            f.sample_rate, f.pts = sample_rate, k
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return Path(path)
