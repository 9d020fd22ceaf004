"""Every video backend gives the same frames for the same request (``mmsparse.data.decode``).

Files are written with PyAV (``tests/data/media.py``) in the codecs and containers where the
backends used to disagree: H.264 with B-frames, VP9, an MPEG-4 AVI with a timestamp gap, MJPEG,
FFV1, odd sizes, a rotated file, a variable frame rate, a single frame. Each is decoded by every
backend present; indices (read back from the code painted into each frame), shapes, times and
pixels are compared, and PyAV's frames against the frames that were encoded.
"""

from __future__ import annotations

import importlib.util
from fractions import Fraction

import numpy as np
import pytest

from mmsparse.data import synth
from mmsparse.data.decode import BACKENDS, open_video, resize_frames, rotate_frames

from tests.data.media import make_frames, write_video

N, SIZE, ODD = 10, (64, 96), (49, 67)
PRESENT = [b for b in BACKENDS if importlib.util.find_spec({"pyav": "av"}.get(b, b))]
VFR_PTS = [0, 100, 150, 400, 420, 500, 700, 730, 760, 1000]  # ms


def _gap(pts: int) -> int:  # frame 2 onwards one frame later: a dropped frame's timestamp
    return pts + (pts >= 2)


# name -> (writer kwargs, stored size (H, W), display rotation in degrees counter-clockwise)
FILES = {
    "h264_bframes.mp4": (dict(codec="libx264", options={"g": "4", "bf": "2", "crf": "12"}), SIZE, 0),
    "vp9.webm": (dict(codec="libvpx-vp9", options={"g": "4", "crf": "12", "b": "0", "deadline": "realtime"}),
                 SIZE, 0),
    "mpeg4_gap.avi": (dict(codec="mpeg4", fmt="avi", options={"g": "4", "qscale": "2"}, packet_pts=_gap), SIZE, 0),
    "mjpeg.avi": (dict(codec="mjpeg", fmt="avi", pix_fmt="yuvj420p", options={"qscale": "2"}), SIZE, 0),
    "ffv1_odd.mkv": (dict(codec="ffv1"), ODD, 0),
    "vp9_odd.webm": (dict(codec="libvpx-vp9", options={"crf": "12", "b": "0", "deadline": "realtime"}), ODD, 0),
    "rot90.mp4": (dict(codec="libx264", rotation=90, options={"bf": "0", "crf": "12"}), SIZE, 90),
    "rot270.mp4": (dict(codec="libx264", rotation=-90, options={"bf": "0", "crf": "12"}), SIZE, 270),
    "vfr.mp4": (dict(codec="libx264", time_base=Fraction(1, 1000), pts=VFR_PTS, options={"bf": "0", "crf": "12"}),
                SIZE, 0),
    "one.mp4": (dict(codec="libx264", options={"crf": "12"}), SIZE, 0),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (path, source frames as displayed (N, H, W, 3), expected times (N,))."""
    root = tmp_path_factory.mktemp("backends")
    out = {}
    for name, (kw, size, rot) in FILES.items():
        n = 1 if name.startswith("one") else N
        frames = make_frames(n, size)
        path = write_video(root / name, frames, **kw)
        if "pts" in kw:
            times = np.asarray(kw["pts"], np.float64) / 1000
        else:
            times = np.asarray([_gap(i) if "gap" in name else i for i in range(n)], np.float64) / 8
        out[name] = (path, rotate_frames(frames, rot), times)
    return out


def _indices(frames: np.ndarray, rotation: int) -> list[int]:
    """The frame codes of displayed frames (the code sits at the top of the stored frame)."""
    return [synth.decode_frame_index(f) for f in rotate_frames(frames, -rotation % 360)]


@pytest.mark.parametrize("name", list(FILES))
def test_every_backend_gives_the_same_frames(files, name):
    path, truth, times = files[name]
    rot = FILES[name][2]
    n = len(truth)
    idx = np.array([n - 1, 0, n // 2, n // 2, 1 % n])  # unsorted, repeated
    got = {}
    for b in PRESENT:
        r = open_video(path, b)
        assert (r.num_frames, r.height, r.width) == (n, *truth.shape[1:3]), b
        frames, t = r.read(idx)
        assert frames.shape == (len(idx), *truth.shape[1:3], 3), b
        assert _indices(frames, rot) == idx.tolist(), b
        np.testing.assert_allclose(t, times[idx], atol=1e-6, err_msg=b)
        got[b] = frames
    # PyAV against what was encoded: codec rounding only (4:2:0 chroma, quantisation)
    err = np.abs(got["pyav"].astype(np.int16) - truth[idx])
    assert err.mean() < 4.0, err.mean()
    for b, frames in got.items():  # the same conversion: bit-identical for even sizes
        d = np.abs(frames.astype(np.int16) - got["pyav"])
        if truth.shape[1] % 2 == 0 and truth.shape[2] % 2 == 0:
            # equal to the bit with these builds; another FFmpeg's IDCT may round a pixel apart
            assert d.mean() < 0.05 and d.max() <= 3, (b, d.mean(), d.max())
        else:  # odd sizes: the FFmpeg versions upsample the odd chroma column differently
            assert d.mean() < 1.5, (b, d.mean())


@pytest.mark.parametrize("name", ["mpeg4_gap.avi", "rot90.mp4", "vfr.mp4", "h264_bframes.mp4"])
def test_resized_frames_agree_across_backends(files, name):
    path, truth, _ = files[name]
    size = (40, 27) if truth.shape[1] > truth.shape[2] else (27, 40)
    out = {b: open_video(path, b).read([0, 5, 9], size=size)[0] for b in PRESENT}
    for b, frames in out.items():
        assert frames.shape == (3, *size, 3)
        # the same antialiased bilinear filter, in YUV (PyAV) or RGB (torch, decord): equal but
        # at sharp coloured edges of these synthetic frames
        d = np.abs(frames.astype(np.int16) - out["pyav"])
        assert d.mean() < 3.0 and np.percentile(d, 90) <= 8, (b, d.mean())


def test_gap_and_rotation_change_no_index_or_shape(files):
    """The two disagreements of issue 26: PyAV repeated a frame at an AVI timestamp gap (every
    later index one off from decord's) and ignored the display matrix decord applied."""
    for name in ("mpeg4_gap.avi", "rot90.mp4"):
        path, truth, _ = files[name]
        shapes = {b: open_video(path, b).read(np.arange(N))[0].shape for b in PRESENT}
        assert set(shapes.values()) == {(N, *truth.shape[1:3], 3)}, shapes
    assert files["rot90.mp4"][1].shape[1:3] == SIZE[::-1]


@pytest.mark.skipif("decord" not in PRESENT, reason="decord not installed")
@pytest.mark.parametrize("hw", [(66, 100), (100, 66)])
def test_decord_reads_any_target_size(tmp_path, hw):
    """decord 0.6.0's own scaler failed its RGB copy at output widths 8, 12, 16, 24, 48, 72 of
    a 100 x 66 H.264 file; frames are decoded natively and resized by torch instead."""
    path = write_video(tmp_path / "s.mp4", make_frames(3, hw), "libx264", options={"bf": "0"})
    r = open_video(path, "decord")
    native, _ = r.read([0, 2])
    for w in (8, 12, 16, 24, 48, 72):
        size = (max(1, round(w * hw[0] / hw[1])), w)
        frames, _ = r.read([0, 2], size=size)
        assert frames.shape == open_video(path, "pyav").read([0, 2], size=size)[0].shape == (2, *size, 3)
        np.testing.assert_array_equal(frames, resize_frames(native, size))


@pytest.mark.parametrize("name, kw", [
    ("h264_long.mp4", dict(codec="libx264", options={"g": "24", "bf": "3", "crf": "18"})),
    ("mpeg4_long_gap.avi", dict(codec="mpeg4", fmt="avi", options={"g": "25", "qscale": "2"},
                                packet_pts=lambda p: p + 3 * (p >= 100))),  # three timestamps missing
])
def test_scattered_reads_seek_to_the_same_frames(tmp_path, name, kw):
    """Indices far apart (seeks past ``seek_gap``), unsorted and repeated, on 160 frames."""
    path = write_video(tmp_path / name, make_frames(160, (48, 64)), **kw)
    idx = np.random.default_rng(0).integers(0, 160, 24)
    out = {}
    for b in PRESENT:
        r = open_video(path, b)
        assert r.num_frames == 160, b
        frames, times = r.read(idx)
        assert [synth.decode_frame_index(f) for f in frames] == idx.tolist(), b
        out[b] = frames, times
    for b, (frames, times) in out.items():
        np.testing.assert_allclose(times, out["pyav"][1], atol=1e-6)
        assert np.abs(frames.astype(np.int16) - out["pyav"][0]).mean() < 0.05, b
