"""Pretrained initialisation: a timm ViT's weights mapped onto the multimodal sparse encoder.

Legend: D embed dim, C channels, p patch size, kt tubelet length, G global tokens, R registers.

    model.init (timm name and / or local file) ─► load_source ─► Source (timm state dict + its architecture)
        ─► encoder_overrides ─► create_model(...) ─► apply_pretrained ─► InitReport (init_report.json)

Weights come through timm's own machinery only: ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))`` (timm's checkpoint filter converts original-format files,
e.g. OpenAI CLIP's, and its strict load checks every key), or for a file without a model name
``timm.models.load_state_dict`` (safetensors, .pth, .bin; EMA / ``state_dict`` wrappers unwrapped).

The mapping itself (what goes where, positions, audio): ``mmsparse.models.timm_weights``.

``python -m mmsparse.models.pretrained save NAME OUT [k=v ...]`` writes a timm model with random
weights to a local file (e.g. a tiny ViT for the CPU recipe); ``... report FILE [--timm-model NAME]``
prints what would be loaded into ``captioner_base``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .timm_weights import (
    INFLATE, REPORT, InitReport, PretrainedError, Source, apply_pretrained, encoder_overrides, fold_input_norm,
    inflate_patch_embed, load_source,
)

__all__ = [
    "INFLATE", "NO_WEIGHT_DECAY", "REPORT", "InitReport", "PretrainedError", "Source", "apply_pretrained",
    "create_initialised", "encoder_overrides", "fold_input_norm", "freeze", "inflate_patch_embed", "load_source",
    "param_groups", "scheduler_lrs",
]

# parameters kept out of weight decay when the optimizer gets parameter groups (layer_decay): the
# learned tokens and embeddings, as timm's no_weight_decay() lists cls_token / pos_embed
NO_WEIGHT_DECAY = ("embed.global_tokens.weight", "embed.modality_embed.weight", "logit_scale")

# ------------------------------------------------------------------------------------------------
# Building, freezing, parameter groups


def create_initialised(name: str, overrides: dict | None = None, init=None, tokenizer=None, data_norm=None):
    """(model, InitReport or None): the registered model ``name`` with ``overrides``, and with the
    pretrained weights of ``init`` (the train config's ``model.init``: timm_model, checkpoint,
    timm_kwargs, inflate, match_encoder) when it names any. With match_encoder the encoder's shape
    comes from the checkpoint (explicit ``overrides`` still win, and are then checked).
    ``data_norm``: the data's pixel (mean, std), see `apply_pretrained`."""
    from .registry import create_model, model_config

    overrides = dict(overrides or {})
    if init is None or not (init.timm_model or init.checkpoint):
        return create_model(name, tokenizer=tokenizer, **overrides), None
    source = load_source(init.timm_model, init.checkpoint, init.timm_kwargs)
    derived = {}
    if init.match_encoder:
        base = model_config(name, **overrides)
        derived = {k: v for k, v in encoder_overrides(source, base).items()
                   if k not in overrides and getattr(base, k) != v}
    model = create_model(name, tokenizer=tokenizer, **derived, **overrides)
    report = apply_pretrained(model, source, init.inflate, data_norm)
    report.overrides = derived
    return model, report


def freeze(model: nn.Module, encoder: bool = False, patch_embed: bool = False, blocks: int = 0) -> list[str]:
    """Stop gradients of parts of the encoder (``model.freeze``); the names frozen.

    encoder: the pretrained visual encoder (video / image patch embeddings, pre-norm, the blocks and
    the final norm); the audio patch embedding, modality embeddings and global tokens stay trainable
    (they are new). patch_embed: the video / image patch embeddings. blocks: the first N blocks."""
    depth = len(model.blocks)
    if not 0 <= blocks <= depth:
        raise PretrainedError(f"model.freeze.blocks={blocks} must be between 0 and the encoder depth {depth}")
    prefixes = []
    if encoder or patch_embed:
        prefixes += ["embed.embeds.video.", "embed.embeds.image."]
    if encoder:
        prefixes += ["embed.norm_pre.", "blocks.", "norm."]
    prefixes += [f"blocks.{i}." for i in range(blocks)]
    frozen = []
    for n, p in model.named_parameters():
        if n.startswith(tuple(prefixes)):
            p.requires_grad_(False)
            frozen.append(n)
    return frozen


class _LayerGroups:
    """What timm's param_groups_layer_decay reads of a model: its named parameters and a group
    matcher, timm's ViT one (the embeddings first, then block i, the final norm with the last
    block; the decoder and the heads, matched by nothing, are the last layer: full learning rate)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self, *args, **kw):
        return self.model.named_parameters(*args, **kw)

    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^embed\.", blocks=[(r"^blocks\.(\d+)\.", None), (r"^norm\.", (99999,))])


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                 extra: list[nn.Parameter] = ()) -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay (BEiT; timm's param_groups_layer_decay):
    the decoder and heads get ``lr``, block i lr * d ** (depth - i) (the final norm as the last
    block), the patch embeddings and tokens lr * d ** (depth + 1). Each group's ``lr`` is set (DeepSpeed's
    schedulers scale it), ``lr_scale`` kept. No weight decay on 1D parameters and NO_WEIGHT_DECAY.
    Frozen parameters are left out; ``extra`` (trainable parameters outside ``model``) gets ``lr``."""
    from timm.optim import param_groups_layer_decay

    if not 0 < layer_decay <= 1:
        raise PretrainedError(f"optim.layer_decay must be in (0, 1] (1: off), got {layer_decay}")
    groups = param_groups_layer_decay(_LayerGroups(model), weight_decay=weight_decay,
                                      no_weight_decay_list=NO_WEIGHT_DECAY, layer_decay=layer_decay)
    extra = [p for p in extra if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": weight_decay, "lr_scale": 1.0})
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    groups.sort(key=lambda g: -g["lr_scale"])  # group 0 at the full lr: what the run log reports
    return groups


def scheduler_lrs(ds_config: dict, groups: list[dict]) -> dict:
    """``ds_config`` with the warmup schedulers' peak lr per parameter group: DeepSpeed's WarmupLR
    and WarmupDecayLR take one ``warmup_max_lr`` for every group (its cosine schedule scales each
    group's own lr and needs nothing)."""
    sched = ds_config.get("scheduler", {})
    if "warmup_max_lr" in sched.get("params", {}):
        sched["params"]["warmup_max_lr"] = [g["lr"] for g in groups]
        sched["params"]["warmup_min_lr"] = [0.0 for _ in groups]
    return ds_config


# ------------------------------------------------------------------------------------------------
# python -m mmsparse.models.pretrained


def _kv(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"expected key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmsparse.models.pretrained", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="write a timm model with random weights (no download) to a local file")
    s.add_argument("timm_model")
    s.add_argument("out", help=".safetensors, or .pth / .bin (torch.save)")
    s.add_argument("kwargs", nargs="*", help="timm.create_model kwargs, e.g. depth=2")
    r = sub.add_parser("report", help="print what a checkpoint loads into a captioner")
    r.add_argument("checkpoint")
    r.add_argument("--timm-model", default="")
    r.add_argument("--timm-kwargs", nargs="*", default=[], metavar="k=v", help="timm.create_model kwargs")
    r.add_argument("--model", default="captioner_base")
    r.add_argument("--overrides", nargs="*", default=[], metavar="k=v", help="ModelConfig overrides")
    a = p.parse_args(argv)
    if a.cmd == "save":
        import timm

        model = timm.create_model(a.timm_model, pretrained=False, **_kv(a.kwargs))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(out))
        else:
            torch.save(state, out)
        print(f"{out}: {a.timm_model} {_kv(a.kwargs) or ''} with random weights "
              f"({sum(v.numel() for v in state.values()) / 1e6:.2f} M parameters)")
        return 0
    init = argparse.Namespace(timm_model=a.timm_model, checkpoint=a.checkpoint, timm_kwargs=_kv(a.timm_kwargs),
                              inflate="central", match_encoder=True)
    try:
        _, report = create_initialised(a.model, _kv(a.overrides), init)
    except PretrainedError as err:
        print(f"error: {err}")
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
