"""The DeepSpeed JSON generated from recipes, per ZeRO stage and precision, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmsparse.train.config import ConfigError, load_config
from mmsparse.train.deepspeed_config import deepspeed_config


def _ds(overrides, world=2, gpu=False, recipe="tiny_cpu"):
    return deepspeed_config(load_config(recipe, overrides), world, gpu)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages(stage):
    d = _ds([f"deepspeed.zero_stage={stage}", "data.batch_size=3", "deepspeed.grad_accum=4"], world=2)
    z = d["zero_optimization"]
    assert z["stage"] == stage
    assert d["train_batch_size"] == 3 * 4 * 2 and d["gradient_accumulation_steps"] == 4
    assert d["train_micro_batch_size_per_gpu"] == 3
    assert ("reduce_scatter" in z) == (stage >= 2)
    assert ("stage3_prefetch_bucket_size" in z) == (stage == 3)
    assert "offload_optimizer" not in z and "offload_param" not in z
    json.dumps(d)  # plain JSON


def test_offload_precision_clipping_optimizer_scheduler():
    d = _ds(["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=nvme",
             "deepspeed.precision=bf16", "optim.grad_clip=0.5", "optim.lr=1e-3", "optim.schedule=cosine",
             "run.steps=77", "optim.warmup_steps=7"], gpu=True)
    z = d["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"]["device"] == "nvme" and z["offload_param"]["nvme_path"]
    assert d["bf16"] == {"enabled": True} and "fp16" not in d
    assert d["gradient_clipping"] == 0.5
    assert d["optimizer"]["type"] == "AdamW" and d["optimizer"]["params"]["lr"] == 1e-3
    assert d["optimizer"]["params"]["torch_adam"] is False        # GPU: fused Adam
    s = d["scheduler"]
    assert s["type"] == "WarmupCosineLR" and s["params"]["total_num_steps"] == 77
    assert s["params"]["warmup_num_steps"] == 7
    fp16 = _ds(["deepspeed.precision=fp16"])
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and "bf16" not in fp16
    cpu = _ds([])
    assert cpu["optimizer"]["params"]["torch_adam"] is True        # CPU: no fused_adam build
    assert "bf16" not in cpu and "fp16" not in cpu
    assert _ds(["optim.schedule=linear"])["scheduler"]["type"] == "WarmupDecayLR"
    assert _ds(["optim.schedule=constant"])["scheduler"]["type"] == "WarmupLR"


def test_activation_checkpointing_sequence_parallel_and_extra():
    d = _ds(["data.batch_size=2", "deepspeed.activation_checkpointing=true", "deepspeed.sequence_parallel_size=2",
             "deepspeed.extra={zero_optimization: {reduce_bucket_size: 123}, steps_per_print: 5}"], world=4)
    assert "activation_checkpointing" in d
    # DeepSpeed counts all 4 processes (2 data-parallel x 2 sequence-parallel) as replicas
    assert d["train_batch_size"] == 2 * 1 * 4
    assert d["zero_optimization"]["reduce_bucket_size"] == 123 and d["steps_per_print"] == 5
    assert "activation_checkpointing" not in _ds([])
    with pytest.raises(ConfigError, match="sequence_parallel_size=3 must divide"):
        _ds(["deepspeed.sequence_parallel_size=3"], world=4)


def test_recipes_generate_their_stage():
    assert _ds([], recipe="caption_base", gpu=True)["zero_optimization"]["stage"] == 2
    z3 = _ds([], recipe="caption_base_zero3", gpu=True)
    assert z3["zero_optimization"]["stage"] == 3 and "activation_checkpointing" in z3
    assert _ds([], recipe="long_clip_ulysses", world=2, gpu=True)["train_batch_size"] == 2


def test_print_deepspeed_config_cli():
    out = subprocess.run([sys.executable, "-m", "mmsparse.train", "tiny_cpu", "deepspeed.zero_stage=3",
                          "data.batch_size=2", "--print-deepspeed-config", "--world-size", "2"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["zero_optimization"]["stage"] == 3 and d["train_batch_size"] == 4
    bad = subprocess.run([sys.executable, "-m", "mmsparse.train", "tiny_cpu", "optim.lrr=1",
                          "--print-deepspeed-config"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'optim.lr'" in bad.stderr
