"""Collate sample dicts into the modality-keyed batch (layout documented in ``mmsparse.data``).

Clips of different lengths are right-padded with zeros to the longest T in the batch; audio
features to the longest Tm. Masks are True on real frames / feature frames and False on
padding (and all False for a sample that lacks the modality).
"""

from __future__ import annotations

from typing import Any

import torch


def _pad_stack(items: list[torch.Tensor | None], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors along a new batch dim, padding ``dim`` to the longest; returns (x, mask)."""
    ref = next(t for t in items if t is not None)
    length = max(t.shape[dim] for t in items if t is not None)
    shape = list(ref.shape)
    shape[dim] = length
    out = ref.new_zeros((len(items), *shape))
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for b, t in enumerate(items):
        if t is None:
            continue
        n = t.shape[dim]
        out[b].narrow(dim, 0, n).copy_(t)
        mask[b, :n] = True
    return out, mask


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """list of ``MediaDataset`` items -> Batch dict.

    Keys present when any sample has the modality:
        video (B, T, C, H, W) float32, video_mask (B, T) bool, video_times (B, T) float64,
        audio (B, M, Tm) float32, audio_mask (B, Tm) bool, audio_start (B,) float64,
        image (B, C, H, W) float32, image_mask (B,) bool.
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
        batch["video"], batch["video_mask"] = _pad_stack(vids, 0)
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
        ref = next(i for i in imgs if i is not None)
        batch["image"] = torch.stack([i if i is not None else torch.zeros_like(ref) for i in imgs])
        batch["image_mask"] = torch.tensor([i is not None for i in imgs])
    return batch
