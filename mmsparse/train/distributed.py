"""Process-group set-up: launcher or none, GPU (nccl) or CPU (gloo), data / sequence-parallel groups.

Rank r of W processes with sequence-parallel size P sits in sequence-parallel group r // P
(ranks [g*P, (g+1)*P)) and has data-parallel rank r // P among W / P data-parallel replicas.
Every member of a sequence-parallel group draws the same clip.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Topology:
    rank: int
    world: int
    local_rank: int
    sp: int                      # sequence-parallel size
    dp: int                      # data-parallel size (= world // sp)
    dp_rank: int
    sp_rank: int
    sp_group: object = None      # ProcessGroup of this rank's sequence-parallel group (None when sp == 1)
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Log records that do not apply to the run they appear in, by logger and message start. Only
# WARNING records that match are dropped; anything else from these loggers still shows.
NOT_APPLICABLE = {
    # on `import deepspeed` without a GPU: the CPU is what a run without one is meant to use
    "DeepSpeed": ("Setting accelerator to CPU.",
                  # DeepSpeed reads the scheduler's rate inside deepspeed.initialize, before step 1
                  "Attempting to get learning rate from scheduler before it has started"),
    # torch's C++ extension builder (DeepSpeed's CPU ops) when no CUDA runtime exists: a CPU-only
    # op needs no CUDA_HOME
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}


class _DropNotApplicable(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.getMessage().startswith(self.prefixes))


def quiet_warnings() -> None:
    """Drop the warnings of ``NOT_APPLICABLE`` where they are raised (their loggers); call
    before ``import deepspeed``. Idempotent."""
    for name, prefixes in NOT_APPLICABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotApplicable) for f in logger.filters):
            logger.addFilter(_DropNotApplicable(prefixes))


def shm_op_cached() -> bool:
    """Whether DeepSpeed's CPU all-reduce op (deepspeed_shm_comm) is already built in the
    extension cache (``TORCH_EXTENSIONS_DIR``, else torch's default folder)."""
    from torch.utils.cpp_extension import _get_build_directory

    return (Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "deepspeed_shm_comm.so").is_file()


def announce_op_build() -> str | None:
    """On a CPU run's local rank 0, say before DeepSpeed compiles its CPU communication op that it
    does so, how long it takes and that it happens once; returns the message (None: cached)."""
    if torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", 0)) != 0 or shm_op_cached():
        return None
    from torch.utils.cpp_extension import _get_build_directory

    where = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent
    msg = (f"building DeepSpeed's CPU communication op (deepspeed_shm_comm) with ninja: once per machine and "
           f"Python environment, about 60-90 s on 2 cores; cached in {where} (set TORCH_EXTENSIONS_DIR to keep it "
           f"elsewhere)")
    print(msg, file=sys.stderr, flush=True)
    return msg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(sequence_parallel_size: int = 1) -> Topology:
    """Initialise torch.distributed through DeepSpeed (a single process needs no launcher)."""
    quiet_warnings()
    import deepspeed

    if "RANK" not in os.environ:  # no launcher: one process, its own rendezvous
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        announce_op_build()
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not gpu:
        _release_shm_names(rank, world)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    sp = sequence_parallel_size
    if world % sp:
        raise ValueError(f"deepspeed.sequence_parallel_size={sp} must divide the number of processes ({world})")
    group = None
    if sp > 1:
        # every rank must create every group, in the same order
        for g in range(world // sp):
            pg = dist.new_group(list(range(g * sp, (g + 1) * sp)))
            if rank // sp == g:
                group = pg
    return Topology(rank, world, local_rank, sp, world // sp, rank // sp, rank % sp, group, device)


def shm_buffer(rank: int, addr: str | None = None, port: str | int | None = None) -> Path:
    """The /dev/shm file of DeepSpeed's CPU all-reduce for `rank` (deepspeed_shm_comm names it
    after the user, MASTER_ADDR and MASTER_PORT)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _release_shm_names(rank: int, world: int) -> None:
    """DeepSpeed's CPU all-reduce (all ranks on one machine) maps one 69 MB /dev/shm file per
    rank and never unlinks it: every finished or killed run left its files in memory (16 GB
    after a few days of tests here). init_distributed returns once every rank has mapped every
    rank's file, so after a barrier each rank unlinks its own name: the mappings stay valid,
    and a run killed later leaves nothing behind."""
    path = shm_buffer(rank)
    if world > 1:
        dist.barrier()
    try:
        path.unlink(missing_ok=True)
    except OSError:  # not ours to remove, or /dev/shm absent: leave it
        pass


def all_mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (so all ranks take the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
