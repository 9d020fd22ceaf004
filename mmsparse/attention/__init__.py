"""Sparse attention: patterns, stream layouts, the BlockLayout compiler and the backends."""

from .blocklayout import BlockLayout, build_layout
from .patterns import (
    AVSync, LSH, Axial, BlockSparse, Causal, Dense, Fixed, Global, Local, Pattern, Random, Sinks,
    Strided, Tiled, bigbird, longformer, sliding_tile, sliding_window_with_sinks,
    reformer, sparse_transformer, timesformer_divided, video_swin,
)
from .program import MaskProgram
from .stream import Segment, StreamLayout, TokenStream

__all__ = [
    "AVSync", "Axial", "BlockLayout", "BlockSparse", "Causal", "Dense", "Fixed", "Global",
    "LSH", "Local", "MaskProgram", "Pattern", "Random", "Segment", "Sinks", "StreamLayout", "Strided",
    "Tiled", "TokenStream", "bigbird", "build_layout", "longformer", "reformer", "sliding_tile",
    "sliding_window_with_sinks", "sparse_transformer", "timesformer_divided", "video_swin",
]

from .backends import sparse_attention, flex_block_mask  # noqa: E402

__all__ += ["sparse_attention", "flex_block_mask"]
