"""Data-loading benchmark (docs/benchmarks.md E3): clips/s and peak memory, PyAV (the default
decoder, ``DataConfig.backend``) beside decord, float32 vs uint8 pixels.

What it measures, the backends of ``--backends`` side by side (default: PyAV and decord), each with float32 pixels (converted and
normalised in the loader) and uint8 pixels (``DataConfig.pixel_dtype``: normalised by the model
on its device):

1. **Stages on one core** (main process, one torch thread, like a loader worker): ms per clip
   to decode 64 frames at short side 224, to produce a whole sample (decode + crop, + float32
   normalise for float32), and to collate a batch. Their sum bounds what one worker can feed.
   With a GPU, also the ms per clip to move a collated batch to it (and, uint8, normalise it
   there, which the model does).
2. **Loader throughput** for each worker count (default 0, 2, 8, 16): 64-frame 224 x 224
   clips per second out of ``make_loader`` from synthetic 256 x 340 H.264 clips of 128
   frames. Each row is timed from the moment every worker has delivered its first batch (so
   worker start-up is not timed) for ``--seconds`` and at least 3 whole rounds of batches, over
   a manifest that repeats the generated files.
3. **Peak resident memory** of a fresh process decoding a 4,096-frame clip two ways: 64 frames
   spread over it at 224 px, and every frame at 112 px in chunks of 64.

Target (issue 4): on a 16-core machine 8 workers feed >= 200 clips/s.

    python bench/data.py                          # 0, 2, 8, 16 workers (expected 4 to 6 min on 16 cores)
    python bench/data.py --workers 0 2 --quick    # a 2-core machine
    python bench/data.py --dtypes uint8           # one pixel dtype only

The media is generated first, in parallel processes, into a temporary folder (``--data`` keeps
it). Prints tables and writes ``bench/results/data-<tag>-<date>[-<label>].json`` (``--out``
elsewhere; a name taken already gets ``-2``, ``-3``: bench/common.py); the tag names the GPU (or
``cpu``) and the CPU count, the JSON the CPU model, cores, memory and /dev/shm size, and under
``environment`` the versions and git commit. The JSON is rewritten after every row, with
``"complete": false`` until the end, so a run cut short keeps what it measured. A row that
fails (a worker killed, /dev/shm full) is recorded with its error and the run goes on; so is a
throughput row that hangs: past ``--row-limit`` (default 60 s + 5 s a worker + 10 x
``--seconds``), or that long without a batch, it is abandoned and its error row says what it
saw (``"seen"``: batches, phase, loads begun, the sample each worker was decoding). Shutting a
hung row's workers down costs up to 5 s a worker more (torch joins each before killing it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, out_folder, result_stem, slug  # noqa: E402

# imported in main after the check, so a missing wheel is named instead of a traceback
REQUIRED = {"numpy": "numpy<2.4", "torch": "torch==2.11.0", "torchvision": "torchvision==0.26.0",
            "decord": "decord==0.6.0", "av": "av (PyAV)"}
BACKENDS = ("pyav", "decord")  # the library's default first
DTYPES = ("float32", "uint8")  # DataConfig.pixel_dtype
CLIP_FRAMES, OUT = 64, 224
TARGET = (8, 200.0)  # (workers, clips/s) of issue 4
MIN_ROUNDS = 3       # timed rounds of batches (one from each worker) at least, whatever --seconds says
# A row is abandoned (recorded as an error with what it saw; the run goes on) once it has run
# past its limit, or no batch has come for that long: STARTUP_S + STARTUP_PER_WORKER_S a worker
# (forks, imports, first decodes on a loaded host) + LIMIT_FACTOR times --seconds.
LIMIT_FACTOR, STARTUP_S, STARTUP_PER_WORKER_S = 10, 60.0, 5.0


def default_backend() -> str:
    """The video decoder a DataConfig uses unless told otherwise."""
    from mmsparse.data import DataConfig

    return DataConfig().backend


def row_limit(workers: int, seconds: float) -> float:
    """Seconds after which a throughput row is given up as hung (see LIMIT_FACTOR)."""
    return STARTUP_S + STARTUP_PER_WORKER_S * workers + LIMIT_FACTOR * seconds


class RowHung(Exception):
    """A throughput row ran past its limit; ``seen`` is what it had measured by then."""

    def __init__(self, msg: str, seen: dict):
        super().__init__(msg)
        self.seen = seen


# --------------------------------------------------------------------------------------------
# the machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict:
    """CPU model, logical / usable / physical cores, cgroup CPU limit, memory, /dev/shm."""
    info = _read("/proc/cpuinfo")
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    cores, phys, core = set(), None, None
    for ln in info.splitlines():
        if ln.startswith("physical id"):
            phys = ln.split(":")[1].strip()
        elif ln.startswith("core id"):
            core = ln.split(":")[1].strip()
            cores.add((phys, core))
    mem = re.search(r"MemTotal:\s+(\d+)", _read("/proc/meminfo"))
    from mmsparse.data.dataset import cgroup_cpu_limit, usable_cpus

    limit = cgroup_cpu_limit(_read("/sys/fs/cgroup/cpu.max"))
    out = {"hostname": platform.node(), "cpu_model": model, "cpus_logical": os.cpu_count(),
           "cpus_usable": usable_cpus(),  # affinity mask capped by the cgroup quota, as the loader counts
           "cores_physical": len(cores) or None,
           "cgroup_cpu_limit": round(limit, 2) if limit else None,
           "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
           "platform": platform.platform(), "python": platform.python_version(),
           # a shared machine's other work slows every row alike; 1, 5 and 15 minute averages
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    try:
        shm = shutil.disk_usage("/dev/shm")
        out["dev_shm_gib"] = {"total": round(shm.total / 2**30, 1), "free": round(shm.free / 2**30, 1)}
    except OSError:
        out["dev_shm_gib"] = None
    return out


def gpu_name() -> str | None:
    """The first GPU's name. CUDA is initialised before the loaders fork, as in any training run;
    the workers never touch it."""
    import torch

    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a driver that fails to initialise names no GPU
        return None


def host_tag(gpu: str | None, cpus: int) -> str:
    return f"{slug(gpu or 'cpu')}-{cpus}cpu"


# --------------------------------------------------------------------------------------------
# media


def generate(work: Path, clips: int, src_frames: int, samples: int, long_frames: int,
             processes: int) -> tuple[Path, Path, dict]:
    """Synthetic clips (256 x 340, 25 fps, no audio), a manifest repeating them ``samples``
    times over, and one long 224 x 224 clip. Returns (manifest, long clip, seconds taken)."""
    from mmsparse.data import synth, write_manifest

    t = time.perf_counter()
    short = synth.make_dataset(work / "clips", clips=clips, frames=src_frames, seed=0, size=(256, 340), fps=25,
                               images=0, audio=False, processes=processes)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    long_man = synth.make_dataset(work / "long", clips=1, seed=0, size=(224, 224), fps=25, long=True,
                                  long_frames=(long_frames, long_frames), audio=False)
    long_s = time.perf_counter() - t
    recs = [json.loads(ln) for ln in short.read_text().splitlines()]
    rep = [{"id": f"s{k:05d}", "video": str(short.parent / recs[k % len(recs)]["video"]),
            "caption": recs[k % len(recs)]["caption"]} for k in range(samples)]
    manifest = write_manifest(work / "repeated.jsonl", rep)
    return manifest, long_man.parent / "videos" / "long-0000.mp4", {"clips_s": round(gen_s, 1),
                                                                    "long_clip_s": round(long_s, 1)}


def _config(backend: str, dtype: str, threads: int = 1):
    from mmsparse.data import DataConfig

    return DataConfig(backend=backend, video_fallback=None, num_frames=CLIP_FRAMES, short_side=OUT,
                      crop=(OUT, OUT), load_audio=False, decode_timeout=None, pixel_dtype=dtype,
                      decode_threads=threads)


def _to_device_ms(batch: dict, repeats: int = 5) -> float | None:
    """ms per clip to move the batch's video to the GPU as the training loop does, plus (uint8)
    the model's normalisation there; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from mmsparse.encoders import normalize_pixels

    video, mask = batch["video"], batch["video_mask"]

    def once():
        x = video.to("cuda", non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize_pixels(x, batch["pixel_norm"], mask.to("cuda", non_blocking=True))
        return x

    once()  # warm: allocator, kernels
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        once()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / (repeats * video.shape[0])


# --------------------------------------------------------------------------------------------
# measurements


def stages(manifest: Path, backend: str, dtype: str, clips: int, batch_size: int) -> dict:
    """ms per clip of decode alone, a whole sample, and collate, on one core in this process;
    MB a clip in the batch; ms per clip to the GPU (when there is one)."""
    import torch

    from mmsparse.data import MediaDataset, collate
    from mmsparse.data.decode import open_video, sample_indices, short_side_size

    ds = MediaDataset(manifest, _config(backend, dtype))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds[0]  # warm: library loads, first allocations
        decode = sample = 0.0
        items = []
        for i in range(clips):  # interleaved, so a change in the machine's load hits both alike
            t = time.perf_counter()
            r = open_video(ds.samples[i].video, backend)
            idx = sample_indices(r.num_frames, r.fps, mode="count", num_frames=CLIP_FRAMES)
            r.read(idx, size=short_side_size((r.height, r.width), OUT))
            t1 = time.perf_counter()
            items.append(ds[i])
            decode, sample = decode + (t1 - t) / clips, sample + (time.perf_counter() - t1) / clips
        t = time.perf_counter()
        for a in range(0, clips, batch_size):
            batch = collate(items[a:a + batch_size])
        coll = (time.perf_counter() - t) / clips
    finally:
        torch.set_num_threads(threads)
    per = sample + coll
    video = batch["video"]
    assert video.dtype == getattr(torch, dtype), video.dtype
    dev = _to_device_ms(batch)
    return {"backend": backend, "dtype": dtype, "clips": clips, "decode_ms": round(1e3 * decode, 1),
            "sample_ms": round(1e3 * sample, 1), "transform_ms": round(1e3 * (sample - decode), 1),
            "collate_ms": round(1e3 * coll, 1), "one_core_clips_per_s": round(1 / per, 2),
            "clip_mb": round(video[0].numel() * video.element_size() / 2**20, 2),
            **({"to_device_ms": round(dev, 2)} if dev is not None else {})}


def throughput(manifest: Path, backend: str, dtype: str, workers: int, batch_size: int, seconds: float,
               limit: float | None = None, threads: int = 1) -> dict:
    """Clips/s out of the loader, timed from the moment every worker has delivered a batch.

    Workers that start together deliver in rounds (one batch each, in order); the clock stops
    at the end of a whole round once ``seconds`` and at least ``MIN_ROUNDS`` rounds have passed:
    work that a worker began before the clock started is then at most a small part of the count.

    ``limit`` (default ``row_limit``): past it since the start, or that long without a batch
    (the loader's per-batch timeout, with workers), the row is abandoned with RowHung, whose
    ``seen`` says how far it got and which sample each worker was decoding. With 0 workers
    only the first applies, between batches: a decode stuck in C in this process cannot be cut.
    """
    import torch

    from mmsparse.data import MediaDataset, make_loader

    limit = row_limit(workers, seconds) if limit is None else limit
    ds = MediaDataset(manifest, _config(backend, dtype, threads))
    loader = make_loader(ds, batch_size=batch_size, num_workers=workers, prefetch_factor=2 if workers else None,
                         timeout=limit if workers else 0)
    rnd = max(1, workers)  # batches a round; the first round is not timed (worker start-up)
    n = clips = 0
    t_start = t_last = time.perf_counter()
    t0 = t1 = None

    def seen(why: str) -> RowHung:
        now = time.perf_counter()
        busy = [{"worker": w, "pid": pid, "sample": i, "path": str(ds.samples[i].primary_path),
                 "crash_level": lv}
                for w, pid, i, lv in ds.crashes.busy()]
        info = {"limit_s": round(limit, 1), "elapsed_s": round(now - t_start, 1),
                "since_last_batch_s": round(now - t_last, 1), "batches": n,
                "phase": "start-up (first round)" if t0 is None else "timed",
                "timed_clips": clips, "timed_s": round(t1 - t0, 2) if t1 is not None else None,
                "loads_begun": ds.stats.attempts, "failures": ds.stats.counts, "decoding_when_abandoned": busy}
        return RowHung(f"row abandoned after {info['elapsed_s']:g} s (limit {limit:g} s): {why}; {n} batches "
                       f"came, {len(busy)} workers mid-decode", info)

    it = iter(loader)
    hung = None
    try:
        for batch in it:
            n += 1
            t_last = time.perf_counter()
            if t_last - t_start > limit:
                hung = "still running at its limit"
                break
            if n < rnd:
                continue
            if n == rnd:
                t0 = time.perf_counter()
                continue
            assert batch["video"].shape[1:] == (CLIP_FRAMES, 3, OUT, OUT)
            assert batch["video"].dtype == getattr(torch, dtype)
            clips += batch["video"].shape[0]
            t1 = time.perf_counter()
            if t1 - t0 >= seconds and (n - rnd) % rnd == 0 and n - rnd >= MIN_ROUNDS * rnd:
                break
    except RuntimeError as err:  # the loader's per-batch timeout; its workers are shut down by now
        if "timed out" not in str(err):
            raise
        hung = f"no batch for {limit:g} s ({str(err).splitlines()[0]})"
    finally:
        del it  # shuts the workers down (a hung one after torch's 5 s join, by SIGTERM)
    if hung:
        raise seen(hung)
    if not clips:
        raise RuntimeError(f"the manifest ran out before the clock started ({len(ds)} samples); raise --samples")
    dt_s = t1 - t0
    return {"backend": backend, "dtype": dtype, "workers": workers, "decode_threads": ds.decode_threads,
            "clips": clips, "seconds": round(dt_s, 2),
            "startup_s": round(t0 - t_start, 2), "rounds": (n - rnd) // rnd, "clips_per_s": round(clips / dt_s, 2),
            "frames_per_s": round(CLIP_FRAMES * clips / dt_s, 1), "manifest_exhausted": n * batch_size >= len(ds)}


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


def long_clip_memory(path: Path, cases: list[tuple[str, str]], parallel: int) -> list[dict]:
    """One fresh process per (backend, mode), ``parallel`` at a time (each peak is its own)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case):
        backend, how = case
        try:
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), backend, how],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode:
                err = out.stderr.strip().splitlines()
                raise RuntimeError(err[-1] if err else f"exit {out.returncode}")
            return json.loads(out.stdout.strip().splitlines()[-1])
        except Exception as err:
            msg = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            print(f"  ! backend={backend} mode={how}: {msg}", flush=True)
            return {"backend": backend, "mode": how, "error": msg}

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(one, cases))


def result_path(out: Path, tag: str, day: str, label: str = "") -> Path:
    """``data-<tag>-<day>[-<label>].json``, or that with ``-2``, ``-3``, ... when it exists (a
    rerun keeps the first); the file is created here, empty, so the name is this run's."""
    return Path(f"{result_stem(out, 'data', tag, label, day)}.json")


def _guarded(fn, *args, **what) -> dict:
    """A row of results, or the row's error (the other rows still run); a hung row's error
    comes with what it saw (``RowHung.seen``) under ``"seen"``."""
    try:
        return fn(*args)
    except Exception as err:  # a killed worker, /dev/shm full, a decoder missing on this host, a hang
        msg = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        print(f"  ! {what}: {msg}", flush=True)
        return {**what, "error": msg, **({"seen": err.seen} if isinstance(err, RowHung) else {})}


# --------------------------------------------------------------------------------------------
# report


def _fmt(row: dict | None, key: str, width: int = 8) -> str:
    if row is None or key not in row:
        return f"{'error' if row else '-':>{width}}"
    return f"{row[key]:>{width}.2f}"


def print_tables(res: dict) -> None:
    s = res["settings"]
    m = res["machine"]
    print(f"\n{m['cpu_model']}: {m['cpus_usable']} usable CPUs ({m['cores_physical']} physical cores), "
          f"/dev/shm {m['dev_shm_gib']} GiB")
    dtypes = s["dtypes"]
    print(f"\none core, ms per 64 x 224 x 224 clip ({s['stage_clips']} clips, batch {s['batch_size']}); "
          f"to GPU: the batch's move (+ uint8: normalise there)")
    print(f"{'backend':>8} | {'pixels':>7} | {'decode':>8} | {'+ crop (float)':>14} | {'collate':>8} | "
          f"{'clips/s one core':>16} | {'MB a clip':>9} | {'to GPU':>6}")
    for r in res["stages"]:
        if "error" in r:
            print(f"{r['backend']:>8} | {r.get('dtype', '-'):>7} | error: {r['error']}")
            continue
        gpu = f"{r['to_device_ms']:>6.2f}" if "to_device_ms" in r else f"{'-':>6}"
        print(f"{r['backend']:>8} | {r['dtype']:>7} | {r['decode_ms']:>8.1f} | {r['transform_ms']:>14.1f} | "
              f"{r['collate_ms']:>8.1f} | {r['one_core_clips_per_s']:>16.2f} | {r['clip_mb']:>9.2f} | {gpu}")

    def row(w, b, d):
        return next((r for r in res["throughput"] if r["workers"] == w and r["backend"] == b
                     and r.get("dtype") == d), None)

    def ratio(x, y):
        ok = x and y and "clips_per_s" in x and "clips_per_s" in y
        return f"{x['clips_per_s'] / y['clips_per_s']:.2f}x" if ok else "-"

    backends = s.get("backends", BACKENDS)
    cols = [(b, d) for b in backends for d in dtypes]
    print(f"\nloader clips/s, 64 x 224 x 224 clips from 256 x 340 H.264 "
          f"({s['seconds']:g} s a row after warm-up, batch {s['batch_size']}, decode threads per reader "
          f"{s.get('decode_threads') or 'auto'})")
    both = len(dtypes) == 2
    print(f"{'workers':>8} | " + " | ".join(f"{b + ' ' + d:>14}" for b, d in cols)
          + (" | " + " | ".join(f"{b + ' u8/f32':>13}" for b in backends) if both else "")
          + f" | decord/pyav {dtypes[-1]}")
    for w in s["workers"]:
        line = f"{w:>8} | " + " | ".join(_fmt(row(w, b, d), "clips_per_s", 14) for b, d in cols)
        if both:
            line += " | " + " | ".join(f"{ratio(row(w, b, 'uint8'), row(w, b, 'float32')):>13}" for b in backends)
        print(line + f" | {ratio(row(w, 'decord', dtypes[-1]), row(w, 'pyav', dtypes[-1]))}")
    w, goal = TARGET
    for b, d in cols:
        r = row(w, b, d)
        if r and "clips_per_s" in r:
            mark = " (default)" if b == s.get("default_backend") else ""
            print(f"target {w} workers >= {goal:g} clips/s, {b}{mark} {d}: {r['clips_per_s']:.1f} "
                  f"({'met' if r['clips_per_s'] >= goal else 'not met'})")
    print(f"\npeak RSS, {s['long_frames']}-frame 224 x 224 clip, fresh process")
    print(f"{'backend':>8} | {'mode':>10} | {'output MB':>9} | {'RSS before':>10} | {'peak RSS MB':>11} | s")
    for r in res["long_clip_memory"]:
        if "error" in r:
            print(f"{r['backend']:>8} | {r['mode']:>10} | error: {r['error']}")
            continue
        print(f"{r['backend']:>8} | {r['mode']:>10} | {r['output_mb']:>9} | {r['rss_before_mb']:>10} | "
              f"{r['peak_rss_mb']:>11} | {r['seconds']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8, 16])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                    help="video decoders measured side by side (DataConfig.backend; the default first)")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                    help="pixel dtypes measured side by side (DataConfig.pixel_dtype)")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per (backend, workers) row (10)")
    ap.add_argument("--clips", type=int, default=None, help="distinct generated clips (64)")
    ap.add_argument("--samples", type=int, default=8192, help="manifest length (the clips repeated)")
    ap.add_argument("--src-frames", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="codec threads per video reader in the loader rows (DataConfig.decode_threads, "
                         "default 1 like the config's; 0: auto); "
                         "auto gives W workers on C cores C // W (at most 4), the cores they leave idle; "
                         "the one-core stage timings always decode with one")
    ap.add_argument("--row-limit", type=float, default=None,
                    help=f"seconds after which a throughput row is abandoned as hung, or after which one "
                         f"without a new batch is (default: {STARTUP_S:g} + {STARTUP_PER_WORKER_S:g} a worker "
                         f"+ {LIMIT_FACTOR} x --seconds)")
    ap.add_argument("--stage-clips", type=int, default=8, help="clips timed per backend on one core")
    ap.add_argument("--long-frames", type=int, default=4096)
    ap.add_argument("--gen-procs", type=int, default=0, help="processes generating the media (0: all CPUs)")
    ap.add_argument("--quick", action="store_true",
                    help="16 clips, 6 s a row unless given (the long clip keeps its frames)")
    ap.add_argument("--tag", default=None, help="result file tag (default: GPU or 'cpu', and the CPU count)")
    ap.add_argument("--label", default="", help="the result name's label: data-<tag>-<date>-<label>")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    ap.add_argument("--data", default=None, help="folder for the generated media, kept (default: a temp folder)")
    ap.add_argument("--rss-child", nargs=3, metavar=("PATH", "BACKEND", "HOW"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        out = out_folder(a.out)
    except ValueError as err:
        ap.error(str(err))
    if a.decode_threads < 0:
        ap.error(f"--decode-threads must be 0 (auto) or at least 1, got {a.decode_threads}")
    if a.rss_child:
        rss_child(*a.rss_child)
        return 0
    a.clips = a.clips or (16 if a.quick else 64)
    a.seconds = a.seconds if a.seconds is not None else (6.0 if a.quick else 10.0)

    versions, missing = {}, []
    for mod, wheel in REQUIRED.items():
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError as err:
            missing.append(f"{wheel} ({err})")
    if missing:
        print("error: not importable here: " + "; ".join(missing) + ". Install their wheels.", file=sys.stderr)
        return 2
    import torch

    info = machine()
    cpus = info["cpus_usable"]
    if info["cgroup_cpu_limit"]:  # a container may see more CPUs than it may use
        cpus = max(1, min(cpus, int(info["cgroup_cpu_limit"] + 0.5)))
    procs = a.gen_procs or cpus
    info["gpu"] = gpu_name()
    tag = a.tag or host_tag(info["gpu"], cpus)
    env = environment()
    try:
        path = result_path(out, tag, env["date"], a.label)
    except ValueError as err:  # a --tag or --label that cannot be part of a file name
        ap.error(str(err))
    res = {
        "benchmark": "data loading (E3)", "date": dt.datetime.now().isoformat(timespec="seconds"), "tag": tag,
        "complete": False, "machine": info, "versions": versions, "environment": env,
        "settings": {"workers": a.workers, "backends": a.backends, "default_backend": default_backend(),
                     "seconds": a.seconds, "min_rounds": MIN_ROUNDS, "clips": a.clips,
                     "samples": a.samples, "src_frames": a.src_frames, "src_size": [256, 340], "src_fps": 25,
                     "clip_frames": CLIP_FRAMES, "out_size": [OUT, OUT], "dtypes": a.dtypes,
                     "batch_size": a.batch_size, "prefetch_factor": 2, "audio": False, "decode_threads": a.decode_threads,
                     "torch_threads_main": torch.get_num_threads(), "stage_clips": min(a.stage_clips, a.clips),
                     "long_frames": a.long_frames, "quick": a.quick, "generate_processes": procs,
                     "row_limit_s": a.row_limit if a.row_limit else {
                         "startup_s": STARTUP_S, "per_worker_s": STARTUP_PER_WORKER_S, "seconds_factor": LIMIT_FACTOR}},
        "target": {"workers": TARGET[0], "clips_per_s": TARGET[1]},
        "stages": [], "throughput": [], "long_clip_memory": [],
    }

    def save():  # after every row: a run cut short still leaves what it measured
        path.write_text(json.dumps(res, indent=2) + "\n")

    print(f"{info['cpu_model']}, {cpus} usable CPUs, GPU {info['gpu']}; workers {a.workers}, "
          f"{a.seconds:g} s a row; writing {path}", flush=True)
    if max(a.workers) > cpus:
        print(f"  note: {max(a.workers)} workers on {cpus} CPUs share cores; those rows measure oversubscription")

    t_all = time.perf_counter()
    tmp = None if a.data else tempfile.mkdtemp(prefix="mmsparse-bench-")
    work = Path(a.data or tmp)
    try:
        manifest, long_path, gen = generate(work, a.clips, a.src_frames, a.samples, a.long_frames, procs)
        res["settings"]["generate_seconds"] = gen
        save()
        print(f"generated {a.clips} clips in {gen['clips_s']} s ({procs} processes), the "
              f"{a.long_frames}-frame clip in {gen['long_clip_s']} s", flush=True)
        for b in a.backends:
            for d in a.dtypes:
                r = _guarded(stages, manifest, b, d, min(a.stage_clips, a.clips), a.batch_size, backend=b, dtype=d)
                res["stages"].append(r)
                save()
                if "error" not in r:
                    print(f"  one core {b:6s} {d:7s}: decode {r['decode_ms']} ms, sample {r['sample_ms']} ms, "
                          f"collate {r['collate_ms']} ms a clip", flush=True)
        for w in a.workers:
            for b in a.backends:
                for d in a.dtypes:  # side by side, so a change in the machine's load hits both alike
                    r = _guarded(throughput, manifest, b, d, w, a.batch_size, a.seconds, a.row_limit or None,
                                 a.decode_threads, backend=b, dtype=d, workers=w)
                    res["throughput"].append(r)
                    save()
                    if "error" not in r:
                        print(f"  {b:6s} {d:7s} workers={w:2d} threads={r['decode_threads']}: {r['clips_per_s']:7.2f} clips/s "
                              f"({r['rounds']} rounds, start-up {r['startup_s']} s)", flush=True)
        # 4 cores a child on big hosts; one at a time on small ones, so its seconds stay honest
        res["long_clip_memory"] = long_clip_memory(
            long_path, [(b, how) for b in a.backends for how in ("uniform64", "all112")], min(4, cpus // 4))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["complete"] = True
    res["settings"]["total_seconds"] = round(time.perf_counter() - t_all, 1)
    res["settings"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print_tables(res)
    print(f"\nwrote {path} ({res['settings']['total_seconds']} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
