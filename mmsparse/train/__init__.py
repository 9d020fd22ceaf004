"""mmsparse.train: recipes -> typed config -> DeepSpeed engine -> resumable, logged runs.

- ``config``: the dataclass tree, YAML recipes with ``base:`` inheritance, dotted overrides,
  nearest-key suggestions for unknown keys, the resolved ``config.yaml`` of a run.
- ``deepspeed_config``: the DeepSpeed JSON generated from a recipe.
- ``loop``: data, model + task, engine, steps, evaluation, throughput, failure handling.
- ``resume``: the checks of ``--resume`` (a complete run, a changed config) and the weights of
  ``--init-from``.
- ``checkpoint``: DeepSpeed checkpoints + RNG + data position, atomic ``latest``, verification,
  export to ``save_pretrained``.
- ``parallel``: activation checkpointing and DeepSpeed-Ulysses sequence parallelism, applied
  from outside the model.
- ``logs``: tqdm, tensorboard, ``metrics.jsonl``, ``curves.png``.

This is the only package that imports deepspeed (lazily: importing ``mmsparse.train`` does not).
Launch: ``mmsparse train RECIPE [k=v ...]``, ``deepspeed --num_gpus N --module mmsparse.train RECIPE``.
"""

from .config import ConfigError, TrainConfig, load_config, save_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "save_config"]
