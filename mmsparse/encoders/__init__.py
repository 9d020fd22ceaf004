"""mmsparse.encoders: from a modality-keyed batch to one TokenStream.

- `TubeletEmbed` (video, Conv3d 2x16x16), `SpectrogramEmbed` (AST 16x16 patches of the log-mel,
  stride 10), `ImageEmbed` (timm PatchEmbed): raster tokens and their grid.
- `MultimodalTokenizer`: the segments of a sample (any subset of video, audio, image, plus
  learned global tokens) in tile order, with modality embeddings and `Segment.seconds` taken
  from the batch times -> `TokenStream`.
- `rope_cos_sin` / `apply_rope`: 1D / 2D / 3D rotary positions from grid coordinates
  (`stream_coords(layout)`), so clips of any length and size need no interpolated table.
"""

from .multimodal import MODALITIES, MultimodalTokenizer, stream_coords
from .patch import ImageEmbed, SpectrogramEmbed, TubeletEmbed
from .rope import apply_rope, axis_pairs, rope_angles, rope_cos_sin

__all__ = [
    "MODALITIES", "ImageEmbed", "MultimodalTokenizer", "SpectrogramEmbed", "TubeletEmbed",
    "apply_rope", "axis_pairs", "rope_angles", "rope_cos_sin", "stream_coords",
]
