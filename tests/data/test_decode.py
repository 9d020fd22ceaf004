import json
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mmsparse.data import synth
from mmsparse.data.decode import (call_with_timeout, open_video, read_frames, resize_frames, sample_indices,
                                  short_side_size)
from mmsparse.data.errors import MediaError
from tests.data.hangs import release_hung_decodes

BACKENDS = ["decord", "pyav"]


# ---- which frames -------------------------------------------------------------------------------

def test_count_mode_uniform_and_random_offset():
    assert sample_indices(100, 25, mode="count", num_frames=4).tolist() == [12, 37, 62, 87]
    assert sample_indices(100, 25, mode="count", num_frames=4, start_frame=20, end_frame=60).tolist() == [25, 35, 45, 55]
    seen = set()
    for s in range(20):
        idx = sample_indices(100, 25, mode="count", num_frames=4, rng=np.random.default_rng(s))
        assert all(25 * k <= i < 25 * (k + 1) for k, i in enumerate(idx))  # one frame in each segment
        seen.add(tuple(idx))
    assert len(seen) > 5
    assert sample_indices(3, 25, mode="count", num_frames=8).tolist() == [0, 1, 2]  # short: all it has
    assert sample_indices(10, 25, mode="count", num_frames=4, start_frame=12).size == 0


def test_fps_and_stride_modes():
    assert sample_indices(100, 30, mode="fps", target_fps=10, num_frames=4).tolist() == [0, 3, 6, 9]
    assert sample_indices(10, 30, mode="fps", target_fps=10, num_frames=None).tolist() == [0, 3, 6, 9]
    assert sample_indices(20, 25, mode="stride", stride=4, num_frames=None).tolist() == [0, 4, 8, 12, 16]
    idx = sample_indices(20, 25, mode="stride", stride=4, num_frames=3, rng=np.random.default_rng(0))
    assert np.diff(idx).tolist() == [4, 4] and 0 <= idx[0] <= 11
    for bad in [dict(mode="fps"), dict(mode="stride", stride=0), dict(mode="count", num_frames=0), dict(mode="x")]:
        with pytest.raises(ValueError):
            sample_indices(10, 25, **bad)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), k=st.integers(1, 64), a=st.integers(0, 100), seed=st.integers(0, 9))
def test_indices_stay_in_window_and_sorted(n, k, a, seed):
    for mode in ("count", "fps", "stride"):
        idx = sample_indices(n, 25.0, mode=mode, num_frames=k, target_fps=7.0, stride=3, start_frame=a,
                             rng=np.random.default_rng(seed))
        assert len(idx) <= k and (idx >= a).all() and (idx < n).all() and (np.diff(idx) >= 0).all()


# ---- exact frames -------------------------------------------------------------------------------

def _clip(manifest, k=0):
    rec = json.loads(manifest.read_text().splitlines()[k])
    return manifest.parent / rec["video"], rec


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_frame_indices(synth_manifest, spec, backend):
    path, _ = _clip(synth_manifest, 1)
    rng = np.random.default_rng(0)
    for idx in [np.arange(spec.frames), rng.integers(0, spec.frames, 10), np.array([23, 0, 11, 11, 5])]:
        frames, times = read_frames(path, idx, backend=backend)
        assert frames.shape == (len(idx), *spec.size, 3) and frames.dtype == np.uint8
        assert [synth.decode_frame_index(f) for f in frames] == idx.tolist()
        np.testing.assert_allclose(times, idx / spec.fps, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_content_matches_rendered_frames(synth_manifest, synth_records, spec, backend):
    path, rec = _clip(synth_manifest, 2)
    plan = synth.plan_clip(np.random.default_rng([3, 0, 2]), spec.frames, spec.fps)
    assert plan.caption == rec["caption"]  # the plan is reproducible from the seed
    truth = synth.render_frames(plan, spec.size)
    frames, _ = read_frames(path, np.arange(spec.frames), backend=backend)
    err = np.abs(frames.astype(np.int16) - truth.astype(np.int16))
    # H.264 at crf 18 with 4:2:0 chroma: small mean error, bounded except at colour edges
    assert err.mean() < 3.0 and np.percentile(err, 99) < 60


def test_backends_agree(synth_manifest, spec):
    path, _ = _clip(synth_manifest, 0)
    idx = np.array([0, 3, 9, 17, 23])
    a, ta = read_frames(path, idx, backend="decord", size=(32, 32))
    b, tb = read_frames(path, idx, backend="pyav", size=(32, 32))
    assert a.shape == b.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(ta, tb)
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 3.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_side_resize_keeps_aspect(rect_manifest, backend):
    path, _ = _clip(rect_manifest, 0)
    r = open_video(path, backend)
    assert (r.height, r.width, r.num_frames, r.fps) == (48, 80, 40, 10.0)
    size = short_side_size((r.height, r.width), 24)
    assert size == (24, 40)
    frames, _ = r.read(np.arange(0, 40, 7), size=size)
    assert frames.shape == (6, 24, 40, 3)
    assert [synth.decode_frame_index(f) for f in frames] == list(range(0, 40, 7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_clip_chunked_every_frame(long_manifest, backend):
    path, rec = _clip(long_manifest)
    r = open_video(path, backend)
    assert r.num_frames == rec["frames"]
    idx = sample_indices(r.num_frames, r.fps, mode="stride", stride=1, num_frames=None)
    frames, times = r.read(idx, size=(32, 32), chunk=50)
    assert frames.shape == (rec["frames"], 32, 32, 3)
    assert [synth.decode_frame_index(f) for f in frames[::37]] == idx[::37].tolist()
    ev = rec["events"][0]
    colour = np.array(synth.COLOURS[ev["colour"]], np.float32)
    lit = (np.abs(frames[:, 8:].astype(np.float32) - colour).max(-1) < 40).sum((1, 2)) > 4
    assert np.flatnonzero(lit).tolist() == list(range(ev["start_frame"], ev["end_frame"]))  # the needle


def test_resize_frames_identity_and_values():
    x = np.full((2, 10, 20, 3), 77, np.uint8)
    assert resize_frames(x, None) is x and resize_frames(x, (10, 20)) is x
    y = resize_frames(x, (5, 7))
    assert y.shape == (2, 5, 7, 3) and (y == 77).all()


# ---- failures at the decoder --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_open_errors_have_reasons(tmp_path, synth_manifest, backend):
    path, _ = _clip(synth_manifest)
    data = path.read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.mp4").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    (tmp_path / "dir.mp4").mkdir()
    cases = {"nope.mp4": "missing", "empty.mp4": "empty", "trunc.mp4": "truncated", "junk.mp4": "corrupt",
             "dir.mp4": "unreadable"}
    for name, reason in cases.items():
        with pytest.raises(MediaError) as err:
            read_frames(tmp_path / name, [0, 20], backend=backend)
        assert err.value.reason == reason and name in str(err.value), (name, str(err.value))


def test_timeout_abandons_a_hanging_decode(tmp_path):
    fifo = tmp_path / "hang.mp4"
    os.mkfifo(fifo)  # opening a pipe with no writer blocks inside FFmpeg: a real hang
    t = time.monotonic()
    with pytest.raises(MediaError) as err:
        call_with_timeout(lambda: read_frames(fifo, [0]), 0.5, fifo)
    assert err.value.reason == "timeout" and "hang.mp4" in str(err.value)
    assert time.monotonic() - t < 5
    release_hung_decodes(fifo)


def test_timeout_passes_results_and_errors():
    assert call_with_timeout(lambda: 5, 1.0) == 5
    assert call_with_timeout(lambda: 6, None) == 6
    with pytest.raises(KeyError):
        call_with_timeout(lambda: {}["x"], 1.0)
    ev = threading.Event()
    with pytest.raises(MediaError, match="did not finish in 0.1 s"):
        call_with_timeout(lambda: ev.wait(10), 0.1, "p.mp4")
    ev.set()
