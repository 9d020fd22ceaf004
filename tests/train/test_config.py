"""Config tree: recipe inheritance, overrides, unknown keys with suggestions, the resolved file."""

from __future__ import annotations

import pytest
import yaml

from mmsparse.train.config import (RECIPES_DIR, ConfigError, TrainConfig, data_config, load_config, save_config,
                                   valid_keys)


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"base", "tiny_cpu", "caption_base", "caption_base_zero3", "long_clip_ulysses"} <= set(names)
    for n in names:
        assert isinstance(load_config(n), TrainConfig)


def test_inheritance_chain_and_override_order(tmp_path):
    _write(tmp_path / "a.yaml", {"run": {"steps": 10, "seed": 3}, "optim": {"lr": "1e-3", "betas": [0.8, 0.9]}})
    _write(tmp_path / "b.yaml", {"base": "a.yaml", "run": {"steps": 20}, "deepspeed": {"zero_stage": 3}})
    _write(tmp_path / "c.yaml", {"base": "b.yaml", "optim": {"lr": 2e-3}})
    cfg = load_config(tmp_path / "c.yaml", ["run.steps=30", "data.frames=128", "optim.lr=3e-4",
                                            "deepspeed.precision=bf16", "data.crop=[64,48]"])
    assert cfg.run.seed == 3                       # from the grand-parent, deep-merged
    assert cfg.run.steps == 30                     # command line beats the recipe beats its base
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.optim.lr == pytest.approx(3e-4)     # "3e-4" (a YAML 1.1 string) coerced to float
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.frames == 128 and cfg.data.crop == (64, 48)
    assert load_config(tmp_path / "c.yaml").optim.lr == pytest.approx(2e-3)
    # tiny_cpu derives from base.yaml and changes what it names only
    tiny, base = load_config("tiny_cpu"), load_config("base")
    assert tiny.deepspeed.precision == "fp32" and base.deepspeed.precision == "bf16"
    assert tiny.optim.betas == base.optim.betas


def test_unknown_keys_suggest_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config("tiny_cpu", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'lr'.*did you mean 'optim\.lr'"):
        load_config("tiny_cpu", ["lr=1e-3"])
    with pytest.raises(ConfigError, match=r"'deepspeed\.zero'.*'deepspeed\.zero_stage'"):
        load_config("tiny_cpu", ["deepspeed.zero=3"])
    _write(tmp_path / "bad.yaml", {"base": str(RECIPES_DIR / "base.yaml"), "data": {"batch_szie": 4}})
    with pytest.raises(ConfigError, match=r"'data\.batch_szie'.*bad\.yaml.*did you mean 'data\.batch_size'"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="did you mean 'tiny_cpu'"):
        load_config("tiny_cup")


def test_type_and_value_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.steps: expected int"):
        load_config("tiny_cpu", ["run.steps=many"])
    with pytest.raises(ConfigError, match=r"deepspeed\.precision='bf61'.*did you mean 'bf16'"):
        load_config("tiny_cpu", ["deepspeed.precision=bf61"])
    with pytest.raises(ConfigError, match="offload_param.*zero_stage 3"):
        load_config("tiny_cpu", ["deepspeed.offload_param=cpu", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config("tiny_cpu", ["optim.lr"])
    _write(tmp_path / "x.yaml", {"base": "y.yaml"})
    _write(tmp_path / "y.yaml", {"base": "x.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    # data.extra.KEY is the older spelling of data.KEY: checked at load as data.KEY
    with pytest.raises(ConfigError, match=r"'data\.num_frame'.*did you mean 'data\.num_frames'"):
        load_config("tiny_cpu", ["data.extra={num_frame: 3}"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny_cpu", ["optim.lr=1e-3", "model.overrides={depth: 3}"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml", "tiny_cpu", ["optim.lr=1e-3"])
    text = path.read_text()
    assert "# overrides: optim.lr=1e-3" in text
    assert load_config(path) == cfg
    assert "optim.lr" in valid_keys() and "deepspeed.sequence_parallel_size" in valid_keys()
    dc = data_config(cfg, train=True)
    assert dc.num_frames == cfg.data.num_frames == cfg.data.frames and dc.train and dc.seed == cfg.run.seed
    assert dc.flip is False and dc.load_image is False  # base.yaml's flip; the training default
    assert "seed" not in yaml.safe_load(text)["data"]     # set by the trainer, not a key


def test_one_model_config_and_one_data_config():
    """The tree nests the components' own configs: data is a DataConfig, model.overrides are
    ModelConfig fields (typed at load), and the older spellings of recipes still load."""
    from mmsparse.data import DataConfig
    from mmsparse.models import ModelConfig

    cfg = load_config("tiny_cpu", ["data.frames=4", "data.extra.hop_seconds=0.02", "data.extra={stride: 2}",
                                   "model.overrides.video_tile=[2,2,2]", "model.overrides.mlp_ratio=3"])
    assert isinstance(cfg.data, DataConfig) and cfg.data.num_frames == 4 and cfg.data.hop_seconds == 0.02
    assert cfg.data.stride == 2
    assert cfg.model.overrides == {"video_tile": (2, 2, 2), "mlp_ratio": 3.0}
    m = cfg.model.config()
    assert isinstance(m, ModelConfig) and m.video_tile == (2, 2, 2) and m.embed_dim == 64  # captioner_tiny's
    assert "data.num_frames" in valid_keys() and "data.flip" in valid_keys() and "data.extra" not in valid_keys()


def test_config_saved_in_the_older_spelling_loads_the_same(tmp_path):
    """A run's config.yaml written before data took DataConfig's fields (data.frames, data.extra)
    loads to the same tree, and a resume compares it without spurious differences."""
    from mmsparse.train.config import from_dict, normalized_tree, to_dict
    from mmsparse.train.resume import config_differences

    cfg = load_config("longclip_local")
    old = to_dict(cfg)
    data = old["data"]
    keep = ("manifest", "val_manifest", "batch_size", "num_workers", "crop", "short_side", "load_audio",
            "load_image", "backend", "max_bad_fraction", "synth")
    old["data"] = {**{k: data[k] for k in keep}, "frames": data["num_frames"],
                   "extra": {k: v for k, v in data.items() if k not in keep and k != "num_frames"}}
    assert from_dict(old) == cfg and normalized_tree(old) == to_dict(cfg)
    assert config_differences(old, cfg) == []
    assert config_differences(old, load_config("longclip_local", ["data.frames=128"])) == [
        "data.num_frames: 256 -> 128"]
