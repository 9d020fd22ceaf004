"""The captioner: backends agree, KV cache, save / load, bad input, tasks, registry."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mmsparse.models import (
    CaptionTask, ContrastiveTask, ModelConfig, VideoCaptioner, create_model, layer_pattern, list_models,
)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch).float()


@pytest.mark.parametrize("schedule", ["tiled", "tiled_shifted", "tiled_axial", "local", "local_axial"])
def test_every_backend_gives_the_same_output(tiny, batch, schedule):
    """Error budget: each backend's error against the float32 reference is at most twice the
    error of the reference itself run in bfloat16 (plus float32 rounding)."""
    tiny.cfg.schedule = schedule
    tiny.set_backend("reference")
    truth = _logits(tiny, batch)
    low = _logits(tiny.to(torch.bfloat16), {**batch, "video": batch["video"].bfloat16(),
                                             "audio": batch["audio"].bfloat16()})
    tiny.float()
    budget = 2 * (low - truth).abs().max().item() + 1e-5
    assert budget < 1.0
    for backend in ("sdpa", "flex"):
        tiny.set_backend(backend)
        try:
            out = _logits(tiny, batch)
        except (ValueError, NotImplementedError, RuntimeError) as err:
            if backend == "flex":
                pytest.skip(f"flex unavailable on this CPU: {err}")
            raise
        assert (out - truth).abs().max().item() <= budget, backend


def test_sparse_and_dense_differ(tiny, batch):
    # the pattern matters: dense attention gives another function (the test above can fail)
    sparse = _logits(tiny, batch)
    tiny.cfg.schedule = "dense"
    assert (sparse - _logits(tiny, batch)).abs().max() > 1e-3


def test_schedule_covers_modalities(tiny, batch):
    _, _, layout = tiny.encode(batch)
    pattern = layer_pattern(tiny.cfg, 0, layout)
    text = repr(pattern)
    assert "video" in text and "audio" in text and "AVSync" in text and "Global" in text
    no_audio = {k: v for k, v in batch.items() if not k.startswith("audio")}
    _, _, layout2 = tiny.encode(no_audio)
    assert "AVSync" not in repr(layer_pattern(tiny.cfg, 0, layout2))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("cross", ["all", "pooled"])
@pytest.mark.parametrize("beam", [1, 3])
def test_kv_cache_generation_equals_no_cache(tokenizer, batch, beam, cross, qk_norm):
    torch.manual_seed(0)
    model = create_model("captioner_tiny", tokenizer=tokenizer, cross=cross, n_pool=8, qk_norm=qk_norm).eval()
    # the options are really on: pooled cross-attention reads n_pool tokens, qk_norm is a LayerNorm
    assert (model.decoder.pooler is not None) == (cross == "pooled")
    assert isinstance(model.decoder.blocks[0].cross.q_norm, nn.LayerNorm) == qk_norm
    with_cache = model.generate_ids(batch, beam=beam, max_len=12, use_cache=True)
    without = model.generate_ids(batch, beam=beam, max_len=12, use_cache=False)
    assert with_cache == without
    assert any(len(r) > 0 for r in with_cache)


def test_save_load_round_trip(tiny, batch, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    loaded = VideoCaptioner.from_pretrained(tmp_path / "m").eval()
    assert loaded.tokenizer == tiny.tokenizer and loaded.cfg == tiny.cfg
    assert torch.equal(_logits(loaded, batch), _logits(tiny, batch))
    assert loaded.generate(batch, beam=2, max_len=8) == tiny.generate(batch, beam=2, max_len=8)
    # overrides that do not touch the weights
    assert VideoCaptioner.from_pretrained(tmp_path / "m", backend="sdpa").cfg.backend == "sdpa"


def test_corrupt_and_mismatched_files_raise(tiny, tmp_path):
    d = tmp_path / "m"
    tiny.save_pretrained(d)
    weights, config = d / "model.safetensors", d / "config.json"
    good_w, good_c = weights.read_bytes(), config.read_text()

    data = bytearray(good_w)
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        VideoCaptioner.from_pretrained(d)

    weights.write_bytes(good_w[: len(good_w) // 3])  # truncated, checksum not recorded
    meta = json.loads(good_c)
    meta["weights_sha256"] = None
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt safetensors"):
        VideoCaptioner.from_pretrained(d)

    weights.write_bytes(good_w)
    meta["config"]["embed_dim"] = 128
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match config.json"):
        VideoCaptioner.from_pretrained(d)

    config.write_text(good_c[:50])
    with pytest.raises(ValueError, match="corrupt JSON"):
        VideoCaptioner.from_pretrained(d)

    config.write_text(good_c)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        VideoCaptioner.from_pretrained(d)
    with pytest.raises(ValueError, match="not a saved model"):
        VideoCaptioner.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_raise_value_error(tiny, batch):
    no_video = {k: v for k, v in batch.items() if not k.startswith("video")}
    with pytest.raises(ValueError, match="missing modality 'video'"):
        tiny(no_video)
    long = {**batch, "video": torch.zeros(1, 80, 3, 32, 32)}
    with pytest.raises(ValueError, match="max_frames=64"):
        tiny(long)
    with pytest.raises(ValueError, match="28x32"):
        tiny({**batch, "video": torch.zeros(8, 8, 3, 28, 32)})
    with pytest.raises(ValueError, match="video must be"):
        tiny({**batch, "video": torch.zeros(8, 3, 32, 32)})
    with pytest.raises(ValueError, match="max_text_len"):
        tiny.generate(batch, max_len=100)
    with pytest.raises(ValueError, match="unknown model config keys"):
        create_model("captioner_tiny", not_a_knob=1)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("captioner_huge")


def test_caption_task_without_tokenizer_is_clear(batch):
    model = create_model("captioner_tiny")
    with pytest.raises(ValueError, match="no caption tokenizer"):
        CaptionTask(model).training_forward(batch)


def test_tasks_train(tiny, batch):
    tiny.train()
    for task in (CaptionTask(tiny), ContrastiveTask(tiny)):
        loss, metrics = task.training_forward(batch)
        assert torch.isfinite(loss) and set(metrics) >= {"loss"}
        loss.backward()
        assert all(p.grad is not None for p in tiny.blocks.parameters())
        tiny.zero_grad()


def test_blocks_accept_checkpointing_from_outside(tiny, batch):
    tiny.train()
    loss, _ = CaptionTask(tiny).training_forward(batch)
    loss.backward()
    ref = [p.grad.clone() for p in tiny.blocks.parameters()]
    tiny.zero_grad()

    class Ckpt(nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, *args):
            return checkpoint(self.blk, *args, use_reentrant=False)

    for i, blk in enumerate(tiny.blocks):
        tiny.blocks[i] = Ckpt(blk)
    loss2, _ = CaptionTask(tiny).training_forward(batch)
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for g, p in zip(ref, tiny.blocks.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_registry():
    assert {"captioner_tiny", "captioner_small", "captioner_base", "captioner_large"} <= set(list_models())
    cfg = ModelConfig(**{**ModelConfig().to_dict(), "embed_dim": 768})
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    small = create_model("captioner_small", depth=1, dec_depth=1)
    assert small.cfg.embed_dim == 384 and len(small.blocks) == 1 and isinstance(small.blocks, nn.ModuleList)


@pytest.mark.parametrize("schedule", ["tiled_axial", "local", "dense"])
def test_padding_is_never_attended(tiny, batch, schedule):
    """A shorter clip in the batch (its last frames and audio marked padding): whatever the
    padded frames and audio contain, the encoding of every real token is the same, for sparse
    schedules (key_padding_mask through sparse_attention) and the dense SDPA path alike."""
    tiny.cfg.schedule = schedule
    tiny.set_backend("reference")
    short = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    # cut at whole tubelets and audio patches (a patch straddling the cut mixes real and padded
    # frames inside its convolution: the tokenizer's business, not attention's)
    kt, st = tiny.embed.embeds["video"].tubelet[0], tiny.embed.embeds["audio"].stride[1]
    t, m = short["video_mask"].shape[1] // (2 * kt) * kt, short["audio_mask"].shape[1] // (2 * st) * st
    short["video_mask"][1, t:] = False
    short["audio_mask"][1, m:] = False

    def encode(fill: float):
        b = dict(short)
        b["video"], b["audio"] = short["video"].clone(), short["audio"].clone()
        b["video"][1, t:] = fill
        b["audio"][1, :, m:] = fill
        with torch.no_grad():
            memory, pad, _ = tiny.encode(b)
        return memory, pad

    a, pad = encode(0.0)
    b, _ = encode(7.5)
    assert pad[1].any() and not pad[0].all()
    real = ~pad
    assert (a[real] - b[real]).abs().max().item() < 1e-5
    # the padded tokens themselves do change: the test can fail
    assert (a[pad] - b[pad]).abs().max().item() > 1e-3



def test_local_axial_differs_from_local_in_the_axial_layers_only(tiny, batch):
    _, _, layout = tiny.encode(batch)
    cfg = tiny.cfg
    pat = lambda schedule, layer: layer_pattern(type(cfg)(**{**cfg.__dict__, "schedule": schedule}), layer, layout)  # noqa: E731
    assert pat("local_axial", 0) == pat("local", 0) and pat("local_axial", 2) == pat("local", 2)
    odd = repr(pat("local_axial", 1))
    assert "Axial(axes=0, modality='video')" in odd and "Local(" in odd and "Tiled(" not in odd
    assert pat("local_axial", 1) != pat("local", 1)



def test_video_radius_every_gives_the_neighbours_to_every_kth_layer(tiny, batch):
    """video_radius_every = k: layers 0, k, 2k, ... keep video_radius, the others take radius 0
    in video alone (audio keeps its own radius); 1 is every layer; below 1 is refused by name."""
    _, _, layout = tiny.encode(batch)
    cfg = tiny.cfg
    assert cfg.video_radius_every == 1 and any(cfg.video_radius)
    with_every = lambda k: type(cfg)(**{**cfg.__dict__, "video_radius_every": k})  # noqa: E731
    at_r0 = type(cfg)(**{**cfg.__dict__, "video_radius": (0, 0, 0)})
    for layer in range(4):
        assert layer_pattern(with_every(1), layer, layout) == layer_pattern(cfg, layer, layout)
        want = cfg if layer % 2 == 0 else at_r0
        assert layer_pattern(with_every(2), layer, layout) == layer_pattern(want, layer, layout), layer
    assert layer_pattern(cfg, 1, layout) != layer_pattern(at_r0, 1, layout)  # the test can fail
    with pytest.raises(ValueError, match="video_radius_every"):
        with_every(0)


def test_audio_norm_is_saved_and_reaches_the_output(tiny, batch, tmp_path):
    """audio_norm (raw by default) round-trips through config.json and changes the audio tokens."""
    from mmsparse.encoders.patch import AUDIO_NORM

    assert tiny.cfg.audio_norm is None and tiny.embed.embeds["audio"].norm is None
    torch.manual_seed(0)
    normed = create_model("captioner_tiny", tokenizer=tiny.tokenizer, audio_norm=AUDIO_NORM).eval()
    normed.load_state_dict(tiny.state_dict())
    d = tmp_path / "m"
    normed.save_pretrained(d)
    assert tuple(json.loads((d / "config.json").read_text())["config"]["audio_norm"]) == AUDIO_NORM
    loaded = VideoCaptioner.from_pretrained(d).eval()
    assert loaded.cfg.audio_norm == AUDIO_NORM and loaded.embed.embeds["audio"].norm == AUDIO_NORM
    assert torch.equal(_logits(loaded, batch), _logits(normed, batch))
    assert not torch.equal(_logits(normed, batch), _logits(tiny, batch))


def test_audio_floor_is_saved_reaches_the_output_and_older_configs_load_without_it(tiny, batch, tmp_path):
    """audio_floor (off by default) round-trips through config.json, changes the audio tokens,
    and a config saved before the field existed loads with it off."""
    assert tiny.cfg.audio_floor is None and tiny.embed.embeds["audio"].floor is None
    floored = create_model("captioner_tiny", tokenizer=tiny.tokenizer, audio_floor=0.1).eval()
    floored.load_state_dict(tiny.state_dict())
    d = tmp_path / "m"
    floored.save_pretrained(d)
    loaded = VideoCaptioner.from_pretrained(d).eval()
    assert loaded.cfg.audio_floor == 0.1 and loaded.embed.embeds["audio"].floor == 0.1
    assert torch.equal(_logits(loaded, batch), _logits(floored, batch))
    assert not torch.equal(_logits(floored, batch), _logits(tiny, batch))
    cfg = json.loads((d / "config.json").read_text())
    del cfg["config"]["audio_floor"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert VideoCaptioner.from_pretrained(d).cfg.audio_floor is None


def test_compressed_branch_defaults_and_configs_saved_before_it(tiny, tmp_path):
    """The captioners pool one key per 128 positions, at most 256 keys; a config saved before
    the branch (or its bound) existed loads without it (or unbounded), as it ran."""
    from mmsparse.models import ModelConfig

    assert (ModelConfig().compress_block, ModelConfig().compress_keys) == (128, 256)
    assert {(b.attn.compress, b.attn.compress_keys) for b in tiny.blocks} == {(tiny.cfg.compress_block, 256)}
    d = tmp_path / "m"
    tiny.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["config"]["compress_keys"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert VideoCaptioner.from_pretrained(d).cfg.compress_keys == 0
    del cfg["config"]["compress_block"]
    (d / "config.json").write_text(json.dumps(cfg))
    old = VideoCaptioner.from_pretrained(d)
    assert (old.cfg.compress_block, old.cfg.compress_keys) == (0, 0)


def test_tiled_shifted_moves_the_odd_layers_windows(tiny, batch):
    """tiled_shifted: even layers are the tiled schedule's; odd layers shift each tile window by
    half a tile where the grid has more than one tile, and so pair tokens of neighbouring tiles."""
    from mmsparse.attention import Tiled, build_layout

    tiny.cfg.schedule = "tiled_shifted"
    tiny.cfg.video_radius = (0, 0, 0)
    _, _, layout = tiny.encode(batch)
    video = next(s for s in layout.segments if s.modality == "video")
    even, odd = (layer_pattern(tiny.cfg, i, layout) for i in (0, 1))
    shifts = {p.shift for p in even.parts if isinstance(p, Tiled) and p.modality == "video"}
    want = tuple(t // 2 if s > t else 0 for t, s in zip(tiny.cfg.video_tile, video.shape))
    assert shifts == {0} and any(isinstance(p, Tiled) and p.shift == want for p in odd.parts)
    tiny.cfg.schedule = "tiled"
    assert repr(layer_pattern(tiny.cfg, 0, layout)) == repr(even)
    m0 = build_layout(even, layout, 16, 16).dense_mask()
    m1 = build_layout(odd, layout, 16, 16).dense_mask()
    v = video.stream_index()
    assert not torch.equal(m0[v][:, v], m1[v][:, v])
