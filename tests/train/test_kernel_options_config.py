"""The config's ``kernels`` section is the run's kernel options (mmsparse.kernels.options): a
recipe or command-line value reaches ``kernel_options()`` while the run lasts, a bad value is
refused when the config loads, and an ``MMSPARSE_*`` environment variable wins over the config."""

from __future__ import annotations

import pytest

from mmsparse.kernels.options import KernelOptions, kernel_options
from mmsparse.train.config import RECIPES_DIR, ConfigError, load_config, to_dict
from mmsparse.train.loop import run_kernel_options
from mmsparse.train.resume import config_differences


@pytest.fixture(autouse=True)
def _no_kernel_variables(monkeypatch):
    for var in ("MMSPARSE_MASK_TILE_MB", "MMSPARSE_TRITON_AUTOTUNE", "MMSPARSE_TRITON_TMA"):
        monkeypatch.delenv(var, raising=False)


def test_recipe_and_command_line_values_reach_the_kernel_options(tmp_path):
    (tmp_path / "r.yaml").write_text(f"base: {RECIPES_DIR / 'tiny_cpu.yaml'}\nkernels:\n  mask_tile_mb: 1024\n  tma: 0\n")
    cfg = load_config(tmp_path / "r.yaml", ["kernels.autotune=true"])
    assert isinstance(cfg.kernels, KernelOptions)
    assert to_dict(cfg)["kernels"]["mask_tile_mb"] == 1024
    before = kernel_options()
    with run_kernel_options(cfg) as opts:
        assert kernel_options() == opts
        assert (opts.mask_tile_mb, opts.autotune, opts.tma) == (1024.0, True, "0")
        assert opts.sdpa_max_tokens == KernelOptions().sdpa_max_tokens  # the rest stays at the defaults
    assert kernel_options() == before  # the previous options are back after the run


def test_environment_overrides_the_config(monkeypatch):
    cfg = load_config("tiny_cpu", ["kernels.mask_tile_mb=1024", "kernels.autotune=true"])
    monkeypatch.setenv("MMSPARSE_MASK_TILE_MB", "64")
    with run_kernel_options(cfg) as opts:
        assert (opts.mask_tile_mb, opts.autotune) == (64.0, True)


@pytest.mark.parametrize("item,message", [
    ("kernels.mask_tile_mb=-1", r"kernels\.mask_tile_mb: mask_tile_mb must be >= 0, got -1"),
    ("kernels.tma=fast", r"kernels\.tma: tma must be auto, 0 or 1, got 'fast'"),
    ("kernels.attention_backend=trition", r"kernels\.attention_backend: attention_backend must be None or one of"),
    ("kernels.autotune=maybe", r"kernels\.autotune: expected bool, got 'maybe'"),
    ("kernels.mask_tile=1", r"unknown config key 'kernels\.mask_tile'.*did you mean 'kernels\.mask_tile"),
])
def test_bad_kernel_value_is_refused_naming_the_command_line(item, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("tiny_cpu", [item])
    assert f"(command line {item!r})" in str(err.value)


def test_bad_recipe_value_names_the_file_and_line(tmp_path):
    (tmp_path / "r.yaml").write_text(f"base: {RECIPES_DIR / 'tiny_cpu.yaml'}\nkernels:\n  mask_tile_mb: -5\n")
    with pytest.raises(ConfigError, match=r"kernels\.mask_tile_mb: mask_tile_mb must be >= 0, got -5.* \(.*r\.yaml:3\)"):
        load_config(tmp_path / "r.yaml")


def test_a_resume_may_change_the_kernel_options():
    """They choose how the same attention is computed (e.g. tiles for another GPU's memory)."""
    saved = to_dict(load_config("tiny_cpu"))
    assert config_differences(saved, load_config("tiny_cpu", ["kernels.mask_tile_mb=512"])) == []
    assert config_differences(saved, load_config("tiny_cpu", ["optim.lr=1e-3"])) != []
