"""Kernel options: one dataclass for every knob that tunes the attention kernels and backends.

The defaults are the tuned choices. A program sets its own with `set_kernel_options`: a
training run does, from its config's `kernels` section (a recipe's `kernels: {mask_tile_mb:
1024}`, or `kernels.autotune=true` on the command line; `mmsparse.train.config.KernelsSection`).
The environment variables below override single fields of the program's options, the config's
included (the environment wins: it is what a one-off run or an A/B test sets without touching a
recipe). They are read here only, on every call of `kernel_options()` (a test may set one with
monkeypatch.setenv):

| field | environment variable | values |
|-------|----------------------|--------|
| attention_backend | MMSPARSE_ATTENTION_BACKEND | None (auto), reference, sdpa, flex, triton, flash |
| sdpa_max_tokens | MMSPARSE_SDPA_MAX_TOKENS | N up to which the sdpa backend builds an N x N mask |
| flash_min_full_share | MMSPARSE_FLASH_MIN_FULL_SHARE | 0..1: least full-block share of the pairs for auto -> flash |
| mask_tiles | MMSPARSE_MASK_TILES | auto, 0 (mask program in registers), 1 (precomputed tiles) |
| mask_tile_mb | MMSPARSE_MASK_TILE_MB | device memory (MiB) shared by every layout's mask tiles |
| skip_empty_tiles | MMSPARSE_SKIP_EMPTY_TILES | 1 / 0: partial-block loops skip tiles that attend nothing |
| autotune | MMSPARSE_TRITON_AUTOTUNE | 0 / 1: time the tile candidates once per shape |
| tma | MMSPARSE_TRITON_TMA | auto, 0, 1 (1 also under the CPU interpreter) |
| tma_backward | MMSPARSE_TRITON_TMA_BWD | 1 / 0: the backward passes use tensor descriptors too |
| fused_rope | MMSPARSE_FUSED_ROPE | auto, 0, 1 (1 also under the CPU interpreter) |
| warp_specialize | MMSPARSE_WARP_SPECIALIZE | 0, auto, 1 (1 also under the CPU interpreter) |
| compile_blocks | MMSPARSE_COMPILE_BLOCKS | 0, auto (CUDA tensors), 1 (the CPU too) |

`split_chunk` (no variable) forces the chunk length of split rows, for tests.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

BACKENDS = ("reference", "sdpa", "flex", "triton", "flash")
_MODES = ("auto", "0", "1")
MODE_FIELDS = ("mask_tiles", "tma", "fused_rope", "warp_specialize", "compile_blocks")  # values from _MODES


@dataclass(frozen=True)
class KernelOptions:
    attention_backend: str | None = None
    sdpa_max_tokens: int = 16384
    # auto runs a layout on the flash backend (full blocks on FlashAttention-4, partial blocks on
    # Triton, merged by LSE) only where its full blocks hold at least this share of the computed
    # pairs: FA4's faster full blocks must pay for a second launch and the merge. E1 (H100,
    # 2026-12-08, bench/NOTES.md) found the split 1.2x slower over the whole training step at
    # shares of 0.41 and 0.51, so auto takes it only for layouts of (nearly) all full blocks
    flash_min_full_share: float = 0.95
    mask_tiles: str = "auto"
    mask_tile_mb: float = 2048.0
    skip_empty_tiles: bool = True
    autotune: bool = False
    tma: str = "auto"
    tma_backward: bool = True
    fused_rope: str = "auto"
    # Triton's automatic warp specialisation (`tl.range(..., warp_specialize=True)`) of the
    # block-sparse kernels' full-block loops (forward and dQ over key tiles, dK / dV over query
    # tiles), in 4-warp launches, where Triton 3.6's Hopper pass compiles them: loops that load
    # through tensor descriptors (`tma`), in launches without partial blocks or key padding
    # (`launch.warp_specialize`). auto: on wherever that holds, which is a Hopper or newer GPU;
    # 1: the CPU interpreter too, where it runs as plain code (tests); 0: never. Off until a
    # same-run A/B on the GPU (`bench/attention.py --ab warp_specialize=0,1`) times it faster.
    warp_specialize: str = "0"
    # the encoder blocks' work around attention (output projection, residual adds, norm, MLP)
    # through torch.compile (inductor): its pointwise and reduction kernels fused, forward and
    # backward (mmsparse/models/layers.py, `SparseBlock`). Attention itself stays eager. auto: on
    # CUDA tensors; 1: on the CPU too (tests; needs a C++ compiler); 0: eager. Off until a
    # same-run E1 A/B on the GPU (bench/model.py, `kernels.compile_blocks=1` in a --config) times
    # it faster
    compile_blocks: str = "0"
    split_chunk: int | None = None

    def __post_init__(self):
        if self.attention_backend is not None and self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be None or one of {BACKENDS}, got {self.attention_backend!r}")
        for name in MODE_FIELDS:
            if getattr(self, name) not in _MODES:
                raise ValueError(f"{name} must be auto, 0 or 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.flash_min_full_share <= 1.0:  # NaN too
            raise ValueError(f"flash_min_full_share must be in [0, 1], got {self.flash_min_full_share}")
        if self.sdpa_max_tokens < 1:
            raise ValueError(f"sdpa_max_tokens must be >= 1, got {self.sdpa_max_tokens}")
        if not self.mask_tile_mb >= 0:  # NaN too
            raise ValueError(f"mask_tile_mb must be >= 0, got {self.mask_tile_mb}")
        if self.split_chunk is not None and self.split_chunk < 1:
            raise ValueError(f"split_chunk must be None or >= 1, got {self.split_chunk}")


def _flag(value: str) -> bool:
    return value != "0"


# field -> (environment variable, parser); the variables' names and meanings are kept as they
# were before the options object existed, so scripts and notes that set them still work
ENVIRONMENT = {
    "attention_backend": ("MMSPARSE_ATTENTION_BACKEND", str),
    "sdpa_max_tokens": ("MMSPARSE_SDPA_MAX_TOKENS", int),
    "flash_min_full_share": ("MMSPARSE_FLASH_MIN_FULL_SHARE", float),
    "mask_tiles": ("MMSPARSE_MASK_TILES", str),
    "mask_tile_mb": ("MMSPARSE_MASK_TILE_MB", float),
    "skip_empty_tiles": ("MMSPARSE_SKIP_EMPTY_TILES", _flag),
    "autotune": ("MMSPARSE_TRITON_AUTOTUNE", lambda v: v == "1"),
    "tma": ("MMSPARSE_TRITON_TMA", str),
    "tma_backward": ("MMSPARSE_TRITON_TMA_BWD", _flag),
    "fused_rope": ("MMSPARSE_FUSED_ROPE", str),
    "warp_specialize": ("MMSPARSE_WARP_SPECIALIZE", str),
    "compile_blocks": ("MMSPARSE_COMPILE_BLOCKS", str),
}

_current = KernelOptions()


def set_kernel_options(options: KernelOptions | None = None, **fields) -> KernelOptions:
    """Set the program's options (a KernelOptions, and/or fields to change); returns the
    previous ones, so a caller can restore them."""
    global _current
    previous = _current
    _current = dataclasses.replace(options or _current, **fields)
    return previous


def kernel_options() -> KernelOptions:
    """The options in force: the program's, each field overridden by its environment variable.
    A few dictionary reads when nothing changed (the launchers call it once a call)."""
    get = os.environ.get
    key = tuple([get(var) for var in _VARIABLES])
    cached = _RESOLVED.get(key)
    if cached is not None and cached[0] is _current:
        return cached[1]
    env = {}
    for (name, (var, parse)), value in zip(ENVIRONMENT.items(), key):
        if value:
            try:
                env[name] = parse(value)
            except ValueError as err:
                raise ValueError(f"{var}={value!r}: {err}") from err
    try:
        resolved = dataclasses.replace(_current, **env) if env else _current
    except ValueError as err:
        names = ", ".join(ENVIRONMENT[k][0] for k in env)
        raise ValueError(f"{err} (from the environment: {names})") from err
    if len(_RESOLVED) > 64:
        _RESOLVED.clear()
    _RESOLVED[key] = (_current, resolved)
    return resolved


_VARIABLES = tuple(var for var, _ in ENVIRONMENT.values())
_RESOLVED: dict = {}  # environment values -> (program options, resolved options)
