"""captioner_base_aligned: block-aligned tiles on the 14 x 14 patch grids of 224 x 224 frames."""

from __future__ import annotations

import pytest
import torch

from mmsparse.attention import Tiled, build_layout
from mmsparse.models import CaptionTokenizer, create_model
from mmsparse.models.registry import BLOCK_ALIGNED_224

# the encoder's geometry as in captioner_base; width and depth cut so the CPU builds it fast
SMALL = dict(depth=2, embed_dim=64, num_heads=1, dec_depth=1, dec_dim=64, dec_heads=1, max_frames=64)


def _clip():  # 64 frames of 224 x 224 and 10.24 s of log-mel, as in E1
    return {"video": torch.zeros(1, 64, 3, 224, 224), "video_times": torch.arange(64, dtype=torch.float64)[None] / 8,
            "audio": torch.zeros(1, 128, 1024), "audio_start": torch.zeros(1, dtype=torch.float64),
            "audio_hop_seconds": 0.01}


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer.train(["a red circle moves left", "a high tone plays"], vocab_size=300)


def _layouts(name, tok):
    model = create_model(name, tokenizer=tok, **SMALL)
    with torch.no_grad():
        stream = model.embed(_clip())
    return model, stream.layout, model.layer_layouts(stream.layout)


def test_aligned_video_tiles_fill_whole_blocks(tok):
    model, stream, layers = _layouts("captioner_base_aligned", tok)
    assert {k: getattr(model.cfg, k) for k in BLOCK_ALIGNED_224} == BLOCK_ALIGNED_224
    video = next(s for s in stream.segments if s.modality == "video")
    assert video.shape == (32, 14, 14) and video.tile_align == 64 and video.offset % 64 == 0
    # 8 tiles of 784 tokens (4 x 14 x 14), each on 13 blocks of 64 that no other tile shares: 12
    # full blocks and one of 16 tokens + 48 padding, so 144 full block pairs a tile, 25 partial
    tiles = build_layout(Tiled((4, 14, 14), 0, modality="video"), stream, 64, 64)
    assert (tiles.num_full, tiles.num_partial) == (8 * 144, 8 * 25)
    assert tiles.attended_pairs() == 8 * 784 * 784
    # the 6 % of tile padding buys a higher utilization of the whole layer than the default's
    _, _, default = _layouts("captioner_base", tok)
    util = [lay.attended_pairs() / lay.computed_pairs() for lay in layers]
    util_default = [lay.attended_pairs() / lay.computed_pairs() for lay in default]
    assert min(util) > 0.65 and max(util_default) < 0.62, (util, util_default)
    assert stream.length == 8064


def test_aligned_model_trains_one_step(tok):
    """The aligned geometry end to end on a short clip: finite loss, gradients reach the encoder."""
    from mmsparse.models import CaptionTask

    torch.manual_seed(0)
    model = create_model("captioner_base_aligned", tokenizer=tok, **SMALL)
    batch = {"video": torch.randn(1, 8, 3, 224, 224), "video_times": torch.arange(8, dtype=torch.float64)[None] / 8,
             "audio": torch.randn(1, 128, 200), "audio_start": torch.zeros(1, dtype=torch.float64),
             "audio_hop_seconds": 0.01, "caption": ["a red circle moves left"]}
    loss, _ = CaptionTask(model).training_forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.embed.embeds["video"].proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
