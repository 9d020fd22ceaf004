"""Pretrained initialisation from timm ViTs (mmsparse.models.pretrained), without network.

Each test builds a small timm ViT with random weights (pretrained=False), saves it to a local file
and loads it back through timm's own machinery (create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=...)), or timm's load_state_dict for a bare file).

"Same features": the encoder puts rotary positions into every layer and drops the ViT's absolute
position table, so the two models agree where positions do not enter. The comparisons are exact
computations of the same function: (a) the timm model with its position table set to zero against
the encoder with rotary positions off (its blocks called with rope=None, dense attention), on a
multi-patch image; (b) the real `model.encode` on a one-patch image, whose only grid coordinate is
0 (rotary is the identity there); (c) for a ViT with a learned table left as it is, the patch
embedding and every block one by one. The class token becomes the first global token (n_global=1
here, so both sequences are [class, patches]).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file

from mmsparse.models import CaptionTask
from mmsparse.models.pretrained import (
    PretrainedError, create_initialised, freeze, inflate_patch_embed, load_source, param_groups,
)

# small timm variants: the name picks the family (plain / CLIP pre-norm / LayerScale), the kwargs
# shrink it to CPU-test size
SMALL = dict(embed_dim=64, num_heads=2, depth=2, img_size=64, dynamic_img_size=True)
FAMILIES = {
    "vit": ("vit_small_patch16_224", {}),
    "clip": ("vit_base_patch16_clip_224", {}),          # pre-norm, no patch bias, eps 1e-5
    "layerscale": ("vit_large_patch16_224", {"init_values": 0.5}),   # ls1 / ls2 folded into the weights
}


def _init(name="", checkpoint="", kwargs=None, inflate="central", match=True):
    return SimpleNamespace(timm_model=name, checkpoint=str(checkpoint), timm_kwargs=dict(kwargs or {}),
                           inflate=inflate, match_encoder=match)


def _timm(name: str, extra: dict, zero_pos: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **SMALL, **extra).eval()
    with torch.no_grad():
        for p in m.parameters():  # timm zero-inits biases, the class token and LayerNorms: randomise all
            p.add_(torch.randn_like(p) * 0.05)
        if zero_pos:
            m.pos_embed.zero_()
    return m


def _save(model, path, fmt="safetensors"):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _captioner(init, **overrides):
    kw = dict(n_global=1, schedule="dense", required_modalities=())
    kw.update(overrides)
    model, report = create_initialised("captioner_tiny", kw, init)
    return model.eval(), report


def _no_rope_encode(model, batch):
    """The encoder with rotary positions off: embed, blocks (dense, rope=None), norm; and the layout."""
    stream = model.embed(batch)
    x = stream.tokens
    for blk in model.blocks:
        x = blk(x, None, None)
    return model.norm(x), stream.layout


def _segment_raster(x, layout, modality):
    seg = next(s for s in layout.segments if s.modality == modality)
    return x[:, seg.offset: seg.offset + seg.span][:, seg.raster_to_order()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_path_equals_timm(family, tmp_path):
    name, extra = FAMILIES[family]
    ref = _timm(name, extra)
    path = _save(ref, tmp_path / f"{family}.safetensors")
    model, report = _captioner(_init(name, path, {**SMALL, **extra}))
    assert not report.unexpected, report.unexpected
    assert report.overrides["image_patch"] == 16 and report.overrides["tubelet"] == (2, 16, 16)
    image = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        theirs = ref.forward_features(image)  # (B, 1 + 12, D): class token, patches
        ours, layout = _no_rope_encode(model, {"image": image})
        cls, patches = ours[:, :1], _segment_raster(ours, layout, "image")
    torch.testing.assert_close(cls, theirs[:, :1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(patches, theirs[:, 1:], atol=2e-5, rtol=1e-5)
    assert model.cfg.pre_norm == (family == "clip") and model.cfg.norm_eps == (1e-5 if family == "clip" else 1e-6)


def test_encode_one_patch_equals_timm(tmp_path):
    """The model's own encode (rotary on, identity at coordinate 0) on a 16 x 16 image."""
    name, extra = FAMILIES["clip"]
    ref = _timm(name, extra)
    model, _ = _captioner(_init(name, _save(ref, tmp_path / "clip.safetensors"), {**SMALL, **extra}))
    image = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        memory, pad, _ = model.encode({"image": image})
        theirs = ref.forward_features(image)
    assert memory.shape == theirs.shape == (3, 2, 64) and not pad.any()
    torch.testing.assert_close(memory, theirs, atol=2e-5, rtol=1e-5)


def test_learned_positions_patch_embed_and_blocks(tmp_path):
    """A ViT whose position table is kept: its table is dropped (reported), and the patch embedding
    and every block compute what timm's do."""
    ref = _timm("vit_small_patch16_224", {}, zero_pos=False)
    model, report = _captioner(_init("vit_small_patch16_224", _save(ref, tmp_path / "v.safetensors"), SMALL))
    assert "rotary" in report.dropped["pos_embed"]
    assert report.loaded["embed.global_tokens.weight"].startswith("[0] cls_token + pos_embed[0]")
    image = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        ours, _ = model.embed.embeds["image"](image)
        theirs = ref.patch_embed(image)  # (B, h, w, D)
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-6, rtol=1e-6)
        x = torch.randn(2, 9, 64)
        for mine, blk in zip(model.blocks, ref.blocks):
            torch.testing.assert_close(mine(x, None, None), blk(x), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model.norm(x), ref.norm(x), atol=1e-6, rtol=1e-6)
        g0 = model.embed.global_tokens.weight[0]
        torch.testing.assert_close(g0, ref.cls_token[0, 0] + ref.pos_embed[0, 0])


@pytest.mark.parametrize("inflate", ["central", "average"])
def test_static_clip_gives_image_tokens(inflate, tmp_path):
    ref = _timm("vit_small_patch16_224", {})
    path = _save(ref, tmp_path / "v.safetensors")
    model, report = _captioner(_init("vit_small_patch16_224", path, SMALL, inflate=inflate), video_tile=(1, 4, 4))
    assert inflate in report.loaded["embed.embeds.video.proj.weight"]
    frame = torch.randn(2, 3, 64, 64)
    clip = frame[:, None].expand(2, 4, 3, 64, 64)  # 4 identical frames: 2 tubelets
    with torch.no_grad():
        tokens, grid = model.embed.embeds["video"](clip)
        image_tokens, _ = model.embed.embeds["image"](frame)
        assert grid == (2, 4, 4)
        for t in range(2):
            torch.testing.assert_close(tokens[:, t * 16:(t + 1) * 16], image_tokens, atol=1e-5, rtol=1e-5)
        # through the encoder (positions off): a one-tubelet static clip gives the image model's patch tokens
        ours, layout = _no_rope_encode(model, {"video": clip[:, :2]})
        theirs = ref.forward_features(frame)
        torch.testing.assert_close(_segment_raster(ours, layout, "video"), theirs[:, 1:], atol=2e-5, rtol=1e-5)
        # a moving clip: central sees only the tubelet's middle frame, average the mean of its frames
        a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
        moving, _ = model.embed.embeds["video"](torch.stack([a, b], 1))
        ta, tb = model.embed.embeds["image"](a)[0], model.embed.embeds["image"](b)[0]
        want = tb if inflate == "central" else (ta + tb) / 2
        torch.testing.assert_close(moving, want, atol=1e-5, rtol=1e-5)


def test_inflate_shapes():
    w = torch.randn(8, 3, 4, 4)
    c, a = inflate_patch_embed(w, 3, "central"), inflate_patch_embed(w, 3, "average")
    assert c.shape == a.shape == (8, 3, 3, 4, 4)
    assert torch.equal(c[:, :, 1], w) and not c[:, :, 0].any() and not c[:, :, 2].any()
    torch.testing.assert_close(a.sum(2), w)
    with pytest.raises(PretrainedError, match="model.init.inflate"):
        inflate_patch_embed(w, 2, "first")


def test_bare_checkpoint_file(tmp_path):
    """No timm name: timm's load_state_dict reads the file (.pth here), the shape is read off it;
    the heads are not in a state dict and are reported as assumed."""
    ref = _timm("vit_small_patch16_224", {})
    path = _save(ref, tmp_path / "v.pth", fmt="pth")
    model, report = _captioner(_init("", path), num_heads=2)
    assert "num_heads" in report.source["assumed"] and any("assumed" in n for n in report.notes)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours, layout = _no_rope_encode(model, {"image": image})
        theirs = ref.forward_features(image)
    torch.testing.assert_close(_segment_raster(ours, layout, "image"), theirs[:, 1:], atol=2e-5, rtol=1e-5)


def test_errors_name_what_to_fix(tmp_path, monkeypatch):
    path = _save(_timm("vit_small_patch16_224", {}), tmp_path / "v.safetensors")
    # shape mismatch: the encoder kept at the tiny preset's width (64, match_encoder off), the
    # checkpoint 96 wide
    wide = timm.create_model("vit_small_patch16_224", pretrained=False, embed_dim=96, num_heads=2, depth=2,
                             img_size=32, patch_size=8)
    wide_path = _save(wide, tmp_path / "wide.safetensors")
    with pytest.raises(PretrainedError) as err:
        _captioner(_init("", wide_path, match=False), norm_eps=1e-6)
    msg = str(err.value)
    assert "embed.embeds.image.proj.proj.weight" in msg and "(96, 3, 8, 8)" in msg and "(64, 3, 8, 8)" in msg
    # heads differ: no parameter shape shows it
    with pytest.raises(PretrainedError, match="num_heads: checkpoint 2 vs model 4"):
        _captioner(_init("vit_small_patch16_224", path, SMALL, match=False), num_heads=4, norm_eps=1e-6,
                   tubelet=(2, 16, 16), image_patch=16)
    with pytest.raises(PretrainedError, match="no such file"):
        load_source("vit_small_patch16_224", tmp_path / "absent.safetensors")
    with pytest.raises(PretrainedError, match="not a timm model"):
        load_source("vit_smal_patch16_224", path)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="junk.bin"):
        load_source("", tmp_path / "junk.bin")
    # no file, no network: timm's hub download fails (offline here, so at once) -> what to pass
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedError, match=r"model.init.checkpoint=PATH"):
        load_source("vit_tiny_patch16_224")


def test_training_step_with_layer_decay_and_freeze(tmp_path, batch, tokenizer):
    """Fine-tuning from the checkpoint on real synthetic clips (32 x 32: 2 x 2 patches): frozen
    patch embeddings and first block stay, the rest moves; lr falls by layer_decay per layer."""
    ref = _timm("vit_small_patch16_224", {})
    init = _init("vit_small_patch16_224", _save(ref, tmp_path / "v.safetensors"), SMALL)
    model, report = create_initialised("captioner_tiny", {}, init, tokenizer=tokenizer)
    frozen = freeze(model, patch_embed=True, blocks=1)
    assert "embed.embeds.video.proj.weight" in frozen and "blocks.0.attn.qkv.weight" in frozen
    assert "embed.embeds.audio.proj.weight" not in frozen and "blocks.1.attn.qkv.weight" not in frozen
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["decoder.tok_embed.weight"])] == 1.0
    # timm's ViT grouping: the final norm shares the last block's layer; depth 2 -> stem 0.5 ** 3
    assert scale[id(named["norm.weight"])] == scale[id(named["blocks.1.mlp.fc1.weight"])] == 0.5
    assert scale[id(named["embed.embeds.audio.proj.weight"])] == scale[id(named["embed.global_tokens.weight"])] == 0.125
    assert id(named["blocks.0.attn.qkv.weight"]) not in scale  # frozen: not optimised
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in groups)
    assert all(g["weight_decay"] == 0 for g in groups for p in g["params"] if p.dim() <= 1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model.train()
    loss, _ = CaptionTask(model).training_forward(batch)
    assert math.isfinite(loss.item())
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(after["embed.embeds.video.proj.weight"], before["embed.embeds.video.proj.weight"])
    assert torch.equal(after["blocks.0.mlp.fc1.weight"], before["blocks.0.mlp.fc1.weight"])
    assert not torch.equal(after["blocks.1.mlp.fc1.weight"], before["blocks.1.mlp.fc1.weight"])
    assert not torch.equal(after["decoder.tok_embed.weight"], before["decoder.tok_embed.weight"])


def test_data_normalisation_folded_into_patch_embedding(tmp_path):
    """CLIP weights expect CLIP's (mean, std), the data gives ImageNet's: the patch embedding takes
    the difference, so the same pixels give timm's features."""
    from mmsparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    name, extra = FAMILIES["clip"]
    ref = _timm(name, extra)
    init = _init(name, _save(ref, tmp_path / "clip.safetensors"), {**SMALL, **extra})
    model, report = create_initialised("captioner_tiny", dict(n_global=1, schedule="dense", required_modalities=()),
                                       init, data_norm=(IMAGENET_MEAN, IMAGENET_STD))
    assert any("take the difference" in n for n in report.notes)
    pixels = torch.rand(2, 3, 64, 64)

    def norm(mean, std):
        return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)

    with torch.no_grad():
        ours, layout = _no_rope_encode(model.eval(), {"image": norm(IMAGENET_MEAN, IMAGENET_STD)})
        theirs = ref.forward_features(norm(ref.pretrained_cfg["mean"], ref.pretrained_cfg["std"]))
    torch.testing.assert_close(_segment_raster(ours, layout, "image"), theirs[:, 1:], atol=5e-5, rtol=1e-4)


@pytest.mark.timeout(300)
def test_recipe_trains_from_local_checkpoint(tmp_path):
    """`mmsparse train caption_base_from_vit model.init.checkpoint=PATH` with the tiny variant on
    CPU (the README's line): a few steps from a local timm file, the report in the run folder."""
    from mmsparse.train.logs import read_metrics

    from tests.train.test_whole_run import _env

    ckpt = tmp_path / "vit.safetensors"
    save = [sys.executable, "-m", "mmsparse.models.pretrained", "save", "vit_base_patch16_224", str(ckpt),
            "depth=2", "embed_dim=64", "num_heads=2"]
    out = subprocess.run(save, capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmsparse.train", "caption_base_from_vit", f"model.init.checkpoint={ckpt}",
           "model.init.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2}", "model.name=captioner_tiny",
           "deepspeed.precision=fp32", "data.crop=null", "data.num_frames=8", "data.synth.frames=8",
           "data.synth.size=[32,32]", "data.synth.clips=8", "data.synth.val_clips=2", "data.batch_size=2",
           "data.num_workers=0", "run.steps=3", "optim.warmup_steps=1", "checkpoint.every=0", "eval.batches=1",
           "eval.captions=2", f"run.dir={run}", "run.progress=false", "run.tensorboard=false", "run.plot=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=280)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "pretrained init from vit_base_patch16_224.augreg2_in21k_ft_in1k + " in out.stdout
    report = json.loads((run / "init_report.json").read_text())
    assert report["loaded"]["blocks.1.mlp.fc2.weight"] == "blocks.1.mlp.fc2.weight"
    assert "central" in report["loaded"]["embed.embeds.video.proj.weight"]
    assert report["unexpected"] == [] and "pos_embed" in report["dropped"]
    train = read_metrics(run / "metrics.jsonl", "train")
    assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)
    # the encoder the export describes is the checkpoint's (patch 16), with its weights after training
    exported = json.loads((run / "export" / "config.json").read_text())["config"]
    assert exported["tubelet"] == [2, 16, 16] and exported["norm_eps"] == 1e-6


@pytest.mark.parametrize("name,captioner", [
    ("vit_small_patch16_224", "captioner_small"), ("vit_base_patch16_224", "captioner_base"),
    ("vit_large_patch16_224", "captioner_large"), ("vit_base_patch16_clip_224", "captioner_base"),
])
def test_full_size_architectures_map(name, captioner, monkeypatch):
    """The real timm ViT-S/B/L and CLIP ViT-B/16 onto the registry's captioners, built on the meta
    device (shapes only, no memory): every tensor maps, nothing is left over, the encoder config
    the checkpoint asks for is the variant's but for the norms."""
    from mmsparse.models.timm_weights import Source, _arch_of_model, apply_pretrained, encoder_overrides
    from mmsparse.models.registry import create_model, model_config

    linspace = torch.linspace  # the models' drop-path rates are read as floats: computed on the host
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
        source = Source(dict(ref.state_dict()), _arch_of_model(ref, name), name)
        base = model_config(captioner)
        derived = {k: v for k, v in encoder_overrides(source, base).items() if getattr(base, k) != v}
        model = create_model(captioner, **derived)
    assert set(derived) <= {"norm_eps", "pre_norm", "qk_norm"}, derived
    report = apply_pretrained(model, source)
    depth = model.cfg.depth
    assert report.unexpected == [] and set(report.dropped) == {"pos_embed", "head.weight", "head.bias"}
    assert sum(k.startswith("blocks.") for k in report.loaded) == 12 * depth
    assert model.embed.embeds["video"].proj.weight.shape == (ref.embed_dim, 3, 2, 16, 16)


def test_recipe_config_keys():
    """The recipe's keys in the config tree, and their checks."""
    from mmsparse.train.config import ConfigError, load_config

    cfg = load_config("caption_base_from_vit", ["model.init.checkpoint=/x.safetensors", "model.freeze.blocks=2",
                                                "model.init.timm_kwargs.depth=2"])
    assert cfg.model.init.timm_model.startswith("vit_base_patch16_224") and cfg.model.init.inflate == "central"
    assert cfg.model.init.timm_kwargs == {"depth": 2} and cfg.model.freeze.blocks == 2
    assert cfg.optim.layer_decay == 0.75
    with pytest.raises(ConfigError, match="did you mean 'central'"):
        load_config("caption_base_from_vit", ["model.init.inflate=centre"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config("caption_base_from_vit", ["optim.layer_decay=1.5"])
