"""MultimodalTokenizer: a data batch -> one TokenStream (global tokens, video, audio, image).

Legend: B batch, N stream length, D embed dim, T frames, Tm audio frames, G global tokens.

Stream layout (positions):  [0, G) global tokens | video (t, h, w) | audio (f, u) | image (h, w)
Each segment is stored in tile order (`Segment.order`), so the 3D / 2D neighbourhoods of the
Tiled patterns are whole blocks. With `align > 1` every segment starts at a multiple of
`align` (the attention block size on GPU), so no block straddles two segments, and the stream
ends on a block (the kernels' tiles never reach past N, so they load without bounds masks); the
gap positions are padding tokens (zeros, pad_mask True) that belong to no segment. With
`tile_align[m] > 1` every tile of modality m also starts on a multiple of it (`Segment.tile_align`):
a (4, 14, 14) video tile of 784 tokens fills 13 whole 64-token blocks instead of straddling 14,
its slot padded by 48 gap tokens of the same kind.

Pixels: video and image come as float32 frames or as uint8 pixels with the batch's
`pixel_norm` (mean, std); uint8 is normalised here, after the move to the model's device, to the
same numbers (see `normalize_pixels` and the Batch contract in `mmsparse.data`).

Times: `Segment.seconds` and `Segment.start` come from the batch (`video_times`,
`audio_start`, `audio_hop_seconds`), relative to the first video frame, so `AVSync` pairs
audio and video tokens whose time spans overlap. Each sample keeps its own times: clips of
one batch sampled at different frame spacings (the long-clip recipes sample 256 frames from
clips of 256 to 2,048) get their own StreamLayout (`TokenStream.sample_layouts`, same grids,
different seconds per token), and the model runs each group of equal layouts with its own
attention layout. `TokenStream.layout` is the first sample's.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping

import torch
import torch.nn as nn

from mmsparse.attention import Segment, StreamLayout, TokenStream
from mmsparse.attention.stream import token_table

from .patch import ImageEmbed, SpectrogramEmbed, TubeletEmbed

MODALITIES = ("video", "audio", "image")
# batch entries the tokenizer reads on the host (padding flags, frame times): code that moves a
# batch to the GPU leaves them where the loader put them, or each read costs a device sync
HOST_KEYS = ("video_mask", "audio_mask", "image_mask", "video_times", "audio_start")


def stream_coords(layout: StreamLayout) -> torch.Tensor:
    """coords (N, 3) int64 of every stream token, in stored order (0 outside segments)."""
    return token_table(layout).coords.clamp(min=0)


class ModalityEmbedding(nn.Module):
    """One learned vector (E,) per modality, added to that modality's tokens (B, n, E).

    Parameters live in small modules whose forward takes and returns tensors, so that
    DeepSpeed ZeRO-3 gathers them for the forward and again for the backward (it does neither
    for parameters read outside their owner's forward, or behind a non-tensor output)."""

    def __init__(self, modalities, dim: int):
        super().__init__()
        self.index = {m: i for i, m in enumerate(modalities)}
        self.weight = nn.Parameter(torch.zeros(len(self.index), dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        return tokens + self.weight[self.index[modality]].to(tokens.dtype)


class GlobalTokens(nn.Module):
    """n learned global tokens (E,), expanded to (B, n, E)."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.expand(batch_size, -1, -1)


class MultimodalTokenizer(nn.Module):
    """Patch-embeds the modalities of a batch and lays them out as one TokenStream.

    Args:
        embed_dim: D.
        modalities: the encoders to build (any subset of video, audio, image).
        tubelet: video Conv3d kernel = stride (t, h, w).
        audio_patch, audio_stride: spectrogram Conv2d kernel and stride (mel, time).
        image_patch: image patch size.
        video_order, audio_order, image_order: tile shapes of each segment's stored order.
        n_global: learned global tokens at positions [0, n_global).
        align: segment offsets and the stream's length are rounded up to a multiple of this.
        tile_align: per modality (a mapping; or one int for all), each tile of its stored order
            starts at a multiple of this inside the segment (`Segment.tile_align`; 1: packed).
        max_frames, max_audio_frames: longest input accepted (ValueError past it; None: any).
        audio_norm: (shift, scale) of the log-mel before its patch embedding (e.g. `AUDIO_NORM`:
            silence -> 0); None: raw.
        audio_floor: a quantile q in (0, 1): the log-mel's shift is each clip's own noise floor
            per mel band (its q-quantile over the real frames) instead of audio_norm's constant.
        default_fps: frame rate assumed when the batch has no usable `video_times`.
        pre_norm: a LayerNorm (eps ``norm_eps``) on every token before the stream is laid out, the
            global tokens' too: CLIP's ``norm_pre``, for its pretrained weights.
    """

    def __init__(self, embed_dim: int, modalities=MODALITIES, tubelet=(2, 16, 16), audio_patch=16,
                 audio_stride=10, n_mels: int = 128, image_patch: int = 16, video_order=(4, 4, 8),
                 audio_order=(4, 32), image_order=(8, 8), n_global: int = 0, align: int = 1,
                 in_chans: int = 3, max_frames: int | None = None, max_audio_frames: int | None = None,
                 default_fps: float = 8.0, audio_norm: tuple[float, float] | None = None,
                 audio_floor: float | None = None, tile_align: int | Mapping[str, int] = 1, pre_norm: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities!r}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.embed_dim, self.n_global, self.align = embed_dim, n_global, max(1, int(align))
        self.max_frames, self.max_audio_frames, self.default_fps = max_frames, max_audio_frames, default_fps
        self.orders = {"video": tuple(video_order), "audio": tuple(audio_order), "image": tuple(image_order)}
        if isinstance(tile_align, int):
            tile_align = {m: tile_align for m in MODALITIES}
        unknown = set(tile_align) - set(MODALITIES)
        if unknown or any(not isinstance(v, int) or v < 1 for v in tile_align.values()):
            raise ValueError(f"tile_align must be a positive int or a mapping of {MODALITIES} to positive ints, "
                             f"got {tile_align!r}")
        self.tile_align = {m: int(tile_align.get(m, 1)) for m in MODALITIES}
        self.embeds = nn.ModuleDict()
        if "video" in self.modalities:
            self.embeds["video"] = TubeletEmbed(tubelet, in_chans, embed_dim)
        if "audio" in self.modalities:
            self.embeds["audio"] = SpectrogramEmbed(audio_patch, audio_stride, n_mels, embed_dim, audio_norm,
                                                    audio_floor)
        if "image" in self.modalities:
            self.embeds["image"] = ImageEmbed(image_patch, in_chans, embed_dim)
        self.modality_embed = ModalityEmbedding(self.modalities, embed_dim)
        self.global_tokens = GlobalTokens(n_global, embed_dim) if n_global else None
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else None

    # ---------------------------------------------------------------------------------------
    def check(self, batch: Mapping[str, Any], required=()) -> list[str]:
        """The modalities of `batch` this tokenizer uses; ValueError for a missing required one,
        an over-long clip or a wrong shape."""
        if not isinstance(batch, Mapping):
            raise ValueError(f"batch must be a dict keyed by modality, got {type(batch).__name__}")
        missing = [m for m in required if batch.get(m) is None]
        if missing:
            raise ValueError(
                f"batch is missing modality {', '.join(map(repr, missing))} required by this model "
                f"(required: {list(required)}; batch keys: {sorted(batch)})"
            )
        present = [m for m in self.modalities if batch.get(m) is not None]
        if not present:
            raise ValueError(f"batch has none of the modalities this model reads ({list(self.modalities)})")
        for m in present:
            if not isinstance(batch[m], torch.Tensor):
                raise ValueError(f"batch[{m!r}] must be a tensor, got {type(batch[m]).__name__}")
            self.embeds[m].check(batch[m])
            if batch[m].dtype == torch.uint8 and batch.get("pixel_norm") is None:
                raise ValueError(f"batch[{m!r}] is uint8 pixels but the batch has no 'pixel_norm' (mean, std) "
                                 "to normalise them with (mmsparse.data's collate adds it)")
        if "video" in present and self.max_frames is not None and batch["video"].shape[1] > self.max_frames:
            raise ValueError(
                f"video clip has T={batch['video'].shape[1]} frames, longer than the configured "
                f"maximum max_frames={self.max_frames}"
            )
        if "audio" in present and self.max_audio_frames is not None and batch["audio"].shape[2] > self.max_audio_frames:
            raise ValueError(
                f"audio has Tm={batch['audio'].shape[2]} frames, longer than the configured maximum "
                f"max_audio_frames={self.max_audio_frames}"
            )
        return present

    def _pre(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.norm_pre is None else self.norm_pre(tokens)

    def _aligned(self, offset: int) -> int:
        return -(-offset // self.align) * self.align

    def forward(self, batch: Mapping[str, Any], required=()) -> TokenStream:
        """batch (the mmsparse.data Batch dict) -> TokenStream (B, N, D) with pad_mask (B, N)."""
        present = self.check(batch, required)
        device = self.modality_embed.weight.device
        bsz = batch[present[0]].shape[0]
        for m in present:
            if batch[m].shape[0] != bsz:
                raise ValueError(f"batch[{m!r}] has batch size {batch[m].shape[0]}, expected {bsz}")
        pieces, pads, segments = [], [], []

        def gap(start: int, like: torch.Tensor) -> int:
            """Alignment gap from `start` to the next multiple of `align`: padding tokens of no
            segment (zeros, pad_mask True). Returns where it ends."""
            end = self._aligned(start)
            if end > start:
                pieces.append(like.new_zeros(bsz, end - start, like.shape[-1]))
                pads.append(torch.ones(bsz, end - start, dtype=torch.bool, device=device))
            return end

        offset = self.n_global
        if self.global_tokens is not None:
            pieces.append(self._pre(self.global_tokens(bsz)))
            pads.append(torch.zeros(bsz, self.n_global, dtype=torch.bool, device=device))
        times: dict[str, list[tuple[float, float]]] = {}  # modality -> per sample (seconds, start)
        has_padding: bool | None = False  # padding of shorter clips; None: only the device knows
        video_t0 = None
        for m in present:
            x = batch[m].to(device, non_blocking=True)  # uint8 pixels move as uint8: 4x fewer bytes
            # which frames (or images) are real; audio reads them for a per-clip noise floor only
            mask = None if m == "audio" and self.embeds[m].floor is None else batch.get(f"{m}_mask")
            mask = None if mask is None else mask.to(device, non_blocking=True)
            if m in ("video", "image"):
                tokens, grid = self.embeds[m](x, norm=batch.get("pixel_norm"), mask=mask)
            else:
                tokens, grid = self.embeds[m](x, mask)
            pad, padded = self._pad_mask(m, batch, grid, bsz, device)
            has_padding = None if None in (has_padding, padded) else (has_padding or padded)
            seconds, start = None, 0.0
            if m == "video":
                video = self._video_time(batch, grid, bsz)
                times[m] = [(sec, 0.0) for sec, _ in video]
                video_t0 = [t0 for _, t0 in video]
            elif m == "audio":
                times[m] = self._audio_time(batch, video_t0, bsz)
            if m in times:
                seconds, start = times[m][0]
            seg_offset = gap(offset, tokens)
            order = self.orders[m][: len(grid)] if len(self.orders[m]) >= len(grid) else "raster"
            seg = Segment(m, grid, seg_offset, order, seconds, start,
                          tile_align=1 if order == "raster" else self.tile_align[m])
            tokens = seg.to_order(self._pre(self.modality_embed(tokens, m)), dim=1)
            pieces.append(tokens)
            pads.append(seg.to_order(pad, dim=1, fill=True))
            segments.append(seg)
            offset = seg.end
        offset = gap(offset, pieces[-1])  # the stream ends on a block too: no kernel tile reads past N
        layout = StreamLayout(tuple(segments), n_global=self.n_global, length=offset)
        tokens = torch.cat(pieces, dim=1)  # (B, N, D)
        pad_mask = torch.cat(pads, dim=1)
        per_sample = None
        if any(len(set(t)) > 1 for t in times.values()):  # samples with different times
            per_sample = tuple(
                StreamLayout(tuple(replace(seg, seconds=times[seg.modality][b][0], start=times[seg.modality][b][1])
                                   if seg.modality in times else seg for seg in segments),
                             n_global=self.n_global, length=offset)
                for b in range(bsz))
        return TokenStream(tokens, layout, pad_mask, per_sample, has_padding)

    # ---------------------------------------------------------------------------------------
    def _pad_mask(self, m, batch, grid, bsz, device) -> tuple[torch.Tensor, bool | None]:
        """((B, n) bool on ``device``, True on padding tokens, in raster order; whether there is
        any). The mask is built where the batch's mask lives: a mask on the host (as the loader
        delivers it) answers "any padding?" without waiting for the device; for a mask already
        on the device the answer is None (the caller asks the device if it must)."""
        n = math.prod(grid)
        mask = batch.get(f"{m}_mask")
        if mask is None or m not in ("video", "audio", "image"):
            return torch.zeros(bsz, n, dtype=torch.bool, device=device), False
        if m == "video":
            kt = self.embeds["video"].tubelet[0]
            vm = torch.nn.functional.pad(mask, (0, grid[0] * kt - mask.shape[1]))  # (B, t * kt)
            real = vm.view(bsz, grid[0], kt).any(-1)  # (B, t)
            pad = (~real)[:, :, None].expand(bsz, grid[0], grid[1] * grid[2]).reshape(bsz, n)
        elif m == "audio":
            st = self.embeds["audio"].stride[1]
            real = mask[:, torch.arange(grid[1], device=mask.device) * st]  # (B, u): first frame of each patch
            pad = (~real)[:, None, :].expand(bsz, grid[0], grid[1]).reshape(bsz, n)
        else:
            pad = (~mask.bool())[:, None].expand(bsz, n)
        padded = bool(pad.any()) if pad.device.type == "cpu" else None
        return pad.to(device, non_blocking=True), padded

    def _video_time(self, batch, grid, bsz: int) -> list[tuple[float, float]]:
        """Per sample: (seconds per video token, time of its first frame in the file).

        A sample's frame spacing is the mean over its real frames, rounded to 0.1 us so that
        clips sampled alike share one layout; samples with fewer than two real frames take the
        first spaced sample's (or the default fps)."""
        kt = self.embeds["video"].tubelet[0]
        times, mask = batch.get("video_times"), batch.get("video_mask")
        spacing: list[float | None] = [None] * bsz
        t0 = [0.0] * bsz
        if isinstance(times, torch.Tensor):
            times = times.detach().double().cpu()
            mask = torch.ones(times.shape, dtype=torch.bool) if mask is None else mask.detach().cpu()
            for b in range(times.shape[0]):
                real = times[b][mask[b]]
                if real.numel() >= 1:
                    t0[b] = float(real[0])
                if real.numel() >= 2 and float(real[-1] - real[0]) > 0:
                    spacing[b] = round(float(real[-1] - real[0]) / (real.numel() - 1), 7)
        first = next((dt for dt in spacing if dt is not None), 1.0 / self.default_fps)
        return [(kt * (dt if dt is not None else first), t0[b]) for b, dt in enumerate(spacing)]

    def _audio_time(self, batch, video_t0: list[float] | None, bsz: int) -> list[tuple[float, float]]:
        """Per sample: (seconds per audio token, time of its first token relative to the
        sample's first video frame)."""
        emb = self.embeds["audio"]
        hop = float(batch.get("audio_hop_seconds") or 0.01)
        start = batch.get("audio_start")
        a0 = [0.0] * bsz
        if isinstance(start, torch.Tensor) and start.numel():
            flat = start.detach().double().cpu().reshape(-1)
            a0 = [float(flat[b if flat.numel() == bsz else 0]) for b in range(bsz)]
        # patch u covers frames [u * st, u * st + pt), frame j centred on a0 + j * hop; the
        # Segment centre is start + (u + 1/2) * st * hop
        pt, st = emb.patch[1], emb.stride[1]
        rel = [a0[b] - (video_t0[b] if video_t0 is not None else a0[b]) for b in range(bsz)]
        return [(st * hop, round(r + ((pt - 1) / 2 - st / 2) * hop, 7)) for r in rel]
