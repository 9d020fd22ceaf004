"""Every recipe under recipes/ loads, and trains its first two steps through the real training
loop (DeepSpeed on CPU, the recipe's ZeRO stage, precision, schedule and activation
checkpointing) with its sizes overridden down to tiny: a tiny encoder and decoder, two synthetic
clips of 8 to 32 frames at 32 x 32.

One subprocess trains them all (one import of torch and DeepSpeed, and no process group left in
the test process). Sequence parallelism needs two processes: a recipe that asks for it
(long_clip_ulysses) trains here at sequence_parallel_size=1, and the split itself is tested by
tests/train/test_sequence_parallel.py. A recipe that starts from a timm model's hub weights
(model.init.timm_model) trains here from random weights: the download needs the network, and
the pretrained initialisation is tested by tests/models with local checkpoints.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mmsparse.train.config import RECIPES_DIR, TrainConfig, load_config
from mmsparse.train.logs import read_metrics

from tests.train.test_whole_run import _env

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
STEPS = 2
TINY = [f"run.steps={STEPS}", "run.progress=false", "run.tensorboard=false", "run.plot=false",
        "eval.at_end=false", "eval.every=0", "checkpoint.at_end=false", "checkpoint.every=0",
        "checkpoint.export=false", "optim.warmup_steps=1",
        "data.batch_size=2", "data.num_workers=0", "data.num_frames=8", "data.crop=null",
        "data.synth.clips=2", "data.synth.val_clips=0", "data.synth.frames=8", "data.synth.size=[32,32]",
        "data.synth.long_frames=[16,32]",
        "model.overrides.embed_dim=32", "model.overrides.depth=2", "model.overrides.num_heads=2",
        "model.overrides.dec_dim=32", "model.overrides.dec_depth=1", "model.overrides.dec_heads=2",
        "model.overrides.tubelet=[2,8,8]", "model.overrides.n_pool=8", "model.overrides.vocab_size=300",
        "deepspeed.sequence_parallel_size=1"]  # two processes: tests/train/test_sequence_parallel.py


def tiny(name: str, run_dir) -> TrainConfig:
    offline = ["model.init.timm_model=", "model.init.checkpoint="] if load_config(name).model.init.timm_model else []
    return load_config(name, [*TINY, *offline, f"run.dir={run_dir}"])


def _train_all(root: str) -> None:
    """Run in the subprocess: train every recipe, a line of JSON each (an error is reported, not raised)."""
    from pathlib import Path

    from mmsparse.train.loop import train

    for name in RECIPES:
        try:
            summary = train(tiny(name, Path(root) / name))
            print(json.dumps({"recipe": name, "steps": summary["steps"]}), flush=True)
        except Exception as err:  # noqa: BLE001 - each recipe's failure is its own test's
            print(json.dumps({"recipe": name, "error": f"{type(err).__name__}: {err}"}), flush=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    code = f"from tests.train.test_recipes import _train_all; _train_all({str(root)!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=560)
    results = {}
    for line in out.stdout.splitlines():
        if line.startswith('{"recipe"'):
            r = json.loads(line)
            results[r["recipe"]] = r
    return root, results, (out.stdout + out.stderr)[-3000:]


def test_every_recipe_loads():
    assert {"base", "tiny_cpu", "caption_base", "caption_base_zero3", "long_clip_ulysses",
            "longclip_local"} <= set(RECIPES)
    for name in RECIPES:
        assert isinstance(load_config(name), TrainConfig)


@pytest.mark.timeout(600)  # the first DeepSpeed run on a machine builds its CPU communication op (~90 s)
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_its_first_steps(trained, name):
    root, results, log = trained
    assert name in results, f"{name}: no result; log: {log}"
    assert "error" not in results[name], results[name]["error"]
    assert results[name]["steps"] == STEPS
    losses = [r["loss"] for r in read_metrics(root / name / "metrics.jsonl", "train")]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    # what was trained is the recipe at a tiny size: its model variant, attention schedule, task
    # and DeepSpeed setup are the recipe's own
    full, small = load_config(name), tiny(name, root / name)
    assert small.model.name == full.model.name and small.model.task == full.model.task
    assert small.model.config().schedule == full.model.config().schedule
    for key in ("zero_stage", "precision", "activation_checkpointing", "offload_optimizer"):
        assert getattr(small.deepspeed, key) == getattr(full.deepspeed, key)
