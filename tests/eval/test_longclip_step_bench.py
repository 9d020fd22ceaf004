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


def test_driver_takes_its_step_times(tmp_path):
    """The long-clip report can take the step times from this bench (--timing): the arms' times at
    the spec's eval lengths, and a clear error for another batch, length or model."""
    from mmsparse.eval import longbench as lb
    from mmsparse.eval.longdriver import step_timing

    argv = ["--arms", "tiled", "--lengths", "48,64", "--repeats", "1", "--batch", "2", "--device", "cpu",
            "--label", "t", "--out", str(tmp_path)]
    assert _bench().main(argv) == 0
    (path,) = tmp_path.glob("longclipstep-cpu-*-t.json")
    rows = {r["arm"]: r["step_ms"] for r in json.loads(path.read_text())["rows"]}
    spec = lb.BenchSpec(batch=2, eval_lengths=(64,))
    assert step_timing(path, spec) == {arm: {"64": ms["64"]} for arm, ms in rows.items()}
    with pytest.raises(SystemExit, match="timed at batch 2, the spec trains at batch 32"):
        step_timing(path, lb.BenchSpec(eval_lengths=(64,)))
    with pytest.raises(SystemExit, match=r"no times at eval lengths \[256\]"):
        step_timing(path, lb.BenchSpec(batch=2, eval_lengths=(64, 256)))
    with pytest.raises(SystemExit, match="another model"):
        step_timing(path, lb.BenchSpec(batch=2, eval_lengths=(64,), model=dict(lb.BASE_MODEL, depth=2)))
    data = json.loads(path.read_text())  # an arm whose config changed since it was timed: left out
    data["rows"][1]["config"] = {"schedule": "tiled", "compress_block": 64}
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert step_timing(tmp_path / "old.json", spec) == {"dense": {"64": rows["dense"]["64"]}}
    with pytest.raises(SystemExit, match="not a bench/longclip_step.py result"):
        step_timing(tmp_path / "missing.json", spec)
