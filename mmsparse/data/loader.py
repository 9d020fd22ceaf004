"""The DataLoader over a MediaDataset, and its survival of decode workers that die.

``make_loader`` builds a ``MediaLoader``: a torch DataLoader (same arguments, same attributes:
``sampler``, ``dataset``, ``generator``) whose iterator outlives a worker process killed by its
decoder. Damaged files make decord crash in C++ now and then (a segfault, an abort from an
uncaught C++ exception) where no Python exception can be raised; a plain DataLoader then ends
the run with ``RuntimeError: DataLoader worker (pid N) exited unexpectedly``.

On that error ``MediaLoader.__iter__``:

1. reads the dead pids from torch's message and asks the dataset's ``CrashGuard`` which sample
   each was decoding;
2. marks those samples (decoded with PyAV from then on, skipped as ``crashed`` if that crashes
   too), counts the crash in the failure stats (so the bad-fraction bound still applies) and
   logs it with the path; a worker that died outside any decode (no sample to blame: a
   decoder's state gone bad earlier, the kernel's OOM killer) is only logged, and after
   ``max_blind_restarts`` such deaths in one iteration the error is raised;
3. rewinds the sampler to the first sample of the first batch not yet handed out and starts
   fresh workers from there.

The batches that follow are the ones a run where the file had failed cleanly would see: the
sampler's order, the dataset's (seed, epoch, index) randomness and its replacement draws do not
depend on the workers. Samples the dead iterator had prefetched are decoded again, so
``stats.attempts`` counts those twice.

Workers start clean of the main process's PyAV scaler. PyAV 19 keeps one FFmpeg scaler
(SwsContext) per thread and lets it scale with one slice thread per CPU. Once the main process has
converted a frame with PyAV (a ``num_workers=0`` pass, a stage timing, evaluation), its main
thread holds such a scaler, and every worker forked later inherits it without its threads:
the worker's first PyAV frame conversion (``to_ndarray`` with a size) then waits forever for
slice threads that do not exist in the child (``sws_scale_frame`` ->
``avpriv_slicethread_execute`` -> ``pthread_cond_wait``). A decode run inline
(``decode_timeout=None``) hangs that way; under a decode timeout each decode runs in a fresh
thread and never sees the inherited scaler. ``_worker_init`` therefore sets the inherited scaler
aside (never freed: freeing it would join the missing threads) so the worker builds its own.
"""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path
from typing import Iterator

from torch.utils.data import DataLoader

from .collate import collate
from .dataset import DataConfig, MediaDataset, auto_decode_threads
from .errors import MediaError, TooManyBadSamples
from .sampler import ShardedSampler

log = logging.getLogger("mmsparse.data")

# torch's messages: "DataLoader worker (pid 123) is killed by signal: ..." and
# "DataLoader worker (pid(s) 123, 456) exited unexpectedly"
_DEAD = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")


def _dead_pids(err: BaseException) -> set[int]:
    pids: set[int] = set()
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:  # torch chains the signal handler's error as the cause
        seen.add(id(e))
        for m in _DEAD.finditer(str(e)):
            pids.update(int(p) for p in m.group(1).replace(" ", "").split(",") if p)
        e = e.__cause__ or e.__context__
    return pids


# scalers inherited from the main process, kept alive for the worker's lifetime (see _fresh_pyav_scaler)
_INHERITED_SCALERS: list = []


def _fresh_pyav_scaler() -> bool:
    """Set aside the PyAV scaler this forked process inherited with its thread (module doc).

    PyAV 19 caches a ``VideoReformatter`` per thread in ``av.video.frame._thread_local``; one
    made in the parent owns FFmpeg slice threads that a forked child does not have. The next
    conversion here builds a new one. The old one is kept referenced, never freed: freeing
    joins its threads, which would wait forever too. Returns whether one was set aside; a
    no-op when PyAV was never imported (spawned workers, decord only) or keeps no such cache.
    """
    import sys

    frame_mod = sys.modules.get("av.video.frame")
    local = getattr(frame_mod, "_thread_local", None) if frame_mod is not None else None
    old = getattr(local, "reformatter", None) if local is not None else None
    if old is None:
        return False
    _INHERITED_SCALERS.append(old)
    local.reformatter = None  # av.video.frame.VideoFrame.reformat makes a new one when it finds None
    return True


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # decode parallelism comes from workers; avoid oversubscription
    _fresh_pyav_scaler()  # before any decode: a scaler forked from the main thread deadlocks
    # Objects inherited from the main process are never garbage-collected here: a decoder made
    # there (a decord VideoReader) owns threads this process does not have, and finalising it
    # in a worker aborted the worker (std::system_error from its thread join; seen in CI, in
    # the queue feeder thread's collection). The main process collects before forking, too.
    gc.freeze()


class MediaLoader(DataLoader):
    """A DataLoader whose iteration survives decode workers that crash (see the module doc)."""

    max_blind_restarts = 2  # worker deaths outside any decode tolerated per iteration

    def __iter__(self) -> Iterator[dict]:
        sampler, ds = self.sampler, self.dataset
        if self.num_workers == 0 or not isinstance(ds, MediaDataset) or not hasattr(sampler, "position"):
            yield from super().__iter__()
            return
        start, handed, blind = sampler.position, 0, 0
        while True:
            gc.collect()  # finalise dead decoders here, where their threads live (_worker_init)
            it = super().__iter__()
            try:
                for batch in it:
                    handed += 1
                    yield batch
                return
            except RuntimeError as err:
                pids = _dead_pids(err)
                if not pids:
                    raise
                hits = ds.crashes.mark_dead(pids)
                if hits:
                    self._record(ds, hits, err)
                else:
                    blind += 1
                    if blind > self.max_blind_restarts:
                        raise RuntimeError(f"decode workers died {blind} times outside any decode in this "
                                           f"iteration; last: {str(err).splitlines()[0]}") from err
                    log.warning("a decode worker died outside any decode (%s); restarting the workers from "
                                "batch %d (%d of %d such restarts)", str(err).splitlines()[0], handed, blind,
                                self.max_blind_restarts)
            finally:
                del it  # shuts the (remaining) workers down before new ones start
            sampler.position = start + handed * self.batch_size

    @staticmethod
    def _record(ds: MediaDataset, hits: list[tuple[int, int]], err: BaseException) -> None:
        why = str(err).split("\n")[0]
        for index, level in hits:
            path = ds.samples[index].primary_path
            then = "decoding it with PyAV from now on" if level == 1 else "skipping it from now on"
            ds.stats.record(MediaError(path, "crashed", f"{why}; {then}"))
        if ds.cfg.strict:
            raise TooManyBadSamples(f"a decode worker crashed (strict mode): {ds.stats.summary()}") from err
        bound = ds.bad_fraction_error()
        if bound is not None:
            raise bound from err


def make_loader(manifest: str | Path | MediaDataset, config: DataConfig | None = None, *, batch_size: int = 8,
                num_workers: int = 0, sampler: ShardedSampler | None = None, rank: int = 0,
                num_replicas: int = 1, shuffle: bool | None = None, drop_last: bool = False,
                prefetch_factor: int | None = None, multiprocessing_context=None,
                timeout: float = 0, pin_memory: bool = False) -> MediaLoader:
    """A MediaLoader over ``manifest`` yielding Batch dicts; sharded by ``rank`` / ``num_replicas``.

    ``shuffle`` defaults to ``config.train``. The sampler (``loader.sampler``) carries the
    resumable position; ``loader.dataset.stats`` the failure counts. With ``num_workers >= 1``
    a worker killed by its decoder costs the sample, not the run (module doc). ``timeout``
    (seconds, workers only; 0: wait forever) bounds the wait for each batch: past it the
    iteration raises torch's ``RuntimeError: DataLoader timed out after N seconds`` instead of
    waiting on workers that no longer deliver. ``pin_memory``: batches come in page-locked
    memory (DataLoader's pinning thread), so ``tensor.to("cuda", non_blocking=True)`` neither
    waits for the GPU to finish its queue nor blocks the host; training on CUDA sets it.
    """
    ds = manifest if isinstance(manifest, MediaDataset) else MediaDataset(manifest, config)
    if ds.cfg.decode_threads == 0:  # auto: the CPUs shared out among this loader's workers
        ds.decode_threads = auto_decode_threads(num_workers)
    if sampler is None:
        sampler = ShardedSampler(len(ds), num_replicas, rank, shuffle=ds.cfg.train if shuffle is None else shuffle,
                                 seed=ds.cfg.seed, drop_last=drop_last)
    kw = {}
    if num_workers > 0:
        kw["worker_init_fn"] = _worker_init
        kw["prefetch_factor"] = prefetch_factor or 2
        kw["timeout"] = timeout
        if multiprocessing_context is not None:
            kw["multiprocessing_context"] = multiprocessing_context
    return MediaLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                       collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory, **kw)
