"""bench/data.py runs end to end at toy sizes and writes its JSON (the GPU host runs it once)."""

from __future__ import annotations

import json

import pytest

from mmsparse import cli


def _bench():
    return cli.bench_module("data")


def test_bench_data_smoke(tmp_path, capsys):
    mod = _bench()
    argv = ["--workers", "0", "2", "--seconds", "0.2", "--clips", "2", "--samples", "24", "--src-frames", "64",
            "--long-frames", "64", "--stage-clips", "2", "--batch-size", "2", "--gen-procs", "2",
            "--tag", "smoke", "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "loader clips/s" in out and "peak RSS" in out
    (result,) = tmp_path.glob("data-smoke-*.json")
    res = json.loads(result.read_text())
    assert res["complete"] and res["machine"]["cpu_model"] and res["machine"]["cpus_usable"] >= 1
    backends, dtypes = ("decord", "pyav"), ("float32", "uint8")
    assert {(r["backend"], r["dtype"], r["workers"]) for r in res["throughput"]} == {
        (b, d, w) for b in backends for d in dtypes for w in (0, 2)}
    assert all(r["clips_per_s"] > 0 and "error" not in r for r in res["throughput"])
    assert {(r["backend"], r["dtype"]) for r in res["stages"]} == {(b, d) for b in backends for d in dtypes}
    assert all(r["decode_ms"] > 0 and "error" not in r for r in res["stages"])
    mb = {r["dtype"]: r["clip_mb"] for r in res["stages"]}
    assert mb["uint8"] == pytest.approx(64 * 3 * 224 * 224 / 2**20, abs=0.01)  # a byte a pixel
    assert mb["float32"] == pytest.approx(4 * mb["uint8"], abs=0.05)
    assert len(res["long_clip_memory"]) == 4 and all(r["frames"] > 0 for r in res["long_clip_memory"])
    day = result.name[len("data-smoke-"):][:10]
    assert res["environment"]["date"] == day and res["environment"]["git_commit"]
    again = mod.result_path(tmp_path, "smoke", day)  # a rerun the same day keeps the first file
    assert again.name == f"data-smoke-{day}-2.json" and again.exists()
    assert mod.result_path(tmp_path, "smoke", day, "x").name == f"data-smoke-{day}-x.json"


@pytest.mark.timeout(900)  # a regression that hangs the run fails instead (it takes ~40 s on 2 idle cores)
def test_bench_data_hung_row_is_recorded_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    """A throughput row whose worker never delivers (here: PyAV samples sleep in the worker) is
    abandoned at --row-limit, recorded with what it saw, and the rows after it still run."""
    import time

    from torch.utils.data import get_worker_info

    from mmsparse.data import MediaDataset

    real = MediaDataset.__getitem__

    def hang_pyav_in_workers(self, index):
        if self.cfg.backend == "pyav" and get_worker_info() is not None:
            self.crashes.begin(get_worker_info().id, int(index), 0)  # as a real decode registers itself
            time.sleep(600)  # ended by the loader's shutdown (SIGTERM)
        return real(self, index)

    monkeypatch.setattr(MediaDataset, "__getitem__", hang_pyav_in_workers)  # forked workers inherit it
    mod = _bench()
    argv = ["--workers", "1", "--dtypes", "uint8", "--seconds", "0.2", "--row-limit", "8", "--clips", "2",
            "--samples", "24", "--src-frames", "64", "--long-frames", "64", "--stage-clips", "2", "--batch-size",
            "2", "--gen-procs", "2", "--tag", "hang", "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    (result,) = tmp_path.glob("data-hang-*.json")
    res = json.loads(result.read_text())
    assert res["complete"] and res["settings"]["row_limit_s"] == 8
    rows = {r["backend"]: r for r in res["throughput"]}
    assert rows["decord"]["clips_per_s"] > 0 and "error" not in rows["decord"]
    hung = rows["pyav"]
    assert "abandoned" in hung["error"] and "no batch for 8 s" in hung["error"] and "abandoned" in out
    seen = hung["seen"]
    assert seen["phase"] == "start-up (first round)" and seen["batches"] == 0 and seen["limit_s"] == 8
    assert 8 <= seen["elapsed_s"] < 30  # the limit, plus torch's join of the hung worker
    (busy,) = seen["decoding_when_abandoned"]
    assert busy["worker"] == 0 and busy["path"].endswith(".mp4")
    assert len(res["long_clip_memory"]) == 4  # the run went on past the hung row
