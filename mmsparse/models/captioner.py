"""The multimodal sparse transformer and the video captioning model built on it.

Legend: B batch, K beams, N stream tokens, E encoder channels, L text tokens, V vocabulary.

    batch dict ─► MultimodalTokenizer ─► TokenStream (B, N, E)
               ─► blocks[i](x, BlockLayout of pattern i, rotary)  (pre-norm sparse blocks)
               ─► norm ─► memory (B, N, E) ─► CaptionDecoder ─► logits (B, L, V)

`VideoCaptioner.blocks` is the encoder's ModuleList (activation checkpointing and DeepSpeed
wrap it from outside; `decoder.blocks` likewise). The model is plain PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmsparse.attention import StreamLayout, build_layout
from mmsparse.fileio import atomic_write_text, set_default_mode, sha256_file
from mmsparse.encoders import MODALITIES, MultimodalTokenizer, rope_cos_sin, stream_coords

from .decoder import CaptionDecoder
from .layers import PackedRows, SparseBlock, packed_rows, put_rows, take_rows
from .schedule import SCHEDULES, gap_positions, layer_pattern
from .text import BOS, EOS, PAD, CaptionTokenizer

FORMAT = "mmsparse-captioner"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


@dataclass
class ModelConfig:
    """Everything that defines a VideoCaptioner (saved as config.json)."""

    name: str = "captioner"
    # inputs
    modalities: tuple[str, ...] = ("video", "audio", "image")
    required_modalities: tuple[str, ...] = ("video",)
    tubelet: tuple[int, int, int] = (2, 16, 16)
    audio_patch: int = 16
    audio_stride: int = 10
    n_mels: int = 128
    image_patch: int = 16
    max_frames: int | None = 1024
    max_audio_frames: int | None = 4096
    # log-mel (shift, scale) before the audio patch embedding, (x - shift) / scale; AUDIO_NORM
    # (silence -> 0) is what the long-clip recipes use: a needle tone in long silence is ignored
    # on the raw log-mel. None (default): raw, as every model before it (tiny_cpu's harness bounds
    # were measured raw; on AUDIO_NORM its 200-step run scored CIDEr-D 2.02, not 4.12).
    audio_norm: tuple[float, float] | None = None
    # a quantile q in (0, 1): the log-mel is shifted by each clip's own noise floor per mel band
    # (its q-quantile over time) instead of audio_norm's constant shift, and divided by
    # audio_norm's scale (5 when None). A constant shift is right for one noise level: the
    # long-clip tasks' hiss put every silent band at ~1.5 under the digital-silence shift and
    # the needle's tone was never learnt (bench/probe_tone.py, --audio-floor).
    audio_floor: float | None = None
    # encoder
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    drop_path_rate: float = 0.0
    rope_theta: float = 10000.0
    # LayerNorm eps of the encoder's norms, and a LayerNorm on the embedded tokens before the first
    # block (CLIP's norm_pre): what a pretrained timm ViT needs (pretrained.py; timm's ViTs use
    # 1e-6, its CLIP ViTs 1e-5 and the pre-norm)
    norm_eps: float = 1e-5
    pre_norm: bool = False
    n_global: int = 8
    # attention patterns (see schedule.py)
    schedule: str = "tiled"
    video_tile: tuple[int, int, int] = (4, 4, 8)
    video_radius: tuple[int, int, int] = (1, 1, 1)
    # the video tiles take video_radius in layers l with l % video_radius_every == 0 and radius 0
    # (their own tile) in the others: the neighbours' reach in a few layers, the cost of radius 0
    # in the rest (1: every layer)
    video_radius_every: int = 1
    audio_tile: tuple[int, int] = (4, 32)
    audio_radius: tuple[int, int] = (1, 1)
    image_tile: tuple[int, int] = (8, 8)
    image_radius: tuple[int, int] = (1, 1)
    av_window: float = 0.5
    # sparse layers also attend the mean-pooled keys of every `compress_block` stream positions
    # (a compressed branch, NSA-style; mmsparse/attention/compressed.py): every token sees a
    # coarse view of the whole clip at 1 / compress_block of dense attention's cost. 0: off.
    # On by default: without it the tiled schedule loses the long-clip tasks that need two far
    # times at once (docs/benchmarks.md, E5); one pooled key per video tile (4 x 4 x 8 = 128)
    compress_block: int = 128
    # at most this many pooled keys per clip: past compress_keys x compress_block positions the
    # pooled block grows by whole compress_blocks (attention.compressed.pooled_block), so the
    # branch costs N x compress_keys pairs a layer, linear in N like the sparse layout, instead of
    # N^2 / compress_block (at 1,024 frames on 224 x 224, 843 pooled keys doubled the aligned
    # model's attention pairs). 256 bounds it from ~270 frames of 224 x 224 video on; 0: no bound.
    # The long-clip benchmark's arms run unbounded (at most 133 pooled keys in training).
    compress_keys: int = 256
    attn_block: int = 128
    segment_align: int = 128
    # every tile of a segment starts on a multiple of this (Segment.tile_align; 1: tiles packed).
    # A grid no block-sized tile divides (224 x 224 frames: 14 x 14 patches) then still gets
    # whole blocks, for the price of the padding: (4, 14, 14) video tiles at 64 -> +6 % tokens
    video_tile_align: int = 1
    audio_tile_align: int = 1
    image_tile_align: int = 1
    # run the encoder's norms, projections and MLPs on the real tokens only, attention alone on
    # every stream position (layers.py: packed rows); off under sequence parallelism
    pack_gaps: bool = True
    backend: str = "auto"
    # decoder
    vocab_size: int = 1024
    dec_dim: int = 512
    dec_depth: int = 6
    dec_heads: int = 8
    max_text_len: int = 48
    cross: str = "pooled"
    n_pool: int = 256
    # contrastive head
    proj_dim: int = 256

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        if set(self.modalities) - set(MODALITIES) or set(self.required_modalities) - set(self.modalities):
            raise ValueError(
                f"modalities must be a subset of {MODALITIES} and contain required_modalities; got "
                f"modalities={self.modalities}, required_modalities={self.required_modalities}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.video_radius_every < 1:
            raise ValueError(f"video_radius_every must be >= 1 (1: every layer), got {self.video_radius_every}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must be an even head_dim")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)


@lru_cache(maxsize=32)
def _rope_cpu(layout: StreamLayout, head_dim: int, theta: float):
    return rope_cos_sin(stream_coords(layout), head_dim, theta)


@lru_cache(maxsize=8)
def _rope_on(layout: StreamLayout, head_dim: int, theta: float, device: torch.device):
    """The rotary tables on `device`, kept: a host-to-device copy of (N, D / 2) float32 twice
    a step is a synchronous transfer from pageable memory (~13 MB at 1,024 frames)."""
    return tuple(t.to(device) for t in _rope_cpu(layout, head_dim, theta))


@lru_cache(maxsize=8)
def _gaps_on(layout: StreamLayout, device: torch.device) -> torch.Tensor:
    return gap_positions(layout).to(device)


@lru_cache(maxsize=8)
def _packed_on(layout: StreamLayout, device: torch.device) -> PackedRows | None:
    """The real rows of `layout`'s stream on `device`; None when it has no gaps."""
    gaps = gap_positions(layout)
    if not gaps.any():
        return None
    host = packed_rows(gaps)  # built on the host: the device keeps no sync for it
    return PackedRows(host.index.to(device), host.rows.to(device), host.n)


class VideoCaptioner(nn.Module):
    """Multimodal sparse-attention encoder + caption decoder.

    Args:
        cfg: the ModelConfig.
        tokenizer: the caption tokenizer (needed for captions in and out; saved with the model).
    """

    def __init__(self, cfg: ModelConfig, tokenizer: CaptionTokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = MultimodalTokenizer(
            cfg.embed_dim, cfg.modalities, cfg.tubelet, cfg.audio_patch, cfg.audio_stride, cfg.n_mels,
            cfg.image_patch, cfg.video_tile, cfg.audio_tile, cfg.image_tile, cfg.n_global,
            # a dense model has no blocks to align to: gap tokens would only be padding, and a
            # padding mask keeps SDPA off its flash kernel
            1 if cfg.schedule == "dense" else cfg.segment_align,
            max_frames=cfg.max_frames, max_audio_frames=cfg.max_audio_frames, audio_norm=cfg.audio_norm,
            audio_floor=cfg.audio_floor,
            tile_align=1 if cfg.schedule == "dense" else
            {"video": cfg.video_tile_align, "audio": cfg.audio_tile_align, "image": cfg.image_tile_align},
            pre_norm=cfg.pre_norm, norm_eps=cfg.norm_eps,
        )
        norm_layer = functools.partial(nn.LayerNorm, eps=cfg.norm_eps)
        dpr = [float(r) for r in torch.linspace(0, cfg.drop_path_rate, cfg.depth)]
        self.blocks = nn.ModuleList(
            SparseBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.qk_norm, dpr[i], cfg.backend,
                        compress=cfg.compress_block, compress_keys=cfg.compress_keys, norm_layer=norm_layer)
            for i in range(cfg.depth)
        )
        self.norm = norm_layer(cfg.embed_dim)
        self.decoder = CaptionDecoder(
            cfg.vocab_size, cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.embed_dim, cfg.max_text_len,
            cfg.mlp_ratio, cfg.qk_norm, cfg.cross, cfg.n_pool, cfg.drop_path_rate,
        )
        self.video_proj = nn.Linear(cfg.embed_dim, cfg.proj_dim, bias=False)
        self.text_proj = nn.Linear(cfg.dec_dim, cfg.proj_dim, bias=False)
        # shape (1,), not 0-dim: DeepSpeed's broadcast and ZeRO-3 partitioning view parameters as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.apply(_init_weights)
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # setup -----------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: CaptionTokenizer) -> None:
        if tokenizer.vocab_size > self.cfg.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.cfg.vocab_size}; train the tokenizer with vocab_size <= {self.cfg.vocab_size}"
            )
        self.tokenizer = tokenizer

    def set_backend(self, backend: str) -> None:
        """Attention backend of every encoder block ("auto", "reference", "sdpa", "flex", "triton", "flash")."""
        self.cfg.backend = backend
        for blk in self.blocks:
            blk.attn.backend = backend

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def _need_tokenizer(self) -> CaptionTokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no caption tokenizer: pass tokenizer= to create_model "
                             "or call model.set_tokenizer(CaptionTokenizer.train(captions))")
        return self.tokenizer

    # encoder ---------------------------------------------------------------------------------
    def layer_layouts(self, layout: StreamLayout) -> list:
        """The BlockLayout (or None: dense) of every encoder layer on `layout` (cached)."""
        out = []
        for i in range(self.cfg.depth):
            pattern = layer_pattern(self.cfg, i, layout)
            out.append(None if pattern is None else build_layout(
                pattern, layout, self.cfg.attn_block, self.cfg.attn_block, device=self.device))
        return out

    def encode(self, batch: Mapping[str, Any]):
        """batch -> (memory (B, N, E), pad_mask (B, N), StreamLayout)."""
        stream = self.embed(batch, required=self.cfg.required_modalities)
        rope = _rope_on(stream.layout, self.cfg.embed_dim // self.cfg.num_heads, self.cfg.rope_theta, self.device)
        x = stream.tokens
        pad = stream.pad_mask
        pad = None if pad is None else pad.to(x.device)
        # without padding tokens of shorter clips, no mask for the kernels (SDPA runs flash, the
        # sparse kernels skip the per-key padding test); the alignment gaps need none, their own
        # patterns (Gaps, StreamGlobal) keep them from every real token. Host masks (the loader's)
        # tell without a device sync; masks already on the device cost one
        if pad is not None and (stream.has_padding is False or (
                stream.has_padding is None and not bool((pad & ~_gaps_on(stream.layout, x.device)).any()))):
            pad = None
        groups = stream.groups()
        if len(groups) == 1:
            return self.norm(self._blocks(x, groups[0][0], rope, pad)), stream.pad_mask, stream.layout
        # samples whose times differ (e.g. frame spacings) get their own attention layouts
        out = x
        for layout, idx in groups:
            part = self._blocks(x[idx], layout, rope, None if pad is None else pad[idx])
            out = out.index_copy(0, idx, part)
        return self.norm(out), stream.pad_mask, stream.layout

    def _blocks(self, x, layout: StreamLayout, rope, pad):
        layouts = self.layer_layouts(layout)
        # the gaps carry nothing a real token sees (their patterns isolate them; a dense layer
        # has no gaps to skip): run the blocks on the real rows and give the stream back with
        # zeros at the gaps
        packed = _packed_on(layout, x.device) if self.cfg.pack_gaps and None not in layouts else None
        if packed is None:
            # the compressed branch's block means must skip the gaps, which no mask marks here
            # (passed by position, and only then: wrappers of the blocks may take *args alone)
            real = None
            if self.cfg.compress_block and pad is None and bool(_gaps_on(layout, torch.device("cpu")).any()):
                real = ~_gaps_on(layout, x.device)
            for blk, lay in zip(self.blocks, layouts):
                x = blk(x, lay, rope, pad) if real is None else blk(x, lay, rope, pad, None, real)
            return x
        h = take_rows(x, packed)
        for blk, lay in zip(self.blocks, layouts):
            h = blk(h, lay, rope, pad, packed)
        return put_rows(h, packed)

    def forward(self, batch: Mapping[str, Any], ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) for caption ids (B, L) (default: the batch captions
        with <bos>, so logits[:, i] predicts token i + 1)."""
        memory, pad, _ = self.encode(batch)
        if ids is None:
            ids = self.tokenize(batch)[:, :-1]
        return self.decoder(ids.to(self.device), memory, pad)

    def tokenize(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """ids (B, L) of batch["caption"]: <bos> text <eos> <pad>..."""
        caps = batch.get("caption")
        if not isinstance(caps, (list, tuple)) or not all(isinstance(c, str) for c in caps):
            raise ValueError("batch['caption'] must be a list of strings for captioning")
        return self._need_tokenizer().batch(list(caps), self.cfg.max_text_len, self.device)

    # contrastive -----------------------------------------------------------------------------
    def media_embedding(self, batch) -> torch.Tensor:
        """(B, proj_dim) unit vectors: the mean of the real encoder tokens, projected."""
        memory, pad, _ = self.encode(batch)
        keep = (~pad).to(memory.dtype)[..., None]  # (B, N, 1)
        pooled = (memory * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(self.video_proj(pooled), dim=-1)

    def text_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, proj_dim) unit vectors (decoder run as a text-only causal encoder)."""
        return F.normalize(self.text_proj(self.decoder.text_features(ids.to(self.device))), dim=-1)

    # generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, batch, beam: int = 1, max_len: int = 32, length_penalty: float = 1.0,
                     use_cache: bool = True, encoded: tuple | None = None) -> list[list[int]]:
        """Greedy (beam=1) or beam search, batched; returns the token ids of each clip (no <bos>,
        cut at <eos>). Hypotheses are ranked by sum of log-probs / length ** length_penalty.
        `encoded`: `encode(batch)`'s result when the caller has it already (the batch is then
        not encoded again)."""
        if beam < 1 or max_len < 1:
            raise ValueError(f"beam and max_len must be >= 1, got beam={beam}, max_len={max_len}")
        if max_len + 1 > self.cfg.max_text_len:
            raise ValueError(f"max_len={max_len} exceeds the decoder's max_text_len - 1 = {self.cfg.max_text_len - 1}")
        memory, pad, _ = self.encode(batch) if encoded is None else encoded
        dec = self.decoder
        mem, mpad = dec.prepare_memory(memory, pad)
        b, k = mem.shape[0], beam
        mem = mem.repeat_interleave(k, 0)  # (B K, N, E)
        mpad = None if mpad is None else mpad.repeat_interleave(k, 0)
        cache = dec.init_cache(mem, mpad, prepared=True) if use_cache else None
        dev = mem.device
        tokens = torch.full((b * k, 1), BOS, dtype=torch.long, device=dev)
        sums = torch.zeros(b, k, device=dev)
        sums[:, 1:] = -math.inf  # one live beam at the start, so the first step's picks differ
        sums = sums.view(-1)
        lengths = torch.zeros(b * k, device=dev)
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        base = (torch.arange(b, device=dev) * k)[:, None]  # (B, 1)
        for step in range(max_len):
            if use_cache:
                logits = dec.step(tokens[:, -1:], cache, step)  # (B K, V)
            else:
                logits = dec(tokens, mem, mpad, prepared=True)[:, -1]
            logp = F.log_softmax(logits.float(), dim=-1)
            logp[:, PAD] = -math.inf
            logp[:, BOS] = -math.inf
            logp[done] = -math.inf
            logp[done, PAD] = 0.0  # a finished hypothesis only extends with padding, for free
            cand = sums[:, None] + logp  # (B K, V)
            new_len = lengths + (~done).float()  # (B K,)
            score = cand / new_len.clamp(min=1)[:, None] ** length_penalty
            v = cand.shape[-1]
            top = score.view(b, k * v).topk(k, dim=-1).indices  # (B, K)
            rows = (base + top // v).view(-1)  # (B K,) source hypothesis of each new beam
            tok = (top % v).view(-1)
            sums = cand.view(b, k * v).gather(1, top).view(-1)
            lengths, done = new_len[rows], done[rows] | (tok == EOS)
            tokens = torch.cat([tokens[rows], tok[:, None]], dim=1)
            if use_cache:
                dec.reorder_cache(cache, rows)
            if bool(done.all()):
                break
        final = (sums / lengths.clamp(min=1) ** length_penalty).view(b, k)
        best = final.argmax(-1) + base[:, 0]
        out = []
        for row in tokens[best, 1:].tolist():
            out.append(row[: row.index(EOS)] if EOS in row else row)
        return out

    def generate(self, batch, beam: int = 1, max_len: int = 32, length_penalty: float = 1.0,
                 use_cache: bool = True, encoded: tuple | None = None) -> list[str]:
        """Captions (one string per clip): greedy with beam=1, else beam search (`encoded`: as
        in `generate_ids`)."""
        tok = self._need_tokenizer()
        was = self.training
        self.eval()
        try:
            ids = self.generate_ids(batch, beam, max_len, length_penalty, use_cache, encoded)
        finally:
            self.train(was)
        return [tok.decode(r) for r in ids]

    # save / load -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write model.safetensors, config.json (with the weights' sha256) and tokenizer.json,
        each atomically (temporary file + rename)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if k != "decoder.head.weight"}  # tied to decoder.tok_embed.weight
        tmp = d / (WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": FORMAT})
        set_default_mode(tmp)  # safetensors creates its file as 0600
        digest = sha256_file(tmp)
        os.replace(tmp, d / WEIGHTS)
        if self.tokenizer is not None:
            atomic_write_text(d / TOKENIZER, self.tokenizer.to_str())
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": type(self).__name__,
                "weights_sha256": digest, "has_tokenizer": self.tokenizer is not None,
                "config": self.cfg.to_dict()}
        atomic_write_text(d / CONFIG, json.dumps(meta, indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location="cpu", **overrides) -> "VideoCaptioner":
        """Load what save_pretrained wrote. `overrides` replace config fields that do not change
        the weights (e.g. backend="sdpa", max_frames=4096). ValueError on a missing, corrupt or
        mismatched file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
            raise ValueError(f"{d}: not a saved model (expected {CONFIG} and {WEIGHTS})")
        try:
            meta = json.loads((d / CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{d / CONFIG}: corrupt JSON ({err})") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{d / CONFIG}: not an mmsparse captioner config (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d / CONFIG}: format_version {meta.get('format_version')} is not the supported {FORMAT_VERSION}")
        # a config saved before the compressed branch existed ran without it (it has no weights)
        # (and one saved before the bound existed pooled without one)
        cfg = ModelConfig.from_dict({"compress_block": 0, "compress_keys": 0, **meta["config"], **overrides})
        digest = sha256_file(d / WEIGHTS)
        if meta.get("weights_sha256") and digest != meta["weights_sha256"]:
            raise ValueError(
                f"{d / WEIGHTS}: checksum mismatch (sha256 {digest[:12]}..., config.json expects "
                f"{meta['weights_sha256'][:12]}...): the weights file is corrupt or belongs to another model"
            )
        try:
            state = load_file(str(d / WEIGHTS), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{d / WEIGHTS}: corrupt safetensors file ({err})") from err
        tokenizer = None
        if (d / TOKENIZER).is_file():
            tokenizer = CaptionTokenizer.load(d / TOKENIZER)
        elif meta.get("has_tokenizer"):
            raise ValueError(f"{d}: config.json says a tokenizer was saved but {TOKENIZER} is missing")
        model = cls(cfg, tokenizer)
        expected = {k: v for k, v in model.state_dict().items() if k != "decoder.head.weight"}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{d / WEIGHTS} does not match config.json: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model.to(map_location)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

