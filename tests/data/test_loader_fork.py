"""Loader workers forked after the main process used PyAV: they must not inherit its scaler.

PyAV 19 keeps one FFmpeg scaler (SwsContext) per thread, with one slice thread per CPU. A
worker forked from a main thread that had converted a PyAV frame inherited that scaler without
its threads and waited forever in its first ``to_ndarray(width=..., height=...)``
(``sws_scale_frame`` -> ``avpriv_slicethread_execute`` -> ``pthread_cond_wait``): the 16-core
data benchmark hung on its first PyAV row with workers, after the main process had timed PyAV
on one core. ``_worker_init`` now sets the inherited scaler aside.

Each test runs its loader in a child process with a deadline, so a regression fails in
seconds instead of hanging the suite (a hung worker never returns to Python).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmsparse.data import synth

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 90.0


def _run(script: str, *args: str) -> str:
    """Run ``script`` in a fresh interpreter (own process group, killed whole at the deadline)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the loader's workers too
        out, _ = proc.communicate()
        pytest.fail(f"the loader hung (killed after {DEADLINE:g} s):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def clips_256(tmp_path_factory) -> Path:
    """Two 256 x 256 clips: big enough that FFmpeg scales them in several slices."""
    return synth.make_dataset(tmp_path_factory.mktemp("fork"), clips=2, frames=12, seed=1, size=(256, 256), fps=8,
                              images=0, audio=False)


# The mechanism, with the hang made real on any PyAV: the main thread holds a scaler that has
# slice threads (threads=2, whatever the CPU count), stored where PyAV 19 keeps its per-thread
# scaler; each sample then converts a frame the way PyAV 19's VideoFrame.reformat does (the
# thread's cached scaler, else a new one). A worker that inherited the scaler hangs.
MECHANISM = """
    import sys, threading
    import av, av.video.frame as F
    from av.video.reformatter import VideoReformatter
    from mmsparse.data import DataConfig, MediaDataset, make_loader

    if not hasattr(F, "_thread_local"):  # PyAV < 19: give it PyAV 19's per-thread cache
        F._thread_local = threading.local()
    FRAME = av.VideoFrame(256, 256, "yuv420p")

    def convert():
        scaler = getattr(F._thread_local, "reformatter", None)
        if scaler is None:
            scaler = F._thread_local.reformatter = VideoReformatter()
        return scaler.reformat(FRAME, width=128, height=128, format="rgb24", threads=2)

    class Converting(MediaDataset):
        def __getitem__(self, index):
            convert()
            return super().__getitem__(index)

    convert()  # the main thread now holds a scaler with live slice threads
    cfg = DataConfig(num_frames=4, load_audio=False, decode_timeout=None)
    ds = Converting(sys.argv[1], cfg)
    ids = [i for b in make_loader(ds, batch_size=1, num_workers=2) for i in b["id"]]
    print("ids", sorted(ids))
"""


def test_workers_set_the_inherited_scaler_aside(clips_256):
    out = _run(MECHANISM, str(clips_256))
    assert "ids ['clip-0000', 'clip-0001']" in out, out


# The benchmark's case with the real decoder: PyAV decodes and resizes in the main process
# (inline, no decode timeout), then workers decode the same way. Hung on PyAV 19 before the fix;
# on older PyAV (a scaler per frame) it passes either way.
REAL = """
    import sys
    import numpy as np
    from mmsparse.data import DataConfig, MediaDataset, make_loader

    cfg = DataConfig(backend="pyav", video_fallback=None, audio_backend="pyav", num_frames=4, short_side=112,
                     load_audio=False, decode_timeout=None)
    ds = MediaDataset(sys.argv[1], cfg)
    main = ds[0]["video"]  # in the main thread: PyAV 19 caches its scaler here
    batches = list(make_loader(ds, batch_size=1, num_workers=2))
    assert len(batches) == 2 and all(b["video"].shape[-2:] == (112, 112) for b in batches)
    assert np.array_equal(batches[0]["video"][0].numpy(), main.numpy())
    print("ok", len(batches))
"""


def test_pyav_workers_after_pyav_in_the_main_process(clips_256):
    assert "ok 2" in _run(REAL, str(clips_256))


def test_fresh_pyav_scaler_is_a_no_op_without_a_cached_scaler(monkeypatch):
    import threading

    import av.video.frame as F

    from mmsparse.data import loader

    local = threading.local()
    monkeypatch.setattr(F, "_thread_local", local, raising=False)
    assert not loader._fresh_pyav_scaler()  # nothing cached in this thread
    marker = object()
    local.reformatter = marker
    kept = len(loader._INHERITED_SCALERS)
    assert loader._fresh_pyav_scaler()
    assert local.reformatter is None and loader._INHERITED_SCALERS[kept:] == [marker]  # kept alive, not freed
    del loader._INHERITED_SCALERS[kept:]
