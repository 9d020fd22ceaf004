"""Clip and image transforms on (T, C, H, W) with torchvision.transforms.v2.

A clip is wrapped as ``tv_tensors.Video`` and goes through one v2 call, so every random
parameter (crop box, flip) is drawn once and applied to all its frames. Randomness comes from
the torch generator state around the call; ``MediaDataset`` seeds it per sample (seed, epoch,
index), which makes the output independent of worker count and order.

Output dtype (``TransformConfig.dtype``): ``float32`` converts and normalises on the CPU
(``x * (1 / 255)``, then ``(x - mean) / std`` when ``normalize``); ``uint8`` stops after the
geometric ops (resize, crop, flip act on uint8 directly) and leaves the conversion to the model,
which applies exactly the same arithmetic on its device with ``pixel_norm(cfg)`` (see
``mmsparse.pixels.normalize_pixels``). The geometric ops see the same uint8 pixels either
way, so both paths give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mmsparse.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels
PIXEL_DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class TransformConfig:
    """short_side: resize so the shorter side is this (None: keep); crop: (h, w) output size
    (None: no crop); random crop and horizontal flip when ``train``; normalise with mean/std;
    ``dtype``: ``float32`` (converted and normalised here) or ``uint8`` (left to the model)."""

    short_side: int | None = None
    crop: tuple[int, int] | None = None
    train: bool = False
    flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in PIXEL_DTYPES:
            raise ValueError(f"dtype must be one of {PIXEL_DTYPES}, got {self.dtype!r}")


def pixel_norm(cfg: TransformConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that turn this config's uint8 output into its float32 output:
    ``(x * (1 / 255) - mean) / std``; (0, 1) per channel when ``normalize`` is off."""
    if not cfg.normalize:
        return (0.0,) * len(cfg.mean), (1.0,) * len(cfg.std)
    return tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))


def build_transform(cfg: TransformConfig) -> v2.Transform:
    """uint8 (T, C, H, W) or (C, H, W) -> the same layout, resized / cropped, in ``cfg.dtype``."""
    ops: list = []
    if cfg.short_side is not None:
        ops.append(v2.Resize(cfg.short_side, antialias=True))
    if cfg.crop is not None:
        ops.append(v2.RandomCrop(cfg.crop, pad_if_needed=True) if cfg.train else v2.CenterCrop(cfg.crop))
    if cfg.train and cfg.flip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.dtype == "float32":
        ops.append(ToNormalizedFloat(*pixel_norm(cfg)))
    return v2.Compose(ops) if ops else v2.Identity()


class ToNormalizedFloat(v2.Transform):
    """uint8 video / image -> contiguous float32 ``(x * (1 / 255) - mean) / std`` per channel.

    Computes what ``ToDtype(float32, scale=True)`` then ``Normalize(mean, std)`` compute, with the
    model's own function for uint8 batches (``mmsparse.pixels.normalize_pixels``), so the two
    pixel paths cannot drift apart; one conversion pass into a contiguous tensor instead of
    torchvision's two on the channels-last frames (64 x 224 x 224 frames: 70 -> 35 ms a clip on
    one core).
    """

    _transformed_types = (tv_tensors.Video, tv_tensors.Image)

    def __init__(self, mean, std):
        super().__init__()
        self.norm = (tuple(map(float, mean)), tuple(map(float, std)))

    def transform(self, inpt, params):
        return tv_tensors.wrap(normalize_pixels(inpt.as_subclass(torch.Tensor), self.norm), like=inpt)


def apply_clip(transform: v2.Transform, frames: torch.Tensor) -> torch.Tensor:
    """frames (T, C, H, W) uint8 -> (T, C, h, w) in the transform's dtype, one set of random
    parameters. A uint8 result may be a strided view of ``frames`` (collate copies it anyway)."""
    if frames.ndim != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"frames must be (T, C, H, W) with C in (1, 3), got {tuple(frames.shape)}")
    return transform(tv_tensors.Video(frames)).as_subclass(torch.Tensor)


def apply_image(transform: v2.Transform, image: torch.Tensor) -> torch.Tensor:
    """image (C, H, W) uint8 -> (C, h, w) in the transform's dtype."""
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    return transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
