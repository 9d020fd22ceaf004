"""What every benchmark script shares: timing, the environment of a run, and result file names.

- Timing: ``median_ms`` (the median of repeated calls; CUDA-event timing through
  ``triton.testing.do_bench`` on a GPU, the wall clock on the CPU), ``mean_step_ms`` (warm-up
  steps, then the mean wall-clock time of timed steps between two device synchronisations)
  and ``lower_median`` (the middle item of repeats; the lower one for an even count);
  ``synchronizer`` (what waits for a device's queued work);
  ``profile_breakdown`` (a profiled step's kernel time by category: attention, matmul, ...).
- Environment: ``environment()`` names the card, the torch / triton / CUDA / Python versions,
  the git commit the code ran at (``+dirty`` when the checkout had uncommitted changes) and the
  date, so a result file says what produced it.
- Names: every result is ``<kind>-<device>-<date>-<label>.<ext>`` (``<label>`` optional), for
  example ``attention-nvidia-h200-2026-12-04-A5.json`` with its ``.md`` and ``.png`` beside it.
  ``result_stem`` never overwrites: when any file of that stem exists already, the stem gets
  ``-2``, then ``-3`` and so on (``...-A5-2.json``), and the new JSON is created exclusively,
  so two runs started at once cannot take the same name either.

The scripts import this module as ``bench.common`` (run from the repository root, or through
``mmsparse bench``) or as ``common`` (``python bench/attention.py``: the script's folder is
on ``sys.path``).
"""

from __future__ import annotations

import datetime as dt
import platform
import re
import time
from pathlib import Path
from typing import Callable, Sequence

from mmsparse import fileio

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


# ---------------------------------------------------------------------------------------------
# timing


def median_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median milliseconds of ``fn()``. On CUDA: ``triton.testing.do_bench`` (CUDA events, the
    L2 cache flushed between calls), ``max(3, reps // 4)`` ms of warm-up and ``10 * reps`` ms of
    timed calls. Elsewhere: one warm-up call, then ``max(3, reps // 10)`` timed calls."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(3, reps // 4), rep=reps * 10, return_mode="median"))
    fn()
    times = []
    for _ in range(max(3, reps // 10)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def mean_step_ms(step: Callable[[], object], steps: int, warmup: int, device: str,
                 before_timing: Callable[[], None] | None = None) -> tuple[float, object]:
    """(mean milliseconds of one ``step()``, the last step's return value): ``warmup`` steps,
    a device synchronisation, ``before_timing()`` (e.g. resetting the peak-memory counter),
    then ``steps`` steps timed together up to the next synchronisation. Training steps are
    timed this way rather than one by one, so the host may run ahead of the GPU as it does in
    a training loop."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sync = synchronizer(device)
    for _ in range(warmup):
        step()
    sync()
    if before_timing is not None:
        before_timing()
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step()
    sync()
    return (time.perf_counter() - t0) / steps * 1e3, out


# The kernels (CUDA) or operators (CPU) of a profiled step, by what they do: the first pattern
# that matches a name (lower case) names its category; the rest is "other".
PROFILE_CATEGORIES = (
    ("attention", r"_fwd_kernel|_bwd_dq_kernel|_bwd_dkdv_kernel|_axial_|_merge_(fwd|bwd)_kernel|combine_chunks"
                  r"|mask_tiles|flash|fmha|cudnn|attention|sdpa|softmax"),
    ("qkv_rope", r"qkv_rope|rotary|rope"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("norm", r"layer_norm|rms_norm|layernorm|norm_"),
    ("copy", r"copy|cat|memcpy|memset|fill|pad|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|reduce|gelu|silu|aten::(add|mul|sub|div|exp|where|sum|mean)"),
)


def profile_breakdown(step: Callable[[], object], steps: int, device: str, top: int = 12) -> dict:
    """Where ``steps`` calls of ``step()`` spend their time, from ``torch.profiler``: on CUDA the
    kernels' own device time, elsewhere the operators' own CPU time, per step in ms, summed by
    ``PROFILE_CATEGORIES`` (``categories``, largest first), with the ``top`` kernels by time and
    the wall-clock ms per step beside their sum (``busy`` = kernel time / wall time: below 1 the
    device waits on the host). Run after warm-up; the profiler slows the host a little."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cuda = str(device).startswith("cuda")
    sync = synchronizer(device)
    sync()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU], acc_events=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps * 1e3
    kernels = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0 and (not cuda or evt.device_type == torch.autograd.DeviceType.CUDA):
            kernels[evt.key] = kernels.get(evt.key, 0.0) + us / 1e3 / steps
    cats: dict[str, float] = {}
    named = []
    for name, ms in kernels.items():
        cat = next((c for c, pat in PROFILE_CATEGORIES if re.search(pat, name.lower())), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
        named.append((ms, name, cat))
    busy = sum(kernels.values())
    return {"steps": steps, "wall_ms": wall, "kernel_ms": busy, "busy": busy / wall if wall else 0.0,
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:120], "ms": ms, "category": c} for ms, n, c in sorted(named, reverse=True)[:top]]}


def lower_median(items: Sequence, key: Callable = lambda x: x):
    """The item of median ``key``; of an even count, the lower of the two middle ones."""
    if not items:
        raise ValueError("lower_median of no items")
    return sorted(items, key=key)[(len(items) - 1) // 2]


def synchronizer(device: str) -> Callable[[], None]:
    """What waits for `device`'s queued work: torch.cuda.synchronize on CUDA, else nothing."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


# ---------------------------------------------------------------------------------------------
# environment


def version(module: str) -> str:
    """``module.__version__``, or ``"absent"`` when it does not import."""
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def device_name(device: str = "auto") -> str:
    """The card's name (``torch.cuda.get_device_name``) or ``CPU <processor> x<threads>``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"


def git_commit(root: Path = ROOT) -> str | None:
    """The checkout's HEAD commit, with ``+dirty`` when tracked files have uncommitted changes;
    None outside a git checkout (an installed copy of the scripts); ``MMSPARSE_GIT_COMMIT`` when
    set (``mmsparse.fileio.git_commit``)."""
    return fileio.git_commit(root)


def environment(device: str = "auto") -> dict:
    """What produced a result: ``device`` (the card or CPU), ``torch``, ``triton``, ``cuda``
    (torch's CUDA version, None on a CPU build), ``python``, ``git_commit``, ``date``
    (YYYY-MM-DD, UTC) and ``time`` (ISO, seconds, UTC)."""
    import torch

    now = dt.datetime.now(dt.timezone.utc)
    return {"device": device_name(device), "torch": torch.__version__, "triton": version("triton"),
            "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": git_commit(),
            "date": now.date().isoformat(), "time": now.isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------
# result names


def slug(text: str, limit: int = 40) -> str:
    """Lower case, runs of anything but letters and digits as one ``-``: ``NVIDIA H200`` ->
    ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")


def result_name(kind: str, device: str, date: str, label: str = "") -> str:
    """``<kind>-<device>-<date>[-<label>]``, each part checked: kind one lower-case word, device
    a non-empty slug, date YYYY-MM-DD, label letters, digits, ``-``, ``_`` and ``.``."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", kind):
        raise ValueError(f"kind must be one lower-case word (attention, model, data, ...), got {kind!r}")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", device):
        raise ValueError(f"device must be a slug like 'nvidia-h200' (see slug()), got {device!r}")
    if not DATE_RE.fullmatch(date):
        raise ValueError(f"date must be YYYY-MM-DD, got {date!r}")
    if label and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
        raise ValueError(f"label may hold letters, digits, '.', '_' and '-' only, got {label!r}")
    return f"{kind}-{device}-{date}" + (f"-{label}" if label else "")


def result_stem(out: Path | str, kind: str, device: str, label: str = "", date: str | None = None,
                suffixes: Sequence[str] = (".json",)) -> Path:
    """A new result stem in folder ``out`` (made if missing): ``out/<kind>-<device>-<date>-<label>``,
    or that with ``-2``, ``-3``, ... when a file of the stem with any of ``suffixes`` exists. The
    first suffix's file is created empty and exclusively here, so the name is taken by this run
    even if another starts at the same moment; the caller writes it and the others."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the result folder {out} is a file; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    base = result_name(kind, device, date or dt.datetime.now(dt.timezone.utc).date().isoformat(), label)
    for k in range(1, 10_000):
        stem = out / (base if k == 1 else f"{base}-{k}")
        if any(stem.with_name(stem.name + s).exists() for s in suffixes):
            continue
        try:
            with open(stem.with_name(stem.name + suffixes[0]), "x"):
                pass
        except FileExistsError:  # taken between the check and the create
            continue
        return stem
    raise RuntimeError(f"no free result name for {base} in {out} after 9,999 tries")


def out_folder(arg: str | None, default: Path = RESULTS) -> Path:
    """The ``--out`` argument of a script: a folder (made when missing), never a file name."""
    path = Path(arg) if arg else default
    if path.suffix.lower() in (".json", ".md", ".png") or (path.exists() and not path.is_dir()):
        raise ValueError(f"--out takes a folder (result names are chosen by bench/common.py), got the file "
                         f"name {str(path)!r}")
    return path
