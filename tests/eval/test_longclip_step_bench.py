"""bench/longclip_step.py at CPU size: every arm timed beside the dense anchor, JSON written."""

from __future__ import annotations

import json

import pytest

from mmsparse import cli


def _bench():
    return cli.bench_module("longclip_step")


def test_longclip_step_bench_times_arms_against_dense(tmp_path, capsys):
    mod = _bench()
    argv = ["--arms", "tiled_compress", "--lengths", "48", "--repeats", "1", "--batch", "2", "--device", "cpu",
            "--label", "t", "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    (path,) = tmp_path.glob("longclipstep-cpu-*-t.json")
    res = json.loads(path.read_text())
    assert res["env"]["device"].startswith("CPU") and res["env"]["torch"] and res["batch"] == 2
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "tiled_compress"]  # the anchor is added
    assert rows["dense"]["speedup_over_dense"]["48"] == 1.0
    ms = rows["tiled_compress"]["step_ms"]["48"]
    assert ms > 0 and rows["tiled_compress"]["speedup_over_dense"]["48"] == pytest.approx(
        rows["dense"]["step_ms"]["48"] / ms)
    # at 48 frames the blocks and the pooled keys cost more than dense: only its presence is checked
    assert rows["tiled_compress"]["attention_fraction_of_dense"]["48"] > 0
    assert "| tiled_compress |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown arm"):
        mod.main(["--arms", "sparse", "--out", str(tmp_path)])
