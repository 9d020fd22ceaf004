"""Long-clip task clips written as real MP4 files and decoded back by every backend give the
model the batch that rendering gives (within H.264's 4:2:0 chroma rounding and AAC)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mmsparse.data import longtasks as lt

BACKENDS = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") else [])


@pytest.fixture(scope="module")
def task_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    return lt.write_task_set(out, ("needle", "pair"), 64, 2, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoded_clips_match_the_rendered_batch(task_set, backend):
    spec = lt.TaskSpec()
    batch, records = lt.load_task_set(task_set, spec, backend=backend)
    plans = [p for i, t in enumerate(("needle", "pair")) for p in lt.balanced_plans(t, 64, 2, 5 + 7919 * i + 64, spec)]
    assert [p.caption for p in plans] == batch["caption"] == [r["caption"] for r in records]
    frames = torch.stack([lt.render_frames([p], spec, generator=torch.Generator().manual_seed(5 + 104_729 * i + j))[0]
                          for i in range(2) for j, p in enumerate(plans[2 * i:2 * i + 2])])
    want = lt.to_batch(frames, torch.zeros(4, 64 * spec.sample_rate // spec.fps), spec)
    diff = (batch["video"] - want["video"]).abs()
    assert diff.mean() < 0.1 and diff.amax() < 3.0  # lossless luma, 4:2:0 chroma at shape edges
    for k, p in enumerate(plans):  # the tone sounds in its event's second, in the band it was drawn in
        e = next(e for e in p.events if e.tone)
        mel = batch["audio"][k]  # (M, Tm), 16 frames a second
        per_s = 1 / spec.hop_seconds
        a, b = int(e.frame / spec.fps * per_s) + 2, int((e.frame / spec.fps + 1) * per_s) - 2
        inside = mel[:, a:b].mean(1)
        outside = torch.cat([mel[:, :max(1, a - 4)], mel[:, b + 4:]], 1).mean(1)
        band = int(inside.argmax())
        assert inside[band] - outside[band] > 5  # log-mel: e^5 ~ 150x the energy
        other = "low" if e.tone == "high" else "high"
        hz = {"high": 880.0, "low": 220.0}
        assert (band > mel.shape[0] // 3) == (hz[e.tone] > hz[other])


def test_load_refuses_mixed_lengths(tmp_path):
    lt.write_task_set(tmp_path / "a", ("needle",), 48, 1, seed=0)
    lt.write_task_set(tmp_path / "b", ("needle",), 64, 1, seed=0)
    lines = (tmp_path / "a" / "manifest.jsonl").read_text() + (tmp_path / "b" / "manifest.jsonl").read_text()
    (tmp_path / "a" / "manifest.jsonl").write_text(lines)
    with pytest.raises(ValueError, match="one length.*48, 64"):
        lt.load_task_set(tmp_path / "a" / "manifest.jsonl")


def test_data_synth_tasks_command(tmp_path, capsys):
    from mmsparse.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--clips", "1", "--frames", "64", "--tasks", "count"]) == 0
    assert (tmp_path / "count-00064-0000.mp4").is_file()
    assert main(["data", "synth", "--out", str(tmp_path), "--clips", "1", "--tasks", "story"]) == 2
    assert "unknown task 'story'" in capsys.readouterr().err
