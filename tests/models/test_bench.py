"""bench/model.py runs in its reduced CPU form and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch


def _bench_model():
    path = Path(__file__).resolve().parents[2] / "bench" / "model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_model_cpu_smoke(tmp_path):
    mod = _bench_model()
    torch.manual_seed(0)
    assert mod.main(["--cpu-smoke", "--frames", "4", "--out", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert {r["variant"] for r in res["rows"]} == {"sparse", "dense"}
    sparse = next(r for r in res["rows"] if r["variant"] == "sparse")
    assert sparse["tokens_per_s"] > 0 and sparse["density"] < 1.0 and "speedup_vs_dense" in sparse


def test_bench_model_batch_counts_every_clip(tmp_path):
    """--batch B: B clips a step, tokens/s counts all of them (tokens stays per clip)."""
    mod = _bench_model()
    assert mod.main(["--cpu-smoke", "--frames", "4", "--batch", "3", "--variants", "sparse",
                     "--out", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["batch"] == 3 and row["tokens"] > 0
    assert abs(row["tokens_per_s"] - 3 * row["tokens"] / row["step_ms"] * 1e3) < 1e-6 * row["tokens_per_s"]


def test_bench_model_named_configs_count_real_tokens(tmp_path):
    """--config NAME:... adds a sparse variant with its own overrides; tile padding adds stream
    positions, not tokens, so tokens/s compares it with the packed model on the same media."""
    mod = _bench_model()
    assert mod.main(["--cpu-smoke", "--frames", "8", "--variants", "sparse",
                     "--config", "padded:video_tile=2,3,3;video_tile_align=32",
                     "--out", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"sparse", "padded"} and res["configs"]["padded"]["video_tile_align"] == 32
    assert rows["padded"]["tokens"] == rows["sparse"]["tokens"]
    assert rows["padded"]["positions"] > rows["sparse"]["positions"]
    with pytest.raises(ValueError, match="--config"):
        mod.parse_config("video_tile_align=32")
