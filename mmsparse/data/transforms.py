"""Clip and image transforms on (T, C, H, W) with torchvision.transforms.v2.

A clip is wrapped as ``tv_tensors.Video`` and goes through one v2 call, so every random
parameter (crop box, flip) is drawn once and applied to all its frames. Randomness comes from
the torch generator state around the call; ``MediaDataset`` seeds it per sample (seed, epoch,
index), which makes the output independent of worker count and order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformConfig:
    """short_side: resize so the shorter side is this (None: keep); crop: (h, w) output size
    (None: no crop); random crop and horizontal flip when ``train``; normalise with mean/std."""

    short_side: int | None = None
    crop: tuple[int, int] | None = None
    train: bool = False
    flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: bool = True


def build_transform(cfg: TransformConfig) -> v2.Compose:
    """uint8 (T, C, H, W) or (C, H, W) -> float32 of the same layout, resized / cropped."""
    ops: list = []
    if cfg.short_side is not None:
        ops.append(v2.Resize(cfg.short_side, antialias=True))
    if cfg.crop is not None:
        ops.append(v2.RandomCrop(cfg.crop, pad_if_needed=True) if cfg.train else v2.CenterCrop(cfg.crop))
    if cfg.train and cfg.flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.normalize:
        ops.append(v2.Normalize(list(cfg.mean), list(cfg.std)))
    return v2.Compose(ops)


def apply_clip(transform: v2.Compose, frames: torch.Tensor) -> torch.Tensor:
    """frames (T, C, H, W) uint8 -> (T, C, h, w) float32, one set of random parameters."""
    if frames.ndim != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"frames must be (T, C, H, W) with C in (1, 3), got {tuple(frames.shape)}")
    return transform(tv_tensors.Video(frames)).as_subclass(torch.Tensor)


def apply_image(transform: v2.Compose, image: torch.Tensor) -> torch.Tensor:
    """image (C, H, W) uint8 -> (C, h, w) float32."""
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    return transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
