"""Patch embeddings of each modality: video tubelets, audio spectrogram patches, image patches.

Legend: B batch, T frames, C channels, H x W frame size, M mel bins, Tm audio frames,
D embed dim, (t, h, w) / (f, u) / (h, w) token grids of video / audio / image.

Each returns tokens in raster order of its grid plus the grid; `MultimodalTokenizer` puts them
in tile order (`Segment.to_order`).

Video and image embeds take float frames (already normalised) or uint8 pixels, which they
normalise on the pixels' device with `normalize_pixels` and the data's (mean, std) (the batch's
`pixel_norm`, see `mmsparse.data`), giving the float path's numbers. The audio embed can shift
and scale the log-mel (``AUDIO_NORM``: silence -> 0, as the video background is ~0), or
subtract each clip's own noise floor per mel band (``floor``, a low quantile over time).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed

from mmsparse.pixels import normalize_pixels


# (shift, scale) of the log-mel before the spectrogram patch embedding: (x - shift) / scale. shift
# is the log-mel of silence (log of ``mmsparse.data.audio.log_mel``'s eps, 1e-6), so silence is 0
# and a token is the sound in it. Fed raw, every silent patch was 256 values of -13.8: one large
# offset shared by all audio tokens (trained token norm ~460 against ~1.6 for video), and the
# long-clip captioners ignored the audio entirely (a 1-second tone in 4-32 s: tone accuracy at
# chance, swapping clips' audio changed no log-prob by more than 2e-4; with this: tone 1.00).
# scale keeps a tone's peak (log-mel ~8) near 4. Opt-in (ModelConfig.audio_norm, the longclip
# recipes): tiny_cpu's 200-step run, whose tone fills a third of the clip, did worse with it.
AUDIO_NORM = (math.log(1e-6), 5.0)


def _triple(v) -> tuple[int, int, int]:
    return (v,) * 3 if isinstance(v, int) else tuple(int(x) for x in v)


def _pair(v) -> tuple[int, int]:
    return (v,) * 2 if isinstance(v, int) else tuple(int(x) for x in v)


def _check_dtype(name: str, x: torch.Tensor) -> None:
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"{name} must be float frames or uint8 pixels, got dtype {x.dtype}")


class TubeletEmbed(nn.Module):
    """Video (B, T, C, H, W) -> tokens (B, t * h * w, D) raster, grid (t, h, w).

    T is zero-padded up to a multiple of the tubelet's length; H and W must be multiples of
    the patch size (a ValueError names the frame shape otherwise). Float frames go in as they
    are; uint8 pixels are normalised first (`normalize_pixels` with ``norm`` and the (B, T)
    frame ``mask``), which float frames do not need.

    ``proj`` is a Conv3d with kernel == stride (non-overlapping tubelets, no padding), kept as
    such so checkpoints (``proj.weight`` (D, C, kt, kh, kw), ``proj.bias``) load unchanged, but
    the forward computes it as what it is: a patchify + linear. The frames are gathered into
    (B, t, h, w, C * kt * kh * kw) patches in the weight's (C, kt, kh, kw) flatten order and
    multiplied by the (D, C * kt * kh * kw) weight: the same numbers up to float rounding, as one
    matmul (~1 ms) where cuDNN's 3D convolution forward + weight gradient took ~10 ms per step at
    512 frames of 224x224 and ~20 ms at 1,024 (captioner_base profile, bf16 autocast, H200).
    """

    def __init__(self, tubelet=(2, 16, 16), in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.tubelet = _triple(tubelet)
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.tubelet, stride=self.tubelet)

    def check(self, video: torch.Tensor) -> None:
        kt, kh, kw = self.tubelet
        if video.dim() != 5 or video.shape[2] != self.in_chans:
            raise ValueError(
                f"video must be (B, T, C={self.in_chans}, H, W) frames, got shape {tuple(video.shape)}"
            )
        _check_dtype("video", video)
        h, w = video.shape[-2:]
        if h % kh or w % kw:
            raise ValueError(
                f"video frames are {h}x{w}, which is not a multiple of the {kh}x{kw} tubelet patch "
                f"(expected H % {kh} == 0 and W % {kw} == 0; crop or resize in the data config)"
            )

    def forward(self, video: torch.Tensor, norm=None, mask: torch.Tensor | None = None):
        self.check(video)
        if video.dtype == torch.uint8:
            video = normalize_pixels(video, norm, mask)  # (B, T, C, H, W) float32
        kt, kh, kw = self.tubelet
        weight = self.proj.weight  # (D, C, kt, kh, kw)
        bsz, frames, c, hh, ww = video.shape
        t, h, w = -(-frames // kt), hh // kh, ww // kw
        # the dtype the matmul runs in: autocast's (the video is cast before it is gathered, so
        # the gather below moves half the bytes), else the weight's, as Conv3d was fed before.
        # is_autocast_enabled raises on devices without autocast (meta); is_autocast_available,
        # which tells, is a graph break under torch.compile, where it is not needed
        dev = video.device.type
        if ((torch.compiler.is_compiling() or torch.amp.is_autocast_available(dev))
                and torch.is_autocast_enabled(dev)):
            dtype = torch.get_autocast_dtype(dev)
        else:
            dtype = weight.dtype
        x = video.to(dtype)

        def tubelets(v: torch.Tensor) -> torch.Tensor:
            """(B, n * kt, C, H, W) -> view (B, n, h, w, C, kt, kh, kw): no copy (only splits)."""
            return v.view(bsz, v.shape[1] // kt, kt, c, h, kh, w, kw).permute(0, 1, 4, 6, 3, 2, 5, 7)

        full, rest = frames // kt, frames % kt
        if not rest:  # the one copy of the video: into patch order
            patches = tubelets(x).reshape(bsz, t, h, w, c * kt * kh * kw)
        else:  # T zero-padded to t * kt inside that same copy: whole tubelets, then the last one
            buf = x.new_empty((bsz, t, h, w, c, kt, kh, kw))
            buf[:, :full] = tubelets(x[:, :full * kt])
            last = x[:, full * kt:].view(bsz, rest, c, h, kh, w, kw).permute(0, 3, 5, 2, 1, 4, 6)
            buf[:, full, :, :, :, :rest] = last  # (B, h, w, C, rest, kh, kw)
            buf[:, full, :, :, :, rest:] = 0
            patches = buf.view(bsz, t, h, w, c * kt * kh * kw)
        x = F.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)  # (B, t, h, w, D)
        return x.flatten(1, 3), (t, h, w)  # (B, t*h*w, D)


def band_floor(audio: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The q-quantile over time of each mel band of each clip, over its real frames:
    audio (B, M, Tm), mask (B, Tm) True on real frames (None: all) -> (B, M, 1) float32 (0 for a
    clip without a real frame). The lower order statistic, no interpolation."""
    x = audio.float()
    b, _, tm = x.shape
    if mask is None:
        real = torch.full((b,), tm, device=x.device)
    else:
        mask = mask.to(x.device)
        x = x.masked_fill(~mask[:, None, :], math.inf)  # padded frames sort last
        real = mask.sum(1)
    k = (q * (real - 1).clamp(min=0)).floor().long()  # (B,)
    low = x.sort(dim=-1).values.gather(-1, k.view(b, 1, 1).expand(b, x.shape[1], 1))
    return torch.where((real > 0).view(b, 1, 1), low, torch.zeros_like(low))


class SpectrogramEmbed(nn.Module):
    """Log-mel (B, M, Tm) -> tokens (B, f * u, D) raster, grid (f, u) (AST: 16 x 16 patches,
    stride 10 by default, so patches overlap). ``norm`` = (shift, scale): the log-mel is embedded
    as ``(x - shift) / scale`` (``AUDIO_NORM``: silence -> 0); None (default) embeds it raw.
    ``floor`` = q in (0, 1): the shift is instead each clip's own noise floor per mel band, the
    q-quantile over its real frames (``band_floor``), so the background embeds near 0 whatever
    its level (a constant shift is right for one noise level only), divided by norm's scale
    (``AUDIO_NORM``'s when norm is None)."""

    def __init__(self, patch=16, stride=10, n_mels: int = 128, embed_dim: int = 768,
                 norm: tuple[float, float] | None = None, floor: float | None = None):
        super().__init__()
        self.patch, self.stride, self.n_mels = _pair(patch), _pair(stride), n_mels
        if norm is not None and (len(norm) != 2 or not float(norm[1])):
            raise ValueError(f"norm must be (shift, scale) with scale non-zero, got {norm!r}")
        if floor is not None and not 0.0 < float(floor) < 1.0:
            raise ValueError(f"floor must be a quantile in (0, 1) (e.g. 0.1), got {floor!r}")
        self.norm = None if norm is None else (float(norm[0]), float(norm[1]))
        self.floor = None if floor is None else float(floor)
        if n_mels < self.patch[0]:
            raise ValueError(f"n_mels={n_mels} is smaller than the audio patch {self.patch}")
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=self.patch, stride=self.stride)

    def grid(self, frames: int) -> tuple[int, int]:
        (pf, pt), (sf, st) = self.patch, self.stride
        return (self.n_mels - pf) // sf + 1, (frames - pt) // st + 1

    def check(self, audio: torch.Tensor) -> None:
        if audio.dim() != 3 or audio.shape[1] != self.n_mels:
            raise ValueError(f"audio must be (B, M={self.n_mels}, Tm) log-mel, got shape {tuple(audio.shape)}")
        if audio.shape[2] < self.patch[1]:
            raise ValueError(
                f"audio has Tm={audio.shape[2]} frames, fewer than one {self.patch[1]}-frame patch"
            )

    def forward(self, audio: torch.Tensor, mask: torch.Tensor | None = None):
        """audio (B, M, Tm); mask (B, Tm) True on real frames (read by ``floor`` only)."""
        self.check(audio)
        x = audio[:, None]
        if self.floor is not None:  # in float32, also for bf16 / fp16 features, then cast
            scale = (self.norm or AUDIO_NORM)[1]
            x = (x.float() - band_floor(audio, self.floor, mask)[:, None]) * (1.0 / scale)
        elif self.norm is not None:
            x = (x.float() - self.norm[0]) * (1.0 / self.norm[1])
        x = self.proj(x.to(self.proj.weight.dtype))  # (B, D, f, u)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # (B, f*u, D)


class ImageEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, h * w, D) raster, grid (h, w), through timm's PatchEmbed
    (any size that is a multiple of the patch). uint8 pixels are normalised first
    (`normalize_pixels` with ``norm`` and the (B,) ``mask`` of real images)."""

    def __init__(self, patch: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch, self.in_chans = _pair(patch), in_chans
        self.proj = PatchEmbed(img_size=None, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
                               strict_img_size=False, output_fmt="NHWC", flatten=False)

    def check(self, image: torch.Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != self.in_chans:
            raise ValueError(f"image must be (B, C={self.in_chans}, H, W), got shape {tuple(image.shape)}")
        _check_dtype("image", image)
        h, w = image.shape[-2:]
        if h % self.patch[0] or w % self.patch[1]:
            raise ValueError(f"image is {h}x{w}, not a multiple of the {self.patch} patch")

    def forward(self, image: torch.Tensor, norm=None, mask: torch.Tensor | None = None):
        self.check(image)
        if image.dtype == torch.uint8:
            image = normalize_pixels(image, norm, mask)  # (B, C, H, W) float32
        x = self.proj(image.to(self.proj.proj.weight.dtype))  # (B, h, w, D)
        grid = tuple(x.shape[1:3])
        return x.flatten(1, 2), grid  # (B, h*w, D)
