"""bench/probe_tone.py at CPU size: a short run scores the needle's tone and its colour and shape
apart, writes its JSON, and names bad arguments."""

from __future__ import annotations

import json

import pytest

from bench import probe_tone


def test_probe_tone_runs_and_writes_its_points(tmp_path, capsys):
    mod = probe_tone
    argv = ["--steps", "4", "--eval-every", "2", "--eval-clips", "6", "--batch", "4", "--frames", "64",
            "--modalities", "audio", "--audio-shift", "-8", "--audio-floor", "0.1", "--audio-noise", "0.03",
            "--label", "t", "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    (path,) = tmp_path.glob("probe-cpu-*-tone-t.json")
    res = json.loads(path.read_text())
    assert [p["step"] for p in res["points"]] == [2, 4]
    assert res["audio_norm"][0] == -8 and res["model"]["modalities"] == ["audio"]
    assert res["audio_floor"] == res["model"]["audio_floor"] == 0.1 and res["audio_noise"] == 0.03
    for p in res["points"]:
        assert 0 <= p["tone"] <= 1 and 0 <= p["colour_shape"] <= 1 and p["loss"] > 0
    for bad, msg in ((["--tasks", "needles"], "--tasks"), (["--modalities", "smell"], "--modalities"),
                     (["--steps", "0"], "--steps"), (["--audio-floor", "1.5"], "--audio-floor"),
                     (["--audio-noise", "-1"], "--audio-noise")):
        with pytest.raises(SystemExit, match=msg):
            mod.main(bad + ["--out", str(tmp_path)])
