"""`mmsparse bench attention|model|data` runs the checkout's bench/ scripts."""

from __future__ import annotations

import json

import pytest

from mmsparse import cli


@pytest.mark.parametrize("name, option", [("attention", "--only"), ("model", "--cpu-smoke"), ("data", "--workers"),
                                          ("longclip_step", "--lengths"), ("infer", "--beam")])
def test_bench_help_is_the_script_s_own(name, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", name, "--help"])
    assert exit_.value.code == 0
    assert option in capsys.readouterr().out


def test_bench_model_runs_on_the_cpu(tmp_path):
    """A tiny real run through the command: the script's JSON lands in --out under its result name."""
    argv = ["bench", "model", "--cpu-smoke", "--frames", "4", "--variants", "sparse", "--steps", "1",
            "--label", "cli", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("model-*-cli.json")
    res = json.loads(path.read_text())
    assert res["workload"] == "E1" and res["rows"][0]["tokens_per_s"] > 0


def test_bench_without_a_checkout_says_what_is_missing(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="bench/attention.py does not exist.*pip install -e"):
        cli.run_bench("attention", [], root=tmp_path)
    with pytest.raises(ValueError, match="benchmark must be one of"):
        cli.run_bench("fast", [])
    with pytest.raises(SystemExit):  # argparse names the choices
        cli.main(["bench", "fast"])
    assert "invalid choice" in capsys.readouterr().err
