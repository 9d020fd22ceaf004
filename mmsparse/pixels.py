"""uint8 pixels -> normalised float32 frames: one function shared by the data pipeline (its
float path, CPU) and the modality encoders (uint8 batches, on the GPU), so both give the same
numbers. A bottom-layer module (torch only): data and encoders both import it.
"""

from __future__ import annotations

import functools

import torch

# the pixel normalisation of ImageNet-pretrained encoders, the pipeline's default (data.transforms)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=32)
def _norm_tensors(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    """(C, 1, 1) float32 mean and std on ``device``, made once (no host-to-device copy per step)."""
    def make(v):
        return torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device)
    return make(mean), make(std)


def normalize_pixels(pixels: torch.Tensor, norm, mask: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels (*L, C, H, W), any strides -> contiguous float32 frames of the same shape
    on the pixels' device.

    ``norm`` = (mean, std), C floats each (a batch's ``pixel_norm``). Per channel
    ``(p * (1 / 255) - mean) / std``: the operations, order and float32 rounding of the data
    pipeline's float path (torchvision ``ToDtype(float32, scale=True)`` then ``Normalize``), so
    the result equals what that path would have produced. ``mask`` (*L) bool, True on real
    frames / images: the others become 0, as the float path pads them after normalising.
    """
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.dim() < 3:
        raise ValueError(f"pixels must be (..., C, H, W), got shape {tuple(pixels.shape)}")
    c = pixels.shape[-3]
    try:
        mean, std = (tuple(float(v) for v in part) for part in norm)
    except (TypeError, ValueError):
        raise ValueError(f"uint8 pixels need norm=(mean, std), C={c} floats each (the batch's "
                         f"'pixel_norm'), got {norm!r}") from None
    if len(mean) != c or len(std) != c or not all(std):
        raise ValueError(f"norm must be (mean, std) of C={c} floats each, std non-zero; got {norm!r}")
    if mask is not None and tuple(mask.shape) != tuple(pixels.shape[:-3]):
        raise ValueError(f"mask must be {tuple(pixels.shape[:-3])} (one flag per frame or image), "
                         f"got {tuple(mask.shape)}")
    m, s = _norm_tensors(mean, std, pixels.device)
    # ToDtype(scale=True) multiplies by 1/255 (not a division); contiguous output: the float
    # path's layout, and the channels-last uint8 batch is transposed here, on the device
    x = pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
    x.sub_(m).div_(s)
    if mask is not None:
        x.masked_fill_(~mask.to(device=x.device, dtype=torch.bool)[(...,) + (None,) * 3], 0.0)
    return x
