"""Data-loading benchmark (BENCHMARKS.md E3): clips/s and peak memory, decord vs PyAV.

Measures, for each backend (decord, pyav) and each worker count (default 0, 2, 8), how many
64-frame 224x224 clips per second ``make_loader`` delivers from synthetic H.264 files (source
frames 256 x 340, resized on decode to short side 224 and centre-cropped, float32 normalised),
and the peak resident memory of a fresh process decoding a 4,096-frame clip two ways: 64 frames
spread over it at 224 px, and every frame at 112 px in chunks of 64.

    python bench/data.py                 # full settings
    python bench/data.py --quick         # fewer clips / a shorter long clip, for a 2-core machine

Prints a table and writes ``bench/results/data-<device>-<date>.json`` naming the machine, CPU
count and library versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsparse.data import DataConfig, MediaDataset, make_loader, synth  # noqa: E402


def _peak_rss_mb() -> float:
    # VmHWM is this address space's high-water mark; ru_maxrss would carry the parent's across exec
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def throughput(manifest: Path, backend: str, workers: int, batch_size: int, passes: int) -> dict:
    cfg = DataConfig(backend=backend, num_frames=64, short_side=224, crop=(224, 224), load_audio=False,
                     decode_timeout=None)
    ds = MediaDataset(manifest, cfg)
    loader = make_loader(ds, batch_size=batch_size, num_workers=workers, prefetch_factor=2 if workers else None)
    clips, t0 = 0, None
    for p in range(passes + 1):
        for batch in loader:
            if t0 is None:  # the first batch pays worker start-up; time from there
                t0 = time.perf_counter()
                continue
            assert batch["video"].shape[1:] == (64, 3, 224, 224)
            clips += batch["video"].shape[0]
    dt_s = time.perf_counter() - t0
    return {"backend": backend, "workers": workers, "clips": clips, "seconds": round(dt_s, 3),
            "clips_per_s": round(clips / dt_s, 2), "frames_per_s": round(64 * clips / dt_s, 1)}


def rss_child(path: str, backend: str, how: str) -> None:
    """Run in a fresh process: decode the long clip and print peak memory as JSON."""
    from mmsparse.data.decode import open_video, sample_indices, short_side_size

    base = _rss_mb()
    t = time.perf_counter()
    r = open_video(path, backend)
    if how == "uniform64":
        idx = sample_indices(r.num_frames, r.fps, mode="count", num_frames=64)
        frames, _ = r.read(idx, size=short_side_size((r.height, r.width), 224), chunk=64)
    else:
        idx = sample_indices(r.num_frames, r.fps, mode="stride", stride=1, num_frames=None)
        frames, _ = r.read(idx, size=short_side_size((r.height, r.width), 112), chunk=64)
    print(json.dumps({"backend": backend, "mode": how, "frames": int(len(idx)), "out_shape": list(frames.shape),
                      "output_mb": round(frames.nbytes / 2**20, 1), "rss_before_mb": round(base, 1),
                      "peak_rss_mb": round(_peak_rss_mb(), 1), "seconds": round(time.perf_counter() - t, 2)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--src-frames", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--long-frames", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="8 clips, 2 passes (the long clip keeps 4,096 frames)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--data", default=None, help="folder for the generated media (default: a temp folder)")
    ap.add_argument("--rss-child", nargs=3, metavar=("PATH", "BACKEND", "HOW"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rss_child:
        rss_child(*a.rss_child)
        return 0
    if a.quick:
        a.clips, a.passes, a.batch_size = 8, 2, 2

    import decord
    import av
    import torch

    work = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix="mmsparse-bench-"))
    t = time.perf_counter()
    manifest = synth.make_dataset(work / "clips", clips=a.clips, frames=a.src_frames, seed=0, size=(256, 340),
                                  fps=25, images=0, audio=False)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    long_man = synth.make_dataset(work / "long", clips=1, seed=0, size=(224, 224), fps=25, long=True,
                                  long_frames=(a.long_frames, a.long_frames), audio=False)
    long_gen_s = time.perf_counter() - t
    long_path = str(long_man.parent / "videos" / "long-0000.mp4")

    rows = []
    for workers in a.workers:
        for backend in ("decord", "pyav"):
            r = throughput(manifest, backend, workers, a.batch_size, a.passes)
            rows.append(r)
            print(f"  {backend:6s} workers={workers}: {r['clips_per_s']:7.2f} clips/s", flush=True)
    mem = []
    for backend in ("decord", "pyav"):
        for how in ("uniform64", "all112"):
            out = subprocess.run([sys.executable, __file__, "--rss-child", long_path, backend, how],
                                 capture_output=True, text=True, check=True)
            mem.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(f"\nclips/s, 64 x 224 x 224 float32 clips from 256 x 340 H.264 ({a.clips} clips x {a.passes} passes, "
          f"batch {a.batch_size}, {os.cpu_count()} CPUs)")
    print(f"{'workers':>8} | {'decord':>8} | {'pyav':>8} | decord/pyav")
    for w in a.workers:
        d = next(r for r in rows if r["workers"] == w and r["backend"] == "decord")["clips_per_s"]
        p = next(r for r in rows if r["workers"] == w and r["backend"] == "pyav")["clips_per_s"]
        print(f"{w:>8} | {d:>8.2f} | {p:>8.2f} | {d / p:.2f}x")
    print(f"\npeak RSS, {a.long_frames}-frame 224 x 224 clip, fresh process")
    print(f"{'backend':>8} | {'mode':>10} | {'output MB':>9} | {'RSS before':>10} | {'peak RSS MB':>11} | s")
    for m in mem:
        print(f"{m['backend']:>8} | {m['mode']:>10} | {m['output_mb']:>9} | {m['rss_before_mb']:>10} | "
              f"{m['peak_rss_mb']:>11} | {m['seconds']}")

    device = "cpu"
    try:
        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0).replace(" ", "-").lower()
    except Exception:
        pass
    result = {
        "benchmark": "data loading (E3)", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "device": device},
        "versions": {"torch": torch.__version__, "decord": decord.__version__, "av": av.__version__,
                     "numpy": np.__version__},
        "settings": {"clips": a.clips, "src_frames": a.src_frames, "src_size": [256, 340], "clip_frames": 64,
                     "out_size": [224, 224], "batch_size": a.batch_size, "passes": a.passes, "audio": False,
                     "long_frames": a.long_frames, "quick": a.quick,
                     "generate_seconds": round(gen_s, 1), "long_generate_seconds": round(long_gen_s, 1)},
        "throughput": rows, "long_clip_memory": mem,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"data-{device}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
