"""bench/infer.py (E4): a real CPU run of the tiny captioner writes its JSON and table; latency
percentiles, the ratio to dense and the argument checks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bench import infer


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 10):
        values = rng.random(n).tolist()
        for q in (0, 50, 95, 100):
            assert infer.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError, match="no values"):
        infer.percentile([], 50)


def test_cpu_smoke_run_writes_every_case(tmp_path, capsys):
    assert infer.main(["--cpu-smoke", "--frames", "4", "--calls", "3", "--variants", "sparse,dense",
                       "--config", "r0:video_radius=0,0,0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("infer-*-cpu-smoke.json")
    res = json.loads(path.read_text())
    assert res["workload"] == "E4" and res["complete"] and res["beam"] == 4 and res["batch"] == 8
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"sparse", "dense", "r0"} and rows["dense"]["schedule"] == "dense"
    for r in rows.values():
        # --cpu-smoke caps the calls at 2 and the caption at 8 tokens; a random model decodes all 8
        assert len(r["latency_ms"]) == 2 and r["caption_tokens"] == 8
        assert r["latency_ms_p50"] <= r["latency_ms_p95"] <= max(r["latency_ms"])
        assert 0 < r["encode_ms_p50"] and r["clips_per_s"] == pytest.approx(8 / r["latency_ms_mean"] * 1e3)
    assert rows["sparse"]["speedup_vs_dense"] == pytest.approx(rows["sparse"]["clips_per_s"] / rows["dense"]["clips_per_s"])
    assert "speedup_vs_dense" not in rows["dense"]
    assert "| 4 | r0 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--beam", "0"], "--beam must be at least 1"),
    (["--variants", "sparse,fast"], "unknown \\['fast'\\]"),
    (["--frames", "4,x"], "invalid literal"),
    (["--config", "x:kernels.compile_blocks=1", "--frames", "4"], "kernels.\\* items are bench/model.py's"),
])
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    """Refused before any case runs: no result file is written."""
    with pytest.raises(SystemExit) as exit_:
        infer.main(["--cpu-smoke", "--out", str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.glob("*.json"))
