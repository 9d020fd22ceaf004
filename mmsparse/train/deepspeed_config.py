"""The DeepSpeed JSON, generated from the recipe (never kept by hand beside it).

``deepspeed_config(cfg, world_size, has_gpu)`` maps the ``deepspeed`` and ``optim`` sections:
ZeRO stage 0-3 with optional CPU/NVMe offload, fp32 / bf16 / fp16 (dynamic loss scaling),
gradient accumulation and clipping, AdamW (``torch_adam`` on a CPU so no fused_adam build is
needed), the warmup + cosine / linear / constant schedule, and the activation-checkpointing
section used when blocks are checkpointed. ``deepspeed.extra`` is deep-merged last, as the
escape hatch for knobs the tree does not name.

Batch arithmetic: DeepSpeed is given no sequence-parallel ``mpu`` (see ``parallel``: its plain
all-rank gradient average is the right reduction), so it counts every process as a replica:
``train_batch_size = micro_batch * grad_accum * world_size``. The clips per optimizer step are
``micro_batch * grad_accum * world_size / sequence_parallel_size`` (the members of a
sequence-parallel group share one clip).

``python -m mmsparse.train.deepspeed_config RECIPE [k=v ...] [--world-size N]`` prints it.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, TrainConfig, deep_merge, load_config


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    sp = cfg.deepspeed.sequence_parallel_size
    if world_size % sp:
        raise ConfigError(f"deepspeed.sequence_parallel_size={sp} must divide the number of processes "
                          f"({world_size})")
    return world_size // sp


def deepspeed_config(cfg: TrainConfig, world_size: int = 1, gpu: bool | None = None) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` processes."""
    ds, o = cfg.deepspeed, cfg.optim
    gpu = has_gpu() if gpu is None else gpu
    data_parallel_size(cfg, world_size)  # checks the sequence-parallel size divides world_size
    micro = cfg.data.batch_size
    torch_adam = (not gpu) if ds.torch_adam is None else ds.torch_adam

    out: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro * ds.grad_accum * world_size,
        "gradient_clipping": float(o.grad_clip),
        "steps_per_print": 10 ** 9,   # our own logging reports progress
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW" if o.name == "adamw" else "Adam",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": torch_adam},
        },
        "scheduler": _scheduler(cfg),
        "zero_optimization": _zero(cfg),
    }
    if o.name == "adam":
        out["optimizer"]["params"]["adam_w_mode"] = False
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if ds.offload_optimizer != "none" and torch_adam:
        # ZeRO-Offload insists on DeepSpeedCPUAdam unless told otherwise
        out["zero_force_ds_cpu_optimizer"] = False
    if ds.activation_checkpointing:
        out["activation_checkpointing"] = {
            "partition_activations": ds.sequence_parallel_size == 1 and ds.zero_stage == 3 and gpu,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": ds.offload_param == "cpu",
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    if ds.extra:
        out = deep_merge(out, ds.extra)
    return out


def _zero(cfg: TrainConfig) -> dict:
    ds = cfg.deepspeed
    z: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return z
    z.update({"overlap_comm": ds.overlap_comm, "contiguous_gradients": True,
              "reduce_bucket_size": ds.reduce_bucket_size})
    if ds.zero_stage >= 2:
        z.update({"allgather_partitions": True, "reduce_scatter": True, "allgather_bucket_size": ds.reduce_bucket_size})
    if ds.zero_stage == 3:
        z.update({"stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
                  "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
                  "stage3_gather_16bit_weights_on_model_save": True})
    if ds.offload_optimizer != "none":
        z["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.offload_param != "none":
        z["offload_param"] = _offload(ds.offload_param, ds.nvme_path)
    return z


def _offload(device: str, nvme_path: str) -> dict:
    d = {"device": device, "pin_memory": True}
    if device == "nvme":
        d["nvme_path"] = nvme_path
    return d


def _scheduler(cfg: TrainConfig) -> dict:
    o = cfg.optim
    total = max(cfg.run.steps, 1)
    warm = max(o.warmup_steps, 1)
    if o.schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {"total_num_steps": total, "warmup_num_steps": warm,
                                                      "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio,
                                                      "warmup_type": "linear"}}
    if o.schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": total, "warmup_num_steps": warm,
                                                     "warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                                     "warmup_type": "linear"}}
    return {"type": "WarmupLR", "params": {"warmup_num_steps": warm, "warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                           "warmup_type": "linear"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmsparse.train.deepspeed_config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None)
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.recipe, a.overrides)
        print(json.dumps(deepspeed_config(cfg, a.world_size, a.gpu), indent=2))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
