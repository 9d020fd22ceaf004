"""A timm ViT's weights mapped onto the multimodal sparse encoder: the source (state dict and
architecture, through timm's own loaders), the key mapping, the init report. The flow, building and
fine-tuning helpers: ``mmsparse.models.pretrained``.

Legend: D embed dim, C channels, p patch size, kt tubelet length, G global tokens, R registers.

What goes where (timm VisionTransformer -> VideoCaptioner)::

    patch_embed.proj (D, C, p, p)  -> embed.embeds.image.proj.proj          exact
                                   -> embed.embeds.video.proj (D, C, kt, p, p)  inflated: "central"
                                      (the 2D filter on the tubelet's middle frame kt // 2, zeros on
                                      the others, ViViT) or "average" (filter / kt on every frame, I3D);
                                      either gives a static clip the image's patch tokens
    norm_pre (CLIP)                -> embed.norm_pre                        (ModelConfig.pre_norm)
    cls_token (+ pos_embed[0])     -> embed.global_tokens.weight[0]        the other global tokens:
    reg_token (R registers)        -> embed.global_tokens.weight[1:1+R]    their own initialisation
    blocks.i.{norm1, attn.qkv, attn.q_norm, attn.k_norm, attn.proj, norm2, mlp.fc1, mlp.fc2}
                                   -> blocks.i.same                        one to one; LayerScale
                                      (ls1 / ls2 gamma) folded into attn.proj / mlp.fc2
    norm                           -> norm                                  the encoder's final norm
    pos_embed                      dropped (below)
    head, fc_norm, attn_pool       dropped: the captioner has its own decoder
    modality_embed rows of video and image: zeroed, so pretrained tokens enter unchanged

Absolute position embeddings are dropped, not interpolated: the encoder positions every token by
rotary embeddings of its (t, h, w) / (f, u) / (h, w) grid coordinates in every layer (relative,
defined for any clip length and frame size). The ViT's learned table is one frame's 14 x 14 grid:
used here it would have to be resampled per frame size, repeated or factorised over time, and would
then be a second position signal beside the rotary one; fine-tuning adapts the attention to the
rotary positions instead. With positions left aside (rotary off, the table zero) the encoder
computes the timm model's features (tests/models/test_pretrained.py).

Audio: timm has no audio spectrogram transformer (no AST / BEATs / audio ViT in its model list),
so the spectrogram patch embedding keeps its own initialisation (the report says so); the blocks it
feeds are the pretrained ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

INFLATE = ("central", "average")
REPORT = "init_report.json"


class PretrainedError(ValueError):
    """A pretrained checkpoint that cannot be found, read or mapped onto the model."""


# ------------------------------------------------------------------------------------------------
# The source: a timm ViT's state dict and its architecture


@dataclass
class Source:
    """A timm ViT state dict in timm's key layout and what is known of its architecture.

    ``arch`` keys: embed_dim, depth, num_heads (None: unknown, a bare state dict does not hold it),
    mlp_ratio, qkv_bias, qk_norm, norm_eps, pre_norm, patch (p_h, p_w), in_chans, no_embed_class,
    mean, std (the input normalisation the weights were trained with; None: unknown).
    ``assumed``: the arch keys guessed rather than read (reported)."""

    state: dict[str, torch.Tensor]
    arch: dict[str, Any]
    timm_model: str = ""
    checkpoint: str = ""
    assumed: tuple[str, ...] = ()


def load_source(timm_model: str = "", checkpoint: str = "", timm_kwargs: dict | None = None) -> Source:
    """The weights of ``model.init``: a timm model name and / or a local checkpoint file.

    name + file: timm builds the model and loads the file into it (strict); name alone: timm's hub
    download (no network: a PretrainedError naming model.init.checkpoint); file alone: timm reads
    the state dict, which must be in timm's ViT layout (the architecture is read off its shapes).
    """
    import timm

    timm_kwargs = dict(timm_kwargs or {})
    if not timm_model and not checkpoint:
        raise PretrainedError("model.init needs a timm model name (model.init.timm_model=vit_base_patch16_224) "
                              "and / or a local checkpoint file (model.init.checkpoint=PATH)")
    if checkpoint and not Path(checkpoint).is_file():
        raise PretrainedError(f"model.init.checkpoint={checkpoint!r}: no such file (expected a timm ViT "
                              "checkpoint: .safetensors, .pth or .bin)")
    if not timm_model:
        if timm_kwargs:
            raise PretrainedError(f"model.init.timm_kwargs={timm_kwargs} needs model.init.timm_model (the kwargs "
                                  "are passed to timm.create_model)")
        try:
            state = timm.models.load_state_dict(checkpoint)
        except Exception as err:  # safetensors / pickle / zip errors: name the file
            raise PretrainedError(f"model.init.checkpoint={checkpoint!r}: timm could not read it as a state dict "
                                  f"({type(err).__name__}: {err})") from err
        arch, assumed = _arch_of_state(state, checkpoint)
        return Source({k: v for k, v in state.items()}, arch, "", str(checkpoint), assumed)

    if not timm.is_model(timm_model.split(".")[0]):
        hint = timm.list_models(f"*{timm_model.split('.')[0].split('_')[0]}*")[:8]
        raise PretrainedError(f"model.init.timm_model={timm_model!r} is not a timm model" +
                              (f" (similar: {hint})" if hint else ""))
    overlay = dict(file=str(checkpoint)) if checkpoint else None
    # timm initialises its model before loading: on a forked generator, so the captioner built
    # next gets the same random initialisation as without model.init
    with torch.random.fork_rng(devices=[]):
        try:
            model = timm.create_model(timm_model, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
        except Exception as err:
            if checkpoint:
                raise PretrainedError(f"timm could not load model.init.checkpoint={checkpoint!r} into "
                                      f"{timm_model!r}{f' with {timm_kwargs}' if timm_kwargs else ''} "
                                      f"(model.init.timm_kwargs): {type(err).__name__}: {_short(err)}") from err
            raise PretrainedError(
                f"could not get the pretrained weights of timm model {timm_model!r} ({type(err).__name__}: "
                f"{_short(err, 300)}). Without network access pass a local timm checkpoint file: "
                f"model.init.checkpoint=PATH (.safetensors, .pth or .bin)") from err
    arch = _arch_of_model(model, timm_model)
    return Source({k: v.detach() for k, v in model.state_dict().items()}, arch, timm_model, str(checkpoint or ""))


def _short(err: BaseException, limit: int = 600) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _arch_of_model(model: nn.Module, name: str) -> dict[str, Any]:
    """The architecture of a timm VisionTransformer; PretrainedError for what the encoder's blocks
    cannot compute (another norm, activation, MLP or attention)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise PretrainedError(f"timm model {name!r} is a {type(model).__name__}; only timm's VisionTransformer "
                              "(vit_*, deit_*, CLIP ViTs ...) maps onto the encoder")
    blk = model.blocks[0]
    problems = []
    for what, mod in (("norm1", blk.norm1), ("norm2", blk.norm2)):
        if not isinstance(mod, nn.LayerNorm):  # timm's LayerNorm subclasses it
            problems.append(f"blocks.0.{what} is {type(mod).__name__} (the encoder has LayerNorm)")
    if type(blk.mlp) is not Mlp or type(blk.mlp.act) is not nn.GELU or blk.mlp.act.approximate != "none":
        problems.append(f"blocks.0.mlp is {type(blk.mlp).__name__} with {blk.mlp.act!r} (the encoder has timm's "
                        "Mlp with exact GELU; a *_quickgelu model needs QuickGELU)")
    elif not isinstance(blk.mlp.norm, nn.Identity):
        problems.append("blocks.0.mlp has a norm (scale_mlp_norm)")
    if type(blk.attn) is not Attention or not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity):
        problems.append(f"blocks.0.attn is {type(blk.attn).__name__} with a norm or another layout")
    if type(blk).__name__ != "Block":
        problems.append(f"blocks are {type(blk).__name__} (the encoder has timm's pre-norm Block)")
    if problems:
        raise PretrainedError(f"timm model {name!r} does not fit the encoder's blocks: " + "; ".join(problems))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    pe = model.patch_embed.proj
    return dict(
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not isinstance(blk.attn.q_norm, nn.Identity), norm_eps=float(blk.norm1.eps),
        pre_norm=not isinstance(model.norm_pre, nn.Identity), patch=tuple(pe.kernel_size),
        in_chans=pe.in_channels, no_embed_class=bool(model.no_embed_class),
        mean=tuple(cfg["mean"]) if "mean" in cfg else None, std=tuple(cfg["std"]) if "std" in cfg else None,
    )


def _arch_of_state(state: dict[str, torch.Tensor], path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The architecture read off a timm ViT state dict's shapes (num_heads is not in it; norm eps
    and whether the class token has a position are inferred, and reported as assumed)."""
    w = state.get("patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if w is None or w.dim() != 4 or not blocks or "blocks.0.attn.qkv.weight" not in state:
        raise PretrainedError(
            f"model.init.checkpoint={path!r} is not a timm ViT state dict (no patch_embed.proj.weight / "
            f"blocks.N.attn.qkv.weight; first keys {list(state)[:4]}): name its timm model too "
            "(model.init.timm_model=NAME), so timm converts it (e.g. OpenAI / open_clip CLIP files)")
    d = w.shape[0]
    pre_norm = "norm_pre.weight" in state
    no_embed_class = False
    pos = state.get("pos_embed")
    if pos is not None and "cls_token" in state:
        n = pos.shape[1]
        no_embed_class = math.isqrt(n) ** 2 == n  # a square table: patches only (deit-3, big_vision)
    arch = dict(
        embed_dim=d, depth=max(blocks) + 1, num_heads=None,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / d if "blocks.0.mlp.fc1.weight" in state else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in state, qk_norm="blocks.0.attn.q_norm.weight" in state,
        # timm's VisionTransformer default (1e-6); its CLIP ViTs (the ones with norm_pre) use 1e-5
        norm_eps=1e-5 if pre_norm else 1e-6, pre_norm=pre_norm, patch=tuple(w.shape[2:]), in_chans=w.shape[1],
        no_embed_class=no_embed_class, mean=None, std=None,
    )
    return arch, ("num_heads", "norm_eps", "no_embed_class", "mean", "std")


# ------------------------------------------------------------------------------------------------
# Model config from the source


def encoder_overrides(source: Source, base) -> dict[str, Any]:
    """ModelConfig fields that make the encoder of ``base`` (a ModelConfig) the source's shape:
    width, depth, heads, MLP ratio, qkv bias, QK-norm, norm eps, pre-norm and the patch size (the
    tubelet keeps its length). A bare state dict does not hold the heads: the base's are kept at its
    width, and at another width timm's ViT head size 64 is assumed (the report says so)."""
    a = source.arch
    ph, pw = a["patch"]
    if ph != pw:
        raise PretrainedError(f"the checkpoint's patch is {ph}x{pw}; the encoder's image patch is square")
    out = dict(embed_dim=a["embed_dim"], depth=a["depth"], mlp_ratio=a["mlp_ratio"], qkv_bias=a["qkv_bias"],
               qk_norm=a["qk_norm"], norm_eps=a["norm_eps"], pre_norm=a["pre_norm"],
               tubelet=(int(base.tubelet[0]), ph, pw), image_patch=ph)
    if a["num_heads"] is not None:
        out["num_heads"] = a["num_heads"]
    elif a["embed_dim"] != base.embed_dim:
        out["num_heads"] = max(1, a["embed_dim"] // 64)
    return out



# ------------------------------------------------------------------------------------------------
# Mapping


def inflate_patch_embed(weight: torch.Tensor, frames: int, mode: str = "central") -> torch.Tensor:
    """2D patch filter (D, C, p, p) -> tubelet filter (D, C, kt, p, p), kt = ``frames``.

    central: the filter on frame kt // 2, zeros elsewhere (ViViT's central-frame initialisation);
    average: filter / kt on every frame (I3D). Both give a static clip the 2D filter's response."""
    if mode not in INFLATE:
        raise PretrainedError(f"model.init.inflate={mode!r} is not one of {list(INFLATE)}")
    if mode == "average":
        return weight[:, :, None].expand(-1, -1, frames, -1, -1) / frames
    out = weight.new_zeros(weight.shape[0], weight.shape[1], frames, *weight.shape[2:])
    out[:, :, frames // 2] = weight
    return out


def fold_input_norm(weight: torch.Tensor, bias: torch.Tensor, weights_norm, data_norm):
    """(weight, bias) of a patch filter (D, C, ...) for frames normalised with ``data_norm`` that
    compute what it computes on the same pixels normalised with ``weights_norm`` (each a (mean,
    std) of C floats): x_w = x_d * s_d / s_w + (m_d - m_w) / s_w per channel, exact for a filter
    with no padding."""
    (mw, sw), (md, sd) = [tuple(torch.tensor(v, dtype=torch.float64) for v in n) for n in (weights_norm, data_norm)]
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    w = weight.double()
    new_w = w * (sd / sw).view(shape)
    new_b = bias.double() + (w * ((md - mw) / sw).view(shape)).sum(dim=tuple(range(1, w.dim())))
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


@dataclass
class InitReport:
    """What ``apply_pretrained`` did: model parameter -> source key (and how), source keys dropped
    on purpose (with why), source keys not used, model parameters left at their own initialisation."""

    source: dict[str, Any]
    loaded: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few lines for the start of a run (the full lists are in init_report.json)."""
        src = self.source
        what = " + ".join(x for x in (src.get("timm_model"), src.get("checkpoint")) if x)
        lines = [f"pretrained init from {what}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.dropped)} dropped, {len(self.unexpected)} unexpected, {len(self.missing)} "
                 f"missing (own initialisation)"]
        if self.overrides:
            lines.append("  encoder config from the checkpoint: " +
                         ", ".join(f"{k}={v}" for k, v in self.overrides.items()))
        if self.dropped:
            lines.append("  dropped: " + "; ".join(f"{k} ({v})" for k, v in _grouped(self.dropped).items()))
        if self.unexpected:
            lines.append("  unexpected (not used): " + ", ".join(_prefix_counts(self.unexpected)))
        if self.missing:
            lines.append("  missing: " + ", ".join(_prefix_counts(self.missing)))
        if self.frozen:
            lines.append("  frozen: " + ", ".join(_prefix_counts(self.frozen)))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def save(self, directory: str | Path) -> Path:
        from mmsparse.fileio import atomic_write_text

        path = Path(directory) / REPORT
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))
        return path


def _prefix_counts(keys, depth: int = 3) -> list[str]:
    counts: dict[str, int] = {}
    for k in keys:
        p = ".".join(re.sub(r"\.\d+(\.|$)", r".*\1", k).split(".")[:depth])
        counts[p] = counts.get(p, 0) + 1
    return [f"{p.rstrip('.*')}.* ({n})" if n > 1 else p for p, n in counts.items()]


def _grouped(dropped: dict[str, str]) -> dict[str, str]:
    by_reason: dict[str, list[str]] = {}
    for k, why in dropped.items():
        by_reason.setdefault(why, []).append(k)
    return {", ".join(_prefix_counts(ks, 1)): why for why, ks in by_reason.items()}


def _check_structure(cfg, arch: dict[str, Any]) -> None:
    """Differences that no parameter shape shows: heads, norm eps, pre-norm, QK-norm, qkv bias."""
    bad = []
    for key, mine in (("num_heads", cfg.num_heads), ("norm_eps", cfg.norm_eps), ("pre_norm", cfg.pre_norm),
                      ("qk_norm", cfg.qk_norm)):
        theirs = arch.get(key)
        if theirs is not None and theirs != mine:
            bad.append(f"{key}: checkpoint {theirs} vs model {mine}")
    if arch["qkv_bias"] and not cfg.qkv_bias:
        bad.append("qkv_bias: checkpoint True vs model False")
    if bad:
        raise PretrainedError("the checkpoint's encoder differs from the model's config (" + "; ".join(bad) +
                              "): set them in model.overrides, or model.init.match_encoder=true to take them "
                              "from the checkpoint")


@torch.no_grad()
def apply_pretrained(model: nn.Module, source: Source, inflate: str = "central", data_norm=None) -> InitReport:
    """Copy the source's weights into ``model`` (a VideoCaptioner) in place; the InitReport.

    ``data_norm``: the (mean, std) the model's frames are normalised with (the data pipeline's);
    where the weights were trained on another one (timm's pretrained_cfg), the patch embeddings
    take the difference (`fold_input_norm`), so the pixels give the features they gave in timm.

    PretrainedError, before anything is copied, on a shape mismatch (naming each parameter and both
    shapes) or a structural difference (heads, norm eps, pre-norm, QK-norm)."""
    if inflate not in INFLATE:
        raise PretrainedError(f"model.init.inflate={inflate!r} is not one of {list(INFLATE)}")
    cfg, st, arch = model.cfg, source.state, source.arch
    _check_structure(cfg, arch)
    if source.assumed:
        report_notes = [f"read off a bare state dict, not from a timm model: {', '.join(source.assumed)} assumed "
                        f"(the model's: num_heads={cfg.num_heads}, norm_eps={cfg.norm_eps}); name the timm model "
                        "(model.init.timm_model) to have them checked"]
    else:
        report_notes = []
    target = model.state_dict()
    report = InitReport(source=dict(timm_model=source.timm_model, checkpoint=source.checkpoint,
                                    arch={k: v for k, v in arch.items()}, assumed=list(source.assumed),
                                    inflate=inflate), notes=report_notes)
    plan: dict[str, tuple[torch.Tensor, str]] = {}  # model key -> (value, what it came from)
    used: set[str] = set()

    def put(key: str, value: torch.Tensor, src: str, *src_keys: str) -> None:
        plan[key] = (value, src)
        used.update(src_keys or (src,))

    embeds = model.embed.embeds
    w = st["patch_embed.proj.weight"]  # (D, C, p, p)
    b, b_src = st.get("patch_embed.proj.bias"), "patch_embed.proj.bias"
    if b is None:
        b, b_src = w.new_zeros(w.shape[0]), "zeros (no patch bias in the checkpoint)"
        report.notes.append("the checkpoint's patch embedding has no bias (CLIP): the patch biases start at zero")
    w_norm = (arch["mean"], arch["std"]) if arch.get("mean") and arch.get("std") else None
    if data_norm is not None and w_norm is None:
        report.notes.append("the weights' input normalisation is unknown (a bare state dict): frames go in with "
                            "the data's, unadjusted")
    elif data_norm is not None and _differs(w_norm, data_norm):
        w, b = fold_input_norm(w, b, w_norm, data_norm)
        b_src += " + the normalisation difference"
        report.notes.append(f"the weights were trained on frames normalised with mean {_r(w_norm[0])}, std "
                            f"{_r(w_norm[1])}, the data uses mean {_r(data_norm[0])}, std {_r(data_norm[1])}: "
                            "the patch embeddings take the difference (exact)")
    if "image" in embeds:
        put("embed.embeds.image.proj.proj.weight", w, "patch_embed.proj.weight")
        put("embed.embeds.image.proj.proj.bias", b, b_src, "patch_embed.proj.bias")
    if "video" in embeds:
        kt = embeds["video"].tubelet[0]
        put("embed.embeds.video.proj.weight", inflate_patch_embed(w, kt, inflate),
            f"patch_embed.proj.weight (inflated to {kt} frames, {inflate})", "patch_embed.proj.weight")
        put("embed.embeds.video.proj.bias", b, b_src, "patch_embed.proj.bias")
    if "audio" in embeds:
        report.notes.append("timm has no audio spectrogram transformer: the audio patch embedding keeps its "
                            "own initialisation")
    if "norm_pre.weight" in st and model.embed.norm_pre is not None:
        put("embed.norm_pre.weight", st["norm_pre.weight"], "norm_pre.weight")
        put("embed.norm_pre.bias", st["norm_pre.bias"], "norm_pre.bias")
    _map_prefix_tokens(model, st, arch, put, report)
    mod = model.embed.modality_embed
    rows = [mod.index[m] for m in ("video", "image") if m in mod.index]
    if rows:
        z = target["embed.modality_embed.weight"].clone()
        z[rows] = 0
        put("embed.modality_embed.weight", z, "zeros for video and image (pretrained tokens enter unchanged)")
    depth_src = arch["depth"]
    for i in range(min(depth_src, cfg.depth)):
        p = f"blocks.{i}."
        names = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight",
                 "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias", "norm2.weight", "norm2.bias",
                 "mlp.fc1.weight", "mlp.fc1.bias"]
        for n in names:
            if p + n in st:
                put(p + n, st[p + n], p + n)
            elif p + n in target and n == "attn.qkv.bias":
                put(p + n, target[p + n].new_zeros(target[p + n].shape), "zeros (the checkpoint has no qkv bias)")
        for lin, ls in (("attn.proj", "ls1.gamma"), ("mlp.fc2", "ls2.gamma")):
            wk, bk = p + lin + ".weight", p + lin + ".bias"
            wv, bv = st[wk], st.get(bk)
            how_w, how_b = wk, bk
            if bv is None:
                bv, how_b = wv.new_zeros(wv.shape[0]), "zeros (no bias in the checkpoint)"
            if p + ls in st:  # LayerScale: x + gamma * (W y + b) = x + (gamma W) y + gamma b
                g = st[p + ls]
                wv, bv = wv * g[:, None], bv * g
                how_w, how_b = f"{wk} * {p + ls}", f"{how_b} * {p + ls}"
            put(wk, wv, how_w, wk, p + ls)
            put(bk, bv, how_b, bk, p + ls)
    if depth_src > cfg.depth:
        report.notes.append(f"the checkpoint has {depth_src} blocks, the encoder {cfg.depth}: blocks "
                            f"{cfg.depth}..{depth_src - 1} are not used")
    elif depth_src < cfg.depth:
        report.notes.append(f"the checkpoint has {depth_src} blocks, the encoder {cfg.depth}: blocks "
                            f"{depth_src}..{cfg.depth - 1} keep their own initialisation")
    if "norm.weight" in st:
        put("norm.weight", st["norm.weight"], "norm.weight")
        put("norm.bias", st["norm.bias"], "norm.bias")

    # every shape checked before anything is copied
    wrong = []
    for key, (value, src) in plan.items():
        if key not in target:
            wrong.append(f"{key}: not in the model (from {src})")
        elif tuple(value.shape) != tuple(target[key].shape):
            wrong.append(f"{key}: checkpoint {src} has shape {tuple(value.shape)}, the model "
                         f"{tuple(target[key].shape)}")
    if wrong:
        more = f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else ""
        raise PretrainedError(f"the checkpoint does not fit the model ({len(wrong)} shape mismatches): "
                              + "; ".join(wrong[:8]) + more +
                              " -- model.init.match_encoder=true takes the encoder's shape from the checkpoint")
    for key, (value, src) in plan.items():
        target[key].copy_(value.to(target[key].dtype))
        report.loaded[key] = src
    for k in st:
        if k in used:
            continue
        why = _dropped_why(k)
        if why:
            report.dropped[k] = why
        else:
            report.unexpected.append(k)
    report.missing = [k for k in target if k not in plan]
    return report


def _differs(a, b) -> bool:
    return any(abs(float(x) - float(y)) > 1e-7 for u, v in zip(a, b) for x, y in zip(u, v))


def _r(v) -> list[float]:
    return [round(float(x), 4) for x in v]


def _map_prefix_tokens(model, st, arch, put, report: InitReport) -> None:
    """cls_token (with its position, where the table has one) and registers -> the global tokens."""
    g = model.embed.global_tokens
    cls, reg = st.get("cls_token"), st.get("reg_token")
    if cls is None and reg is None:
        return
    if g is None:
        report.notes.append("the model has no global tokens (n_global=0): the class token is not used")
        return
    weight = g.weight.detach().clone()  # (G, D)
    pos = st.get("pos_embed")
    rows, srcs = [], []
    if cls is not None:
        tok = cls.reshape(-1)
        src = "cls_token"
        if pos is not None and not arch.get("no_embed_class"):
            tok = tok + pos[0, 0]
            src = "cls_token + pos_embed[0]"
        rows.append(tok)
        srcs.append(src)
    if reg is not None:
        n_reg = reg.shape[1]
        for r in range(n_reg):
            rows.append(reg[0, r])
            srcs.append(f"reg_token[{r}]")
    n = min(len(rows), weight.shape[0])
    if n < len(rows):
        report.notes.append(f"{len(rows) - n} register tokens not used (n_global={weight.shape[0]})")
    if rows and rows[0].shape != weight.shape[1:]:
        put("embed.global_tokens.weight", rows[0], srcs[0], "cls_token")  # reported as a shape mismatch
        return
    for i in range(n):
        weight[i] = rows[i]
    used = ["cls_token"] * (cls is not None) + ["reg_token"] * (reg is not None)
    put("embed.global_tokens.weight", weight,
        "; ".join(f"[{i}] {s}" for i, s in enumerate(srcs[:n])) + (f"; [{n}:] own" if n < weight.shape[0] else ""),
        *used)


def _dropped_why(key: str) -> str:
    if key == "pos_embed":
        return "absolute positions: the encoder has rotary positions in every layer"
    if key.startswith(("head.", "fc_norm.", "attn_pool.", "head_drop.")):
        return "classifier head / pooling: the captioner has its own decoder"
    return ""
