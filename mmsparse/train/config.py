"""The training config tree: dataclasses, YAML recipes with ``base:`` inheritance, dotted overrides.

A recipe is a YAML mapping whose top-level keys are the sections of ``TrainConfig`` (``run``,
``model``, ``data``, ``optim``, ``deepspeed``, ``eval``, ``checkpoint``). ``base: other.yaml``
(a path relative to the recipe, or a list of them) is merged first, the recipe on top, mappings
deep-merged, everything else replaced. Command-line overrides ``optim.lr=3e-4 data.frames=128``
come last; their values are parsed as YAML (``a.b=[1,2]``, ``a.b=null``) and coerced to the
field's type. An unknown key anywhere is a ``ConfigError`` naming the source and the nearest valid
keys. The resolved tree is written into the run folder as ``config.yaml`` (``save_config``).

Free-form mappings (``model.overrides``, ``deepspeed.extra``) are passed through unchecked here;
their consumers validate them (``create_model`` rejects unknown kwargs, DeepSpeed its JSON).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmsparse.fileio import atomic_write_text

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class ConfigError(ValueError):
    """A recipe or override that does not fit the config tree."""


# ------------------------------------------------------------------------------------------------
# The tree


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = ""                      # run folder; "" -> runs/<name>
    seed: int = 0
    steps: int = 100                   # optimizer steps
    max_minutes: float = 0.0           # wall-clock budget from the start of train(); when spent the run
                                       # ends after the current step as at run.steps (final eval,
                                       # checkpoint, export). 0: no budget
    log_every: int = 1
    progress: bool = True              # tqdm bar on rank 0
    tensorboard: bool = True
    plot: bool = True                  # curves.png at the end
    max_nonfinite_in_row: int = 5      # NaN/inf losses in a row before the run stops
    deterministic: bool = True         # torch.use_deterministic_algorithms (warn_only) for exact resume
    threads: int = 0                   # torch.set_num_threads per process; 0 leaves the default


@dataclass
class ModelConfig:
    name: str = "captioner_tiny"       # a name in mmsparse.models' registry
    task: str = "caption"              # caption | contrastive
    overrides: dict[str, Any] = field(default_factory=dict)   # kwargs of create_model


@dataclass
class SynthConfig:
    """The embedded default data, generated into <run>/data when ``data.manifest`` is absent."""

    clips: int = 16
    val_clips: int = 4
    frames: int = 16
    size: tuple[int, int] = (32, 32)
    seed: int = 0
    long: bool = False
    long_frames: tuple[int, int] = (512, 4096)
    long_lengths: str = "range"        # range: any length in long_frames; doubling: lo, 2 lo, ... (synth.make_dataset)
    frame_code: bool = True            # the frame-index band at the top of each frame (synth.make_dataset)


@dataclass
class DataSection:
    manifest: str = ""                 # "" -> synthetic data under <run>/data
    val_manifest: str = ""             # "" -> the synthetic val split, or no eval when manifest is set
    batch_size: int = 2                # micro-batch per data-parallel rank
    num_workers: int = 0
    frames: int = 16                   # frames sampled per clip
    crop: tuple[int, int] | None = None
    short_side: int | None = None
    load_audio: bool = True
    load_image: bool = False
    backend: str = "pyav"              # video decoder: pyav | decord (mmsparse.data.DataConfig)
    max_bad_fraction: float = 0.1
    synth: SynthConfig = field(default_factory=SynthConfig)
    extra: dict[str, Any] = field(default_factory=dict)       # further DataConfig fields


@dataclass
class OptimConfig:
    name: str = "adamw"                # adamw | adam
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "cosine"           # cosine | linear | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0             # 0 disables


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    offload_optimizer: str = "none"    # none | cpu | nvme
    offload_param: str = "none"        # none | cpu | nvme (stage 3)
    nvme_path: str = "/local_nvme"
    precision: str = "fp32"            # fp32 | bf16 | fp16
    grad_accum: int = 1
    activation_checkpointing: bool = False
    sequence_parallel_size: int = 1
    torch_adam: bool | None = None     # None: on when no GPU (avoids compiling fused_adam)
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    extra: dict[str, Any] = field(default_factory=dict)       # deep-merged into the JSON last


@dataclass
class EvalConfig:
    every: int = 0                     # optimizer steps between evaluations; 0: only at the end
    batches: int = 2                   # val batches per evaluation (0: all)
    at_end: bool = True
    beam: int = 1
    max_len: int = 24
    captions: int = 4                  # samples to caption for the metrics (0: loss only)


@dataclass
class CheckpointConfig:
    every: int = 0                     # optimizer steps between checkpoints; 0: only at the end
    keep: int = 2                      # most recent checkpoints kept
    at_end: bool = True
    export: bool = True                # save_pretrained into <run>/export at the end


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> "TrainConfig":
        """Cross-field checks that the types alone cannot express."""
        ds, o = self.deepspeed, self.optim
        _choice("deepspeed.precision", ds.precision, ("fp32", "bf16", "fp16"))
        _choice("deepspeed.offload_optimizer", ds.offload_optimizer, ("none", "cpu", "nvme"))
        _choice("deepspeed.offload_param", ds.offload_param, ("none", "cpu", "nvme"))
        _choice("optim.schedule", o.schedule, ("cosine", "linear", "constant"))
        _choice("optim.name", o.name, ("adamw", "adam"))
        _choice("model.task", self.model.task, ("caption", "contrastive"))
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_param != "none" and ds.zero_stage != 3:
            raise ConfigError(f"deepspeed.offload_param={ds.offload_param!r} needs zero_stage 3, got {ds.zero_stage}")
        if ds.offload_optimizer != "none" and ds.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs zero_stage >= 1")
        for name, v in (("run.steps", self.run.steps), ("data.batch_size", self.data.batch_size),
                        ("deepspeed.grad_accum", ds.grad_accum),
                        ("deepspeed.sequence_parallel_size", ds.sequence_parallel_size),
                        ("data.frames", self.data.frames)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.run.max_minutes < 0:
            raise ConfigError(f"run.max_minutes must be >= 0 (0: no budget), got {self.run.max_minutes}")
        if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"need optim.lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got "
                              f"lr={o.lr}, warmup_steps={o.warmup_steps}, min_lr_ratio={o.min_lr_ratio}")
        return self

    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        hint = difflib.get_close_matches(str(value), options, n=1)
        raise ConfigError(f"{name}={value!r} is not one of {list(options)}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))


# ------------------------------------------------------------------------------------------------
# Keys, coercion


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the tree (sections and leaves)."""
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out += valid_keys(t, key + ".")
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str) -> str:
    keys = valid_keys()
    leaf = key.rsplit(".", 1)[-1]
    hits = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    # a right leaf in the wrong section ("lr=" for "optim.lr") or a typo inside the right section
    hits += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in hits]
    hits += [k for k in difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=3, cutoff=0.75)
             for k in [kk for kk in keys if kk.rsplit(".", 1)[-1] == k] if k not in hits]
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    if "." in key:  # a typo of a leaf: suggest leaves
        hits = [h for h in hits if h not in sections]
    hits = list(dict.fromkeys(hits))[:3]
    return f"; did you mean {' or '.join(repr(h) for h in hits)}?" if hits else ""


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_tname(tp)}, got {value!r} ({source})")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errs.append(e)
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key + ".", source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r} ({source})")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, args[0], key, source) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    return value


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: dict, prefix: str, source: str):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"unknown config key {prefix + str(k)!r} ({source}){_suggest(prefix + str(k))}")
        kw[k] = _coerce(v, hints[k], prefix + k, source)
    return cls(**kw)


# ------------------------------------------------------------------------------------------------
# YAML, inheritance, overrides


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``; mappings merge recursively, anything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_recipe(recipe: str | Path) -> Path:
    """A path, or a name in the repository's recipes/ ("tiny_cpu" or "tiny_cpu.yaml")."""
    p = Path(recipe)
    candidates = [p, p.with_suffix(".yaml") if p.suffix == "" else p, RECIPES_DIR / p.name,
                  RECIPES_DIR / (p.name + ".yaml")]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    hint = difflib.get_close_matches(p.stem, known, n=1)
    raise ConfigError(f"recipe {str(recipe)!r} not found (looked in . and {RECIPES_DIR})"
                      + (f"; did you mean {hint[0]!r}?" if hint else f"; known recipes: {known}"))


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe as a dict with its ``base:`` chain merged in (cycles are errors)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"recipe inheritance cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    if not path.is_file():
        raise ConfigError(f"recipe file {path} not found" + (f" (base of {_seen[-1]})" if _seen else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        bp = Path(b)
        bp = bp if bp.is_absolute() else path.parent / bp
        merged = deep_merge(merged, load_yaml_tree(bp, (*_seen, path)))
    _check_keys(data, str(path))
    return deep_merge(merged, data)


def _check_keys(data: dict, source: str) -> None:
    try:
        _build(TrainConfig, data, "", source)
    except ConfigError as err:
        if "unknown config key" in str(err):
            raise
        # type errors are reported once the whole chain is merged (a base may be incomplete)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = dict(tree)
    for item in overrides:
        path, value = parse_override(item)
        # walk the dataclass types, so an unknown key is caught before it is set
        cls: Any = TrainConfig
        for i, part in enumerate(path):
            prefix = ".".join(path[:i + 1])
            if cls is None:  # inside a free-form mapping
                break
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(f"unknown config key {prefix!r} (command line {item!r}){_suggest(prefix)}")
            t = _hints(cls)[part]
            cls = t if dataclasses.is_dataclass(t) else None
        node = tree
        for part in path[:-1]:
            nxt = node.get(part)
            nxt = dict(nxt) if isinstance(nxt, dict) else {}
            node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return tree


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Recipe (with its bases) + overrides -> a validated ``TrainConfig``."""
    tree = load_yaml_tree(resolve_recipe(recipe)) if recipe is not None else {}
    tree = apply_overrides(tree, list(overrides))
    return _build(TrainConfig, tree, "", f"recipe {recipe}" if recipe else "overrides").validate()


def to_dict(cfg: Any) -> dict:
    """The tree as plain YAML-able data (tuples become lists)."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


def from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data, "", "dict").validate()


def save_config(cfg: TrainConfig, path: str | Path, recipe: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the resolved tree (loadable again with ``load_config(path)``), with provenance comments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "# resolved mmsparse training config\n"
    if recipe is not None:
        head += f"# recipe: {recipe}\n"
    if overrides:
        head += f"# overrides: {' '.join(overrides)}\n"
    atomic_write_text(path, head + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def data_config(cfg: TrainConfig, train: bool):
    """The ``mmsparse.data.DataConfig`` of the train or val split."""
    from mmsparse.data import DataConfig

    d = cfg.data
    names = {f.name for f in dataclasses.fields(DataConfig)}
    for k in d.extra:
        if k not in names:
            hint = difflib.get_close_matches(k, sorted(names), n=1)
            raise ConfigError(f"unknown config key 'data.extra.{k}' (not a DataConfig field)"
                              + (f"; did you mean 'data.extra.{hint[0]}'?" if hint else ""))
    kw = dict(backend=d.backend, num_frames=d.frames, crop=d.crop, short_side=d.short_side,
              load_audio=d.load_audio, load_image=d.load_image, max_bad_fraction=d.max_bad_fraction,
              train=train, seed=cfg.run.seed)
    kw.update(d.extra)
    return DataConfig(**kw)
