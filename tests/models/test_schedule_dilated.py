"""The "tiled_dilated" schedule: odd layers reach far in time with a dilated window at each
token's place, lowered exactly (against the token-by-token oracle) and run by the model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mmsparse.attention import build_layout
from mmsparse.data import longtasks as lt
from mmsparse.models import create_model
from mmsparse.models.schedule import DILATED_WINDOW, layer_pattern

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attention"))
from oracle import oracle_mask  # noqa: E402


def _model(tokenizer=None):
    return create_model("captioner_tiny", tokenizer=tokenizer, modalities=("video", "audio"), schedule="tiled_dilated", depth=4,
                        tubelet=(2, 8, 8), video_tile=(2, 2, 2), video_radius=(1, 0, 0), n_mels=32, audio_patch=16,
                        audio_stride=16, audio_tile=(2, 4), segment_align=1, attn_block=32, max_frames=None,
                        max_audio_frames=None, backend="reference")


def _batch(frames=96):
    spec = lt.TaskSpec(size=16, shape_px=8, distractors=(1, 2))
    plans = [lt.plan("needle", frames, np.random.default_rng(0), spec)]
    return lt.render(plans, spec, seed=0)


def test_odd_layers_lower_exactly_and_reach_far_in_time():
    model = _model()
    with torch.no_grad():
        stream = model.embed(_batch(), required=("video",)).layout
    video = next(s for s in stream.segments if s.modality == "video")
    t = video.shape[0]  # 48 tubelets
    for layer in (1, 3):
        pattern = layer_pattern(model.cfg, layer, stream)
        layout = build_layout(pattern, stream, 32, 32)
        assert torch.equal(layout.dense_mask(), oracle_mask(pattern, stream))
    # layer 3 dilation: min(tile 2 x 4, t // window) tubelets; a token sees its place that far away
    d = min(2 * 4, t // DILATED_WINDOW)
    mask = build_layout(layer_pattern(model.cfg, 3, stream), stream, 32, 32).dense_mask()
    pos = video.positions().view(video.shape)  # stream position of each (t, h, w)
    q = pos[20, 1, 1]
    assert mask[q, pos[20 + d, 1, 1]] and mask[q, pos[20 - d, 1, 1]]
    assert not mask[q, pos[20 + d, 0, 0]]  # another place, outside its own tile: not reached
    even = build_layout(layer_pattern(model.cfg, 2, stream), stream, 32, 32).dense_mask()
    assert not even[q, pos[20 + d, 1, 1]]  # even layers are the plain tiles


def test_model_trains_a_step_with_the_dilated_schedule():
    from mmsparse.eval.longbench import caption_loss, tokenizer

    model = _model(tokenizer())
    loss = caption_loss(model, _batch())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.blocks[1].parameters())
