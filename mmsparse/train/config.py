"""The training config tree: dataclasses, YAML recipes with ``base:`` inheritance, dotted overrides.

A recipe is a YAML mapping whose top-level keys are the sections of ``TrainConfig`` (``run``,
``model``, ``data``, ``optim``, ``deepspeed``, ``eval``, ``checkpoint``, ``kernels``).
``base: other.yaml`` (a path relative to the recipe, or a list of them) is merged first, the
recipe on top, mappings deep-merged, everything else replaced. Command-line overrides ``optim.lr=3e-4 data.frames=128``
come last; their values are parsed as YAML (``a.b=[1,2]``, ``a.b=null``).

Each component owns its config: ``data`` is ``mmsparse.data.DataConfig`` plus where the data
comes from and how it is batched (``DataSection``); ``model.overrides`` are fields of
``mmsparse.models.ModelConfig`` over the registry variant ``model.name``; ``kernels`` is
``mmsparse.kernels.options.KernelOptions`` (its ``MMSPARSE_*`` environment variables override
it field by field, see that module). The tree is validated by pydantic against the dataclasses' types (``Literal`` choices, ``Annotated``
bounds) when it is loaded, before anything is written: an unknown key, a duplicate YAML key, a
wrong type or a value out of range is a ``ConfigError`` naming the key, the recipe file and
line or the command-line item it came from, and for unknown keys and choices the nearest valid
ones (the YAML itself, with each key's file and line, is read by ``recipe``). The resolved tree
is written into the run folder as ``config.yaml`` (``save_config``).

Older spellings still load: ``data.frames`` is ``data.num_frames`` and ``data.extra.KEY`` is
``data.KEY`` (``ALIASES``). ``deepspeed.extra`` is passed through unchecked (DeepSpeed checks
its JSON).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from annotated_types import Ge, Gt, Interval
from pydantic import AllowInfNan, ConfigDict, TypeAdapter, ValidationError

from mmsparse.data import DataConfig
from mmsparse.fileio import atomic_write_text
from mmsparse.kernels.options import KernelOptions
from mmsparse.models import ModelConfig, list_models
from mmsparse.models.registry import model_config

from .recipe import RECIPES_DIR, ConfigError, Sources, at, deep_merge, load_tree, parse_override, resolve_recipe, set_key

__all__ = ["RECIPES_DIR", "ConfigError", "TrainConfig", "data_config", "deep_merge", "from_dict", "load_config",
           "normalized_tree", "parse_override", "resolve_recipe", "save_config", "to_dict", "valid_keys"]

# Older key spellings, still read from recipes, saved configs and the command line
ALIASES = {"data.frames": "data.num_frames", "data.extra.": "data."}


# ------------------------------------------------------------------------------------------------
# The tree

Count = Annotated[int, Ge(1)]
NonNegative = Annotated[int, Ge(0)]
Fraction = Annotated[float, AllowInfNan(False), Interval(ge=0, le=1)]
Positive = Annotated[float, AllowInfNan(False), Gt(0)]
NonNegativeFloat = Annotated[float, AllowInfNan(False), Ge(0)]
Offload = Literal["none", "cpu", "nvme"]


def section(cls):
    """A dataclass of the tree (a number where a string is expected is read as that string);
    frozen when it extends a frozen component config (``KernelOptions``)."""
    cls.__pydantic_config__ = ConfigDict(coerce_numbers_to_str=True)
    frozen = any(getattr(base, "__dataclass_params__", None) is not None and base.__dataclass_params__.frozen
                 for base in cls.__mro__[1:])
    return dataclass(cls, frozen=frozen)


@section
class RunConfig:
    name: str = "run"
    dir: str = ""                      # run folder; "" -> runs/<name>
    seed: NonNegative = 0
    steps: Count = 100                 # optimizer steps
    max_minutes: NonNegativeFloat = 0.0  # wall-clock budget from the start of train(); when spent the
                                       # run ends after the current step as at run.steps (final eval,
                                       # checkpoint, export). 0: no budget
    log_every: Count = 1
    progress: bool = True              # tqdm bar on rank 0
    tensorboard: bool = True
    plot: bool = True                  # curves.png at the end
    max_nonfinite_in_row: Count = 5    # NaN/inf losses in a row before the run stops
    deterministic: bool = True         # torch.use_deterministic_algorithms (warn_only) for exact resume
    threads: NonNegative = 0           # torch.set_num_threads per process; 0 leaves the default


@section
class InitSection:
    """Pretrained encoder weights from a timm ViT (mmsparse.models.pretrained): a timm model name
    and / or a local checkpoint file, loaded through timm. Empty: random initialisation."""

    timm_model: str = ""               # timm architecture[.tag], e.g. vit_base_patch16_224, vit_base_patch16_clip_224
    checkpoint: str = ""               # local .safetensors / .pth / .bin; "" with timm_model: timm's hub download
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs (a variant, e.g. depth: 2)
    inflate: Literal["central", "average"] = "central"  # 2D patch filter -> tubelet: middle frame / mean
    match_encoder: bool = True         # encoder width, depth, heads, norms, patch size from the checkpoint


@section
class FreezeSection:
    """Parameters kept fixed while fine-tuning (mmsparse.models.pretrained.freeze)."""

    encoder: bool = False              # video / image patch embeddings, pre-norm, blocks, final norm
    patch_embed: bool = False          # the video / image patch embeddings
    blocks: NonNegative = 0            # the first N encoder blocks


@section
class ModelSection:
    """Which model: a variant of mmsparse.models' registry, its ModelConfig fields changed by
    ``overrides``, and the task it is trained for."""

    name: str = "captioner_tiny"       # a name in mmsparse.models' registry
    task: Literal["caption", "contrastive"] = "caption"
    overrides: dict[str, Any] = field(default_factory=dict)   # ModelConfig fields (create_model kwargs)
    init: InitSection = field(default_factory=InitSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)

    def config(self) -> ModelConfig:
        """The ModelConfig the run builds."""
        return model_config(self.name, **self.overrides)


@section
class SynthConfig:
    """The embedded default data, generated into <run>/data when ``data.manifest`` is absent."""

    clips: Count = 16
    val_clips: NonNegative = 4         # 0: no validation split
    frames: Count = 16
    size: tuple[Count, Count] = (32, 32)
    seed: NonNegative = 0
    long: bool = False
    long_frames: tuple[Count, Count] = (512, 4096)
    long_lengths: Literal["range", "doubling"] = "range"  # range: any length in long_frames; doubling:
                                       # lo, 2 lo, ... (synth.make_dataset)
    frame_code: bool = True            # the frame-index band at the top of each frame (synth.make_dataset)
    empty_fraction: Fraction = 0.125   # share of short clips where nothing happens ("nothing happens")


@section
class DataSection(DataConfig):
    """``mmsparse.data.DataConfig`` (how samples are read) plus where the data comes from and how
    it is batched. ``train`` and ``seed`` are set by the trainer (``data_config``)."""

    SET_BY_TRAINER: ClassVar[dict[str, str]] = {"train": "the split", "seed": "run.seed"}

    manifest: str = ""                 # "" -> synthetic data under <run>/data
    val_manifest: str = ""             # "" -> the synthetic val split, or no eval when manifest is set
    batch_size: Count = 2              # micro-batch per data-parallel rank
    num_workers: NonNegative = 0
    load_image: bool = False
    synth: SynthConfig = field(default_factory=SynthConfig)

    @property
    def frames(self) -> int | None:
        """``num_frames``, by its recipe name."""
        return self.num_frames


@section
class OptimConfig:
    name: Literal["adamw", "adam"] = "adamw"
    lr: Positive = 3e-4
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: Positive = 1e-8
    warmup_steps: NonNegative = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: Fraction = 0.1
    grad_clip: NonNegativeFloat = 1.0  # 0 disables
    # layer-wise lr decay (BEiT; timm's param_groups_layer_decay): block i of a depth-L encoder
    # trains at lr * layer_decay ** (L - i), the decoder at lr; 1: off (one parameter group)
    layer_decay: Annotated[float, AllowInfNan(False), Interval(gt=0, le=1)] = 1.0


@section
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: Offload = "none"
    offload_param: Offload = "none"    # stage 3 only
    nvme_path: str = "/local_nvme"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: Count = 1
    activation_checkpointing: bool = False
    sequence_parallel_size: Count = 1
    torch_adam: bool | None = None     # None: on when no GPU (avoids compiling fused_adam)
    overlap_comm: bool = True
    reduce_bucket_size: Count = 50_000_000
    stage3_prefetch_bucket_size: NonNegative = 50_000_000
    stage3_param_persistence_threshold: NonNegative = 100_000
    extra: dict[str, Any] = field(default_factory=dict)       # deep-merged into the JSON last


@section
class EvalConfig:
    every: NonNegative = 0             # optimizer steps between evaluations; 0: only at the end
    batches: NonNegative = 2           # val batches per evaluation (0: all)
    at_end: bool = True
    beam: Count = 1
    max_len: Count = 24
    captions: NonNegative = 4          # samples to caption for the metrics (0: loss only)


@section
class CheckpointConfig:
    every: NonNegative = 0             # optimizer steps between checkpoints; 0: only at the end
    keep: Count = 2                    # most recent checkpoints kept
    at_end: bool = True
    export: bool = True                # save_pretrained into <run>/export at the end


@section
class KernelsSection(KernelOptions):
    """``mmsparse.kernels.options.KernelOptions``: the attention backend and the Triton kernels'
    tuning knobs, set for the whole run when it starts (``kernels.mask_tile_mb=1024``,
    ``kernels.autotune=true``). Each field's ``MMSPARSE_*`` environment variable, when set,
    overrides the config's value (the table in ``mmsparse.kernels.options``)."""


@section
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsSection = field(default_factory=KernelsSection)

    def validate(self, where: typing.Callable[[str], str] = lambda key: "") -> "TrainConfig":
        """Checks across fields, which the types alone cannot express; ``where(key)`` names the
        source of a key's value for the message."""
        ds, m = self.deepspeed, self.model

        def fail(key: str, msg: str):
            raise ConfigError(f"{key}: {msg}{at(where(key))}")

        if ds.offload_param != "none" and ds.zero_stage != 3:
            fail("deepspeed.offload_param", f"{ds.offload_param!r} needs zero_stage 3, got {ds.zero_stage}")
        if ds.offload_optimizer != "none" and ds.zero_stage == 0:
            fail("deepspeed.offload_optimizer", "needs zero_stage >= 1")
        if self.kernels.compile_blocks != "0" and ds.zero_stage == 3:
            # ZeRO-3's hooks gather each block's weights as it runs; dynamo guards on them and
            # recompiles for every block past its limit of 8 (the blocks then run eager anyway)
            fail("kernels.compile_blocks", f"{self.kernels.compile_blocks!r} needs zero_stage <= 2 (ZeRO-3's "
                 "parameter hooks make torch.compile recompile for every block); set it to '0'")
        lo, hi = self.data.synth.long_frames
        if lo > hi:
            fail("data.synth.long_frames", f"needs low <= high, got {[lo, hi]}")
        if m.name not in list_models():
            names = list_models()
            fail("model.name", f"{m.name!r} is not one of {', '.join(names)}{_did_you_mean(m.name, names)}")
        try:
            m.config()
        except ValueError as err:  # ModelConfig's own checks (schedule names, head sizes, ...)
            keys = _named_fields(str(err), list(m.overrides))
            key = f"model.overrides.{keys[0]}" if keys else "model.overrides"
            fail(key, f"{err} (model.name={m.name!r})")
        return self

    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")


# ------------------------------------------------------------------------------------------------
# Keys and their sources


def _fields(cls: type) -> list[str]:
    skip = getattr(cls, "SET_BY_TRAINER", {})
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the tree (sections and leaves)."""
    out = []
    for name in _fields(cls):
        key = prefix + name
        out.append(key)
        sub = _hints(cls)[name]
        if dataclasses.is_dataclass(sub):
            out += valid_keys(sub, key + ".")
    return out


def _did_you_mean(value: Any, options: list[str]) -> str:
    hits = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f"; did you mean {hits[0]!r}?" if hits else ""


def _suggest(key: str, keys: list[str] | None = None) -> str:
    keys = keys if keys is not None else valid_keys() + ["data.frames"]
    leaf = key.rsplit(".", 1)[-1]
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    hits = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    # a right leaf in the wrong section ("lr=" for "optim.lr") or a typo inside the right section
    hits += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in hits]
    hits += [k for near in difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.75)
             for k in keys if k.rsplit(".", 1)[-1] == near and k not in hits]
    if "." in key:  # a typo of a leaf: suggest leaves
        hits = [h for h in hits if "." in h]
    hits = list(dict.fromkeys(hits))[:3]
    return f"; did you mean {' or '.join(repr(h) for h in hits)}?" if hits else ""


def _canonical(key: str) -> str:
    """``key`` in its current spelling (``ALIASES``)."""
    for _ in range(2):  # data.extra.frames -> data.frames -> data.num_frames
        for old, new in ALIASES.items():
            if old.endswith(".") and key.startswith(old):
                key = new + key[len(old):]
            elif key == old or key.startswith(old + "."):
                key = new + key[len(old):]
    return key


@functools.cache
def _mappings(cls: type = TrainConfig, prefix: str = "") -> frozenset[str]:
    """The keys whose value is a mapping of its own (``model.overrides``, ``deepspeed.extra``)."""
    out = set()
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out |= _mappings(tp, f"{prefix}{name}.")
        elif typing.get_origin(tp) is dict:
            out.add(prefix + name)
    return frozenset(out)


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in _mappings():
            out += _leaves(v, key + ".")
        else:
            out.append((key, v))
    return out


def _canonical_layer(tree: dict, sources: Sources) -> tuple[dict, Sources]:
    """One recipe file or saved tree with older spellings renamed (``ALIASES``)."""
    flat = [(k, v) for k, v in _leaves(tree) if not (k == "data.extra" and not v)]
    if all(_canonical(k) == k for k, _ in flat) and len(flat) == len(_leaves(tree)):
        return tree, sources
    out: dict = {}
    seen: dict[str, str] = {}
    for key, value in flat:
        new = _canonical(key)
        if new in seen:
            raise ConfigError(f"{new!r} is set twice, as {seen[new]!r} and {key!r}{at(sources.of(key))}")
        seen[new] = key
        set_key(out, new, value)
    return out, Sources({_canonical(k): src for k, src in sources.items()})


def _check_keys(tree: dict, sources: Sources, cls: type = TrainConfig, prefix: str = "") -> None:
    """Unknown keys (with the nearest valid ones) before any value is read."""
    hints = _hints(cls)
    names = _fields(cls)
    for k, v in tree.items():
        key = prefix + str(k)
        if k in getattr(cls, "SET_BY_TRAINER", {}):
            raise ConfigError(f"{key} cannot be set: the trainer sets it from {cls.SET_BY_TRAINER[k]}"
                              f"{at(sources.of(key))}")
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}{at(sources.of(key))}{_suggest(key)}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            _check_keys(v, sources, hints[k], key + ".")
    model = tree.get("model") if prefix == "" else None
    overrides = model.get("overrides") if isinstance(model, dict) else None
    if isinstance(overrides, dict):
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        for k in overrides:
            if k not in fields or k == "name":
                key = f"model.overrides.{k}"
                raise ConfigError(f"unknown config key {key!r} (not a ModelConfig field){at(sources.of(key))}"
                                  + _suggest(key, [f"model.overrides.{f}" for f in fields if f != "name"]))


# ------------------------------------------------------------------------------------------------
# Validation (pydantic against the dataclasses' types)


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(TrainConfig)


def _field_type(cls: Any, loc: tuple) -> Any:
    """The annotated type at ``loc`` inside the dataclass ``cls`` (None when not a field)."""
    tp: Any = cls
    for part in loc:
        if isinstance(part, int) or not dataclasses.is_dataclass(tp):
            return tp
        tp = _hints(tp).get(part)
    return tp


def _type_name(tp: Any) -> str:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(args)} values"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _valueat(tree: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            tree = tree[part]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _explain(err: dict, tree: dict, sources: Sources, root: type = TrainConfig, prefix: str = "") -> str:
    """One pydantic error as a message naming the key, the bound and where the value was set."""
    loc = tuple(err["loc"])
    kind, ctx = err["type"], err.get("ctx") or {}
    # the field (a tuple's element is reported against the whole tuple)
    field_loc = loc
    while field_loc and isinstance(field_loc[-1], int):
        field_loc = field_loc[:-1]
    key = prefix + ".".join(str(p) for p in field_loc)
    where = at(sources.of(key))
    value = _valueat(tree, field_loc)
    if kind == "value_error":  # a dataclass's own __post_init__ check, reported against its section
        msg = str(ctx.get("error", err["msg"]))
        cls = _field_type(root, field_loc)
        named = _named_fields(msg, _fields(cls) if dataclasses.is_dataclass(cls) else [])
        if named:
            key = f"{key}.{named[0]}" if key else named[0]
            return f"{key}: {msg}{at(sources.of(key))}"
        return f"{key}: {msg}{at(', '.join(sources.under(key)))}"
    if kind in ("literal_error", "enum"):
        options = [a.group(1) or a.group(2) for a in re.finditer(r"'((?:[^'\\]|\\.)*)'|(-?\d+)", ctx["expected"])]
        return (f"{key}={value!r}: expected one of {', '.join(options)}{_did_you_mean(value, options)}{where}")
    if kind == "missing" and field_loc != loc:  # a tuple given too few values
        return f"{key}: expected {_type_name(_field_type(root, field_loc))}, got {value!r}{where}"
    if "expected" not in str(ctx) and any(w in kind for w in ("parsing", "_type", "from_float")):
        return f"{key}: expected {_type_name(_field_type(root, field_loc))}, got {value!r}{where}"
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:]
    shown = value if value is not None or not loc else _valueat(tree, loc)
    return f"{key}={shown!r}: {msg.replace('input should', 'must')}{where}"


def _named_fields(msg: str, names: list[str]) -> list[str]:
    """The field names a check's message mentions (``video_fallback`` or "video fallback"), in
    the order they appear."""
    found = {}
    for n in names:
        m = re.search(rf"\b({re.escape(n)}|{re.escape(n.replace('_', ' '))})\b", msg)
        if m:
            found[n] = m.start()
    return sorted(found, key=found.get)


def _validate(tree: dict, sources: Sources) -> TrainConfig:
    _check_keys(tree, sources)
    try:
        cfg = _adapter().validate_python(tree)
    except ValidationError as err:
        raise ConfigError("; ".join(_explain(e, tree, sources) for e in err.errors())) from None
    # model.overrides: each value against its ModelConfig field's type
    hints = _hints(ModelConfig)
    fixed, errors = {}, []
    for k, v in cfg.model.overrides.items():
        try:
            fixed[k] = TypeAdapter(hints[k]).validate_python(v)
        except ValidationError as err:
            errors += [_explain({**e, "loc": (k, *e["loc"])}, cfg.model.overrides, sources, ModelConfig,
                                "model.overrides.") for e in err.errors()]
    if errors:
        raise ConfigError("; ".join(errors))
    cfg.model.overrides = fixed
    return cfg.validate(sources.of)


# ------------------------------------------------------------------------------------------------
# Loading


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...],
                    sources: Sources | None = None) -> tuple[dict, Sources]:
    """The command-line items over the tree: each sets (replaces) one key."""
    tree, sources = dict(tree), Sources(sources or {})
    for item in overrides:
        path, value = parse_override(item)
        key = ".".join(path)
        if key == "data.extra" and isinstance(value, dict):  # older spelling: each entry is data.<entry>
            items = [(_canonical(f"data.{k}"), v) for k, v in value.items()]
        else:
            items = [(_canonical(key), value)]
        for k, v in items:
            set_key(tree, k, v)
            for stale in [s for s in sources if s.startswith(k + ".")]:
                del sources[stale]
            sources[k] = f"command line {item!r}"
    return tree, sources


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Recipe (with its bases) + overrides -> a validated ``TrainConfig``, or a ``ConfigError``."""
    tree, sources = load_tree(resolve_recipe(recipe), _canonical_layer) if recipe is not None else ({}, Sources())
    tree, sources = apply_overrides(tree, list(overrides), sources)
    return _validate(tree, sources)


def to_dict(cfg: Any) -> dict:
    """The tree as plain YAML-able data (tuples become lists)."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {name: conv(getattr(x, name)) for name in _fields(type(x))}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


def from_dict(data: dict, source: str = "dict") -> TrainConfig:
    """A saved tree (e.g. a run's ``config.yaml``), older spellings included, validated."""
    sources = Sources({k: source for k, _ in _leaves(data)})
    return _validate(*_canonical_layer(data, sources))


def normalized_tree(tree: dict) -> dict:
    """A saved tree as ``to_dict`` writes it now (current spellings, defaults filled in), or, when
    it no longer validates, with its keys renamed only (for comparing a run's saved config)."""
    try:
        return to_dict(from_dict(tree))
    except ConfigError:
        return _canonical_layer(tree, Sources())[0]


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


def data_config(cfg: TrainConfig, train: bool) -> DataConfig:
    """The ``mmsparse.data.DataConfig`` of the train or val split."""
    kw = {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{**kw, "train": train, "seed": cfg.run.seed})
