"""Rotary position embeddings on 1D, 2D and 3D token grids.

Legend: B batch, H heads, N tokens, D head dim, P = D / 2 rotated pairs, A grid axes (<= 3).

One generic N-d function, thin per-rank use: the P pairs of a head are split between the A axes
(as evenly as possible) and pair j of axis a turns by coord[a] * theta ** (-j / P_a). Positions
are integer grid coordinates, so a clip of any length or frame size runs without
interpolating a table. Tokens without a grid (global tokens) have coordinate 0 on every axis,
i.e. no rotation; a 2D grid leaves the third axis at 0, so its pairs are not turned.
"""

from __future__ import annotations

import torch

# the rotation itself lives beside its fused Triton kernel (the bottom layer); re-exported here
from mmsparse.kernels.rope import apply_rope  # noqa: F401


def axis_pairs(head_dim: int, n_axes: int) -> tuple[int, ...]:
    """How many rotated pairs each axis gets (sums to head_dim // 2)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    return tuple(pairs // n_axes + (a < pairs % n_axes) for a in range(n_axes))


def rope_angles(coords: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """coords (N, A) integer or float grid coordinates -> angles (N, P) float32."""
    if coords.dim() != 2:
        raise ValueError(f"coords must be (N, A), got {tuple(coords.shape)}")
    n_axes = coords.shape[1]
    parts = []
    for a, p in enumerate(axis_pairs(head_dim, n_axes)):
        if p == 0:
            continue
        freq = theta ** (-torch.arange(p, dtype=torch.float64, device=coords.device) / p)  # (P_a,)
        parts.append(coords[:, a, None].double() * freq)  # (N, P_a)
    return torch.cat(parts, dim=1).float()  # (N, P)


def rope_cos_sin(coords: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """(cos, sin), each (N, P) float32, for `apply_rope`."""
    ang = rope_angles(coords, head_dim, theta)
    return ang.cos(), ang.sin()


