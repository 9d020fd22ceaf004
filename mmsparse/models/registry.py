"""Model registry in timm's style: a variant is a few lines of config.

    model = create_model("captioner_base", tokenizer=tok, schedule="dense")
"""

from __future__ import annotations

from typing import Callable

from .captioner import ModelConfig, VideoCaptioner

_REGISTRY: dict[str, Callable[..., VideoCaptioner]] = {}


def register_model(fn: Callable[..., VideoCaptioner]) -> Callable[..., VideoCaptioner]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, tokenizer=None, **overrides) -> VideoCaptioner:
    """Build a registered model; `overrides` replace ModelConfig fields (ValueError if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    return _REGISTRY[name](tokenizer=tokenizer, **overrides)


# The ModelConfig fields of each built-in variant (the rest are ModelConfig's defaults).
_PRESETS: dict[str, dict] = {}


def model_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig that ``create_model(name, **overrides)`` builds, without building the model
    (ValueError for an unknown name or field, or values ModelConfig rejects)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    if name in _PRESETS:
        return ModelConfig.from_dict({"name": name, **_PRESETS[name], **overrides})
    return _REGISTRY[name](**overrides).cfg  # a variant registered from outside, without a preset


def _build(name: str, tokenizer, overrides: dict) -> VideoCaptioner:
    return VideoCaptioner(model_config(name, **overrides), tokenizer)


_PRESETS["captioner_tiny"] = dict(
    embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, tubelet=(2, 8, 8), audio_patch=16, audio_stride=16,
    image_patch=8, video_tile=(2, 2, 4), video_radius=(1, 1, 1), audio_tile=(4, 8), image_tile=(4, 4),
    n_global=2, attn_block=32, segment_align=1, max_frames=64, max_audio_frames=2048,
    dec_dim=64, dec_depth=2, dec_heads=2, vocab_size=512, max_text_len=32, cross="all", proj_dim=32,
)


@register_model
def captioner_tiny(tokenizer=None, **kw) -> VideoCaptioner:
    """CPU tests: 32x32 frames, 2 + 2 layers of width 64."""
    return _build("captioner_tiny", tokenizer, kw)


_PRESETS["captioner_small"] = dict(
    embed_dim=384, depth=12, num_heads=6, dec_dim=384, dec_depth=4, dec_heads=6,
)


@register_model
def captioner_small(tokenizer=None, **kw) -> VideoCaptioner:
    return _build("captioner_small", tokenizer, kw)


_PRESETS["captioner_base"] = dict(
    embed_dim=768, depth=12, num_heads=12, dec_dim=512, dec_depth=6, dec_heads=8,
)


@register_model
def captioner_base(tokenizer=None, **kw) -> VideoCaptioner:
    """ViT-B encoder (12 x 768, 12 heads) + 6-layer 512-wide decoder on 256 pooled tokens."""
    return _build("captioner_base", tokenizer, kw)


# Block-aligned tiles for 224 x 224 frames (14 x 14 patch grids, which no 128-token tile divides):
# (4, 14, 14) video tiles (8 frames x the whole frame) each padded to 13 whole 64-token blocks
# (`Segment.tile_align`), radius 0; audio (12, 5) tiles (all 12 mel rows x 50 ms) padded the same,
# with the two neighbouring tiles in time. A video tile's block pairs are full except those of its
# 13th block (16 tokens + 48 padding), so the sparse layers run near the kernels' dense speed
# per computed block. E1 at 64 frames x 8 clips on an H200:
# 1.82x the dense model's step against 1.25x for the (4, 4, 8) default (bench/NOTES.md,
# v10-v12). Narrower reach per layer than the default (784 tokens of video against 3,456); the
# global tokens and AVSync connect the tiles, and schedule="tiled_shifted" adds Video Swin's
# shifted windows in odd layers (1.80x).
BLOCK_ALIGNED_224 = dict(
    video_tile=(4, 14, 14), video_radius=(0, 0, 0), video_tile_align=64,
    audio_tile=(12, 5), audio_radius=(0, 2), audio_tile_align=64,
    attn_block=64, segment_align=64,
)


_PRESETS["captioner_base_aligned"] = dict(
    embed_dim=768, depth=12, num_heads=12, dec_dim=512, dec_depth=6, dec_heads=8, **BLOCK_ALIGNED_224,
)


@register_model
def captioner_base_aligned(tokenizer=None, **kw) -> VideoCaptioner:
    """`captioner_base` with the block-aligned tiles of BLOCK_ALIGNED_224 (224 x 224 frames)."""
    return _build("captioner_base_aligned", tokenizer, kw)


_PRESETS["captioner_large"] = dict(
    embed_dim=1024, depth=24, num_heads=16, dec_dim=768, dec_depth=6, dec_heads=12, qk_norm=True,
)


@register_model
def captioner_large(tokenizer=None, **kw) -> VideoCaptioner:
    return _build("captioner_large", tokenizer, kw)
