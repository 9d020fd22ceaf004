"""mmsparse.encoders: from a modality-keyed batch to one TokenStream.

- `TubeletEmbed` (video, Conv3d 2x16x16), `SpectrogramEmbed` (AST 16x16 patches of the log-mel,
  stride 10; `AUDIO_NORM` shifts silence to 0 where a model asks), `ImageEmbed` (timm
  PatchEmbed): raster tokens and their grid.
- `MultimodalTokenizer`: the segments of a sample (any subset of video, audio, image, plus
  learned global tokens) in tile order, with modality embeddings and `Segment.seconds` taken
  from the batch times -> `TokenStream`.
- `normalize_pixels`: uint8 video / image pixels -> the normalised float32 frames, on the
  pixels' device (the embeds call it for a uint8 batch; see the Batch contract in mmsparse.data).
- `rope_cos_sin` / `apply_rope`: 1D / 2D / 3D rotary positions from grid coordinates
  (`stream_coords(layout)`), so clips of any length and size need no interpolated table.
"""

from .multimodal import HOST_KEYS, MODALITIES, MultimodalTokenizer, stream_coords
from .patch import ImageEmbed, SpectrogramEmbed, TubeletEmbed, normalize_pixels
from .rope import apply_rope, axis_pairs, rope_angles, rope_cos_sin

__all__ = [
    "HOST_KEYS", "MODALITIES", "ImageEmbed", "MultimodalTokenizer", "SpectrogramEmbed", "TubeletEmbed",
    "apply_rope", "axis_pairs", "normalize_pixels", "rope_angles", "rope_cos_sin", "stream_coords",
]
