"""Every config value is checked when the config is loaded, before a run folder exists: ranges,
choices (with the nearest valid one), duplicate YAML keys, and each message names where the
value came from (recipe file and line, or the command-line item)."""

from __future__ import annotations

import pytest

from mmsparse.train.cli import EXIT_CONFIG, main
from mmsparse.train.config import ConfigError, load_config

# (override, what the message must say): each passed the old checks and failed mid-run or never
BAD = [
    ("run.log_every=0", r"run\.log_every=0: must be greater than or equal to 1"),
    ("optim.lr=.nan", r"optim\.lr=nan: must be a finite number"),
    ("optim.lr=-1e-3", r"optim\.lr='-1e-3': must be greater than 0"),
    ("optim.lr=abc", r"optim\.lr: expected float, got 'abc'"),
    ("data.backend=ffmpeg", r"data\.backend='ffmpeg': expected one of pyav, decord"),
    ("data.backend=pyv", r"expected one of pyav, decord; did you mean 'pyav'\?"),
    ("data.max_bad_fraction=5", r"data\.max_bad_fraction=5: must be less than or equal to 1"),
    ("data.frames=0", r"data\.num_frames=0: must be greater than or equal to 1"),
    ("data.num_workers=-1", r"data\.num_workers=-1: must be greater than or equal to 0"),
    ("data.crop=[64]", r"data\.crop: expected a list of 2 values"),
    ("data.extra.hop_seconds=0", r"data\.hop_seconds=0: must be greater than 0"),
    ("data.video_fallback=pyav", r"data\.video_fallback: .*primary backend"),
    ("optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio=1\.5: must be less than or equal to 1"),
    ("optim.betas=[0.9,1.5]", r"optim\.betas=\[0\.9, 1\.5\]: must be less than or equal to 1"),
    ("optim.schedule=cosin", r"expected one of cosine, linear, constant; did you mean 'cosine'\?"),
    ("eval.beam=0", r"eval\.beam=0: must be greater than or equal to 1"),
    ("checkpoint.keep=0", r"checkpoint\.keep=0"),
    ("deepspeed.zero_stage=4", r"deepspeed\.zero_stage=4: expected one of 0, 1, 2, 3"),
    ("data.synth.long_lengths=double", r"did you mean 'doubling'\?"),
    ("model.name=captioner_tny", r"model\.name: .*did you mean 'captioner_tiny'\?"),
    ("model.overrides.schedule=locl", r"model\.overrides\.schedule: schedule must be one of"),
    ("model.overrides.num_heads=3", r"model\.overrides\.num_heads: .*even head_dim"),
    ("model.overrides.depth=two", r"model\.overrides\.depth: expected int, got 'two'"),
    ("model.overrides.depht=2", r"unknown config key 'model\.overrides\.depht'.*'model\.overrides\.depth'"),
    ("data.seed=1", r"data\.seed cannot be set: the trainer sets it from run\.seed"),
]


@pytest.mark.parametrize("item,message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_an_error_naming_the_command_line(item, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("tiny_cpu", [item])
    assert f"(command line {item!r})" in str(err.value)
    assert ".yaml" not in str(err.value)  # the value came from the command line, not the recipe


def test_recipe_values_are_blamed_on_file_and_line(tmp_path):
    (tmp_path / "a.yaml").write_text("run:\n  steps: 10\noptim:\n  lr: abc\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nrun:\n  steps: 20\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=r"run\.log_every=0: .* \(.*b\.yaml:4\)"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'abc' \(.*a\.yaml:4\)"):
        load_config(tmp_path / "b.yaml", ["run.log_every=2"])
    # the command line replaces the recipe's value: a bad value there is the command line's
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'abc' \(command line 'optim\.lr=abc'\)"):
        load_config(tmp_path / "c.yaml", ["optim.lr=abc"])
    # an older spelling in a recipe is blamed on its own line
    (tmp_path / "d.yaml").write_text("data:\n  batch_size: 2\n  extra:\n    flip: false\n    hop_seconds: -1\n")
    with pytest.raises(ConfigError, match=r"data\.hop_seconds=-1: must be greater than 0 \(.*d\.yaml:5\)"):
        load_config(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.batch_szie' \(.*e\.yaml:2\)"):
        (tmp_path / "e.yaml").write_text("data:\n  batch_szie: 2\n")
        load_config(tmp_path / "e.yaml")


def test_duplicate_yaml_keys_are_errors(tmp_path):
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 5\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:4: duplicate key 'lr' \(first at line 2\)"):
        load_config(tmp_path / "dup.yaml")
    (tmp_path / "dup2.yaml").write_text("run:\n  steps: 3\nrun:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"dup2\.yaml:3: duplicate key 'run'"):
        load_config(tmp_path / "dup2.yaml")
    # the same key in both spellings is set twice too
    (tmp_path / "dup3.yaml").write_text("data:\n  frames: 8\n  num_frames: 4\n")
    with pytest.raises(ConfigError, match=r"'data\.num_frames' is set twice"):
        load_config(tmp_path / "dup3.yaml")


@pytest.mark.parametrize("item", ["run.log_every=0", "optim.lr=.nan", "data.backend=ffmpeg",
                                  "data.max_bad_fraction=5", "optim.lr=abc"])
def test_cli_exits_2_before_the_run_folder_exists(tmp_path, capsys, item):
    run = tmp_path / "run"
    assert main(["tiny_cpu", f"run.dir={run}", item]) == EXIT_CONFIG == 2
    assert not run.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"command line {item!r}" in err


def test_compiled_blocks_need_zero_stage_2_or_less():
    """kernels.compile_blocks with ZeRO-3 is refused at load: its parameter hooks make dynamo
    recompile for every block (seen on the CPU: the recompile limit hit on the first step)."""
    with pytest.raises(ConfigError, match=r"kernels\.compile_blocks: '1' needs zero_stage <= 2"):
        load_config("tiny_cpu", ["kernels.compile_blocks=1", "deepspeed.zero_stage=3"])
    assert load_config("tiny_cpu", ["kernels.compile_blocks=1"]).kernels.compile_blocks == "1"
