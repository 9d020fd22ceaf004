"""mmsparse.eval.longmerge: the runs archive of a GPU call merged into a benchmark folder of the
same spec, from real (tiny) runs of the driver; every refusal before anything is written."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mmsparse.eval import longbench as lb
from mmsparse.eval import longdriver, longmerge

TINY = dict(lb.SMOKE, steps=2, eval_every=2, clips=2, val_clips=1, probe_clips=3, batch=4, eval_batch=6,
            eval_lengths=(48,))


def _archive(work: Path, path: Path, extra: dict[str, bytes] | None = None, drop=()) -> Path:
    """work's spec, costs, checks and runs as tools/device_longbench.sh tars them (no models,
    no checkpoints), plus `extra` members, without the members named in `drop`."""
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(work.rglob("*")):
            rel = f.relative_to(work).as_posix()
            if f.is_file() and not rel.endswith(".pt") and ".model/" not in rel and rel not in drop and (
                    rel.startswith("runs/") or rel in ("spec.json", "costs.json", "backends.json", "timing.json")):
                tar.add(f, arcname=rel)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A finished driver run: dense and tiled_compress, seed 0, equal steps, backends checked."""
    root = tmp_path_factory.mktemp("lm")
    spec = root / "spec-in.json"
    spec.write_text(json.dumps(lb.BenchSpec(**TINY).to_dict()))
    out = root / "work"
    assert longdriver.main(["--out", str(out), "--arms", "dense,tiled_compress", "--seeds", "0", "--budgets", "steps",
                            "--spec", str(spec), "--smoke", "--device", "cpu", "--no-timing",
                            "--check-backends", "reference,sdpa"]) == 0
    return out


def _folder(work: Path, dest: Path) -> Path:
    """A committed benchmark folder holding the dense run alone."""
    (dest / "runs").mkdir(parents=True)
    (dest / "spec.json").write_text((work / "spec.json").read_text())
    costs = json.loads((work / "costs.json").read_text())
    (dest / "costs.json").write_text(json.dumps({"dense": costs["dense"]}))
    for f in (work / "runs").glob("dense-s0-steps.*json*"):  # the run's JSON and metrics, not its model
        (dest / "runs" / f.name).write_bytes(f.read_bytes())
    return dest


def test_merge_adds_the_new_runs_their_costs_and_checks(work, tmp_path, capsys):
    folder = _folder(work, tmp_path / "committed")
    archive = _archive(work, tmp_path / "runs-t.tgz")
    log = tmp_path / "log-t.txt"
    log.write_text("driver output\n")
    assert longmerge.main([str(archive), "--into", str(folder), "--driver-log", str(log)]) == 0
    assert (folder / "runs" / "tiled_compress-s0-steps.json").read_bytes() == \
        (work / "runs" / "tiled_compress-s0-steps.json").read_bytes()
    assert (folder / "runs" / "tiled_compress-s0-steps.metrics.jsonl").is_file()
    assert (folder / "runs" / "logs" / "log-t.txt").read_text() == "driver output\n"
    assert not list(folder.rglob("*.pt"))
    costs = json.loads((folder / "costs.json").read_text())
    assert set(costs) == {"dense", "tiled_compress"}
    checks = json.loads((folder / "backends.json").read_text())
    assert [c["run"] for c in checks] == ["tiled_compress-s0-steps"]
    out = capsys.readouterr().out
    assert "runs: tiled_compress-s0-steps" in out and "arms: tiled_compress" in out
    # the same archive again adds nothing and changes nothing
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert longmerge.merge([archive], folder) == {"runs": [], "arms": [], "checks": [], "timed": []}
    assert before == {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_run_the_limit_cut_stays_out(work, tmp_path):
    """Metrics and log of a run whose JSON is not in the archive (not finished) are not merged."""
    folder = _folder(work, tmp_path / "committed")
    archive = _archive(work, tmp_path / "cut.tgz", drop={"runs/tiled_compress-s0-steps.json"})
    added = longmerge.merge([archive], folder)
    assert added["runs"] == [] and not list((folder / "runs").glob("tiled_compress*"))


def _unchanged(folder: Path):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case,message", [
    ("spec", "its runs are of spec"),
    ("differs", "the folder's copy differs"),
    ("costs", "not what this code counts"),
    ("outside", "points outside the folder"),
    ("binary", "not text"),
])
def test_refusals_write_nothing(work, tmp_path, case, message):
    folder = _folder(work, tmp_path / "committed")
    extra, drop = {}, set()
    if case == "spec":
        spec = json.loads((work / "spec.json").read_text())
        extra["spec.json"] = json.dumps({**spec, "steps": spec["steps"] + 1}).encode()
        drop.add("spec.json")
    elif case == "differs":
        (folder / "runs" / "dense-s0-steps.json").write_text("{}")
    elif case == "costs":
        costs = json.loads((work / "costs.json").read_text())
        costs["tiled_compress"]["train_flops_per_step"] *= 2
        extra["costs.json"] = json.dumps(costs).encode()
        drop.add("costs.json")
    elif case == "outside":
        extra["../escape.json"] = b"{}"
    else:
        extra["runs/logs/x.log"] = b"\xff\xfe"
    archive = _archive(work, tmp_path / "bad.tgz", extra, drop)
    before = _unchanged(folder)
    with pytest.raises(SystemExit, match=message):
        longmerge.main([str(archive), "--into", str(folder)])
    assert _unchanged(folder) == before


def test_not_an_archive_or_not_a_folder(work, tmp_path):
    junk = tmp_path / "junk.tgz"
    junk.write_text("not a tar")
    folder = _folder(work, tmp_path / "committed")
    with pytest.raises(SystemExit, match="not a readable tar archive"):
        longmerge.main([str(junk), "--into", str(folder)])
    with pytest.raises(SystemExit, match="no such archive"):
        longmerge.main([str(tmp_path / "none.tgz"), "--into", str(folder)])
    archive = _archive(work, tmp_path / "runs-t.tgz")
    with pytest.raises(SystemExit, match="spec.json: missing"):
        longmerge.main([str(archive), "--into", str(tmp_path / "empty")])
