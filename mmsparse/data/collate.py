"""Collate sample dicts into the modality-keyed batch (layout documented in ``mmsparse.data``).

Clips of different lengths are right-padded with zeros to the longest T in the batch; audio
features to the longest Tm. Masks are True on real frames / feature frames and False on
padding (and all False for a sample that lacks the modality).

Each batch tensor is allocated once, uninitialised, and filled by one copy per sample; only
the padding is zeroed. Inside a loader worker it is allocated in shared memory, so sending it
to the main process costs no further copy (a tensor in ordinary memory is copied into shared
memory when it is pickled). Pixels keep their dtype: uint8 frames stay uint8 (a quarter of the
bytes of float32) and the batch carries the ``pixel_norm`` that the model applies.

A uint8 video batch is channels-last in memory: shape (B, T, C, H, W), a view of (B, T, H, W, C)
storage, the decoders' own layout, so each clip is copied in whole pixel rows instead of being
transposed byte by byte (about 6x faster); the model's normalisation writes contiguous float32
frames on the device. Float32 batches stay contiguous, as before.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import get_worker_info


def _empty(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """An uninitialised CPU tensor; in shared memory when called in a loader worker.
    ``channels_last``: shape (..., C, H, W) stored as (..., H, W, C)."""
    stored = (*shape[:-3], *shape[-2:], shape[-3]) if channels_last else tuple(shape)
    if get_worker_info() is None:
        out = torch.empty(stored, dtype=dtype)
    else:
        nbytes = math.prod(stored) * dtype.itemsize
        storage = torch.UntypedStorage._new_shared(nbytes)  # share_memory_() would copy a fresh tensor
        out = torch.empty(0, dtype=dtype).set_(storage, 0, stored)
    return out.movedim(-1, -3) if channels_last else out


def _pad_stack(items: list[torch.Tensor | None], dim: int | None,
               channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors along a new batch dim, padding ``dim`` to the longest; returns (x, mask)
    with mask (B, longest) True on real positions. ``dim=None``: items of one shape, mask (B,).
    ``channels_last``: items (..., C, H, W), stored (..., H, W, C) (see ``_empty``).

    A None item (a sample without the modality) is all zeros with an all-False mask."""
    present = [t for t in items if t is not None]
    ref = present[0]
    dtypes = {t.dtype for t in present}
    if len(dtypes) > 1:
        raise ValueError(f"samples of one batch differ in dtype: {sorted(map(str, dtypes))}; "
                         "build them with one data config")
    if dim is None:
        out = _empty((len(items), *ref.shape), ref.dtype)
        for b, t in enumerate(items):
            if t is None:
                out[b].zero_()
            else:
                out[b].copy_(t)
        return out, torch.tensor([t is not None for t in items])
    length = max(t.shape[dim] for t in present)
    shape = list(ref.shape)
    shape[dim] = length
    out = _empty((len(items), *shape), ref.dtype, channels_last)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for b, t in enumerate(items):
        if t is None:
            out[b].zero_()
            continue
        n = t.shape[dim]
        out[b].narrow(dim, 0, n).copy_(t)
        if n < length:
            out[b].narrow(dim, n, length - n).zero_()
        mask[b, :n] = True
    return out, mask


def _pixel_norm(samples: list[dict[str, Any]]):
    """The batch's ``pixel_norm`` (one for all its uint8 samples), or None without uint8 pixels."""
    norms = {s["pixel_norm"] for s in samples if s.get("pixel_norm") is not None}
    if len(norms) > 1:
        raise ValueError(f"samples of one batch carry different pixel_norm (mean, std): {sorted(norms)}")
    return next(iter(norms), None)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """list of ``MediaDataset`` items -> Batch dict.

    Keys present when any sample has the modality:
        video (B, T, C, H, W) float32 or uint8 (channels-last in memory), video_mask (B, T) bool, video_times (B, T) float64,
        audio (B, M, Tm) float32, audio_mask (B, Tm) bool, audio_start (B,) float64,
        image (B, C, H, W) float32 or uint8, image_mask (B,) bool,
        pixel_norm ((C,) mean, (C,) std) when video or image is uint8.
    Always: id list[str], caption list[str], captions list[list[str]], audio_hop_seconds float.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {
        "id": [s["id"] for s in samples],
        "caption": [s.get("caption", "") for s in samples],
        "captions": [list(s.get("captions", [])) for s in samples],
        "audio_hop_seconds": float(samples[0].get("audio_hop_seconds", 0.01)),
    }
    if any("video" in s for s in samples):
        vids = [s.get("video") for s in samples]
        shapes = {tuple(v.shape[1:]) for v in vids if v is not None}
        if len(shapes) > 1:
            raise ValueError(f"video frames differ in (C, H, W) across the batch: {sorted(shapes)}; "
                             "set a crop size in the data config")
        uint8 = any(v is not None and v.dtype == torch.uint8 for v in vids)
        batch["video"], batch["video_mask"] = _pad_stack(vids, 0, channels_last=uint8)
        batch["video_times"], _ = _pad_stack([s.get("video_times") for s in samples], 0)
    if any("audio" in s for s in samples):
        batch["audio"], batch["audio_mask"] = _pad_stack([s.get("audio") for s in samples], 1)
        batch["audio_start"] = torch.tensor([float(s.get("audio_start", 0.0)) for s in samples],
                                            dtype=torch.float64)
    if any("image" in s for s in samples):
        imgs = [s.get("image") for s in samples]
        shapes = {tuple(i.shape) for i in imgs if i is not None}
        if len(shapes) > 1:
            raise ValueError(f"images differ in shape across the batch: {sorted(shapes)}; "
                             "set a crop size in the data config")
        batch["image"], batch["image_mask"] = _pad_stack(imgs, None)
    uint8 = [batch[k].dtype == torch.uint8 for k in ("video", "image") if k in batch]
    if any(uint8):
        norm = _pixel_norm(samples)
        if norm is None:
            raise ValueError("uint8 pixels without a pixel_norm (mean, std) in their samples: the model "
                             "could not normalise them; build the samples with MediaDataset")
        batch["pixel_norm"] = norm
    return batch
