"""Captioning with the shared tiny_cpu model: bad inputs (undecodable, or missing a modality
the model requires) get error records and the rest are captioned (the same captions as alone),
missing or corrupt model folders are clear errors, sliding windows carry exact time stamps and
share one decode of the soundtrack, images are one-frame clips, and the `mmsparse caption`
command writes JSONL / text with the documented exit status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmsparse.cli import main as cli_main
from mmsparse.data import load_manifest, synth
from mmsparse.infer import Captioner, ModelLoadError


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Held-out clips shaped like the training data (32x32, 8 frames) and one 5 s clip."""
    root = tmp_path_factory.mktemp("infer_clips")
    m = synth.make_dataset(root / "short", clips=4, frames=8, size=(32, 32), seed=4242, images=0)
    long = synth.make_dataset(root / "long", clips=1, frames=40, size=(32, 32), seed=4243, images=0)
    return {"manifest": m, "videos": [s.video for s in load_manifest(m)], "long": load_manifest(long)[0].video,
            "root": root}


@pytest.fixture(scope="module")
def captioner(tiny_run):
    return Captioner(tiny_run / "export")


def _bad_files(root: Path, good: Path) -> dict[str, Path]:
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    (bad / "empty.mp4").write_bytes(b"")
    data = good.read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return {"garbage": bad / "garbage.mp4", "empty": bad / "empty.mp4", "truncated": bad / "truncated.mp4",
            "missing": bad / "missing.mp4"}


def test_undecodable_inputs_get_error_records_and_the_rest_are_captioned(captioner, clips):
    vids = clips["videos"]
    bad = _bad_files(clips["root"], vids[0])
    inputs = [vids[0], bad["garbage"], vids[1], bad["empty"], bad["truncated"], vids[2], bad["missing"], vids[3]]
    recs = captioner.caption(inputs, batch=3, beam=2)
    assert [r["path"] for r in recs] == [str(p) for p in inputs]  # one record per input, in order
    by_path = {r["path"]: r for r in recs}
    assert by_path[str(bad["garbage"])]["reason"] == "corrupt"
    assert by_path[str(bad["empty"])]["reason"] == "empty"
    assert by_path[str(bad["truncated"])]["reason"] in ("truncated", "corrupt")
    assert by_path[str(bad["missing"])]["reason"] == "missing"
    for name, p in bad.items():
        r = by_path[str(p)]
        assert "caption" not in r and str(p) in r["error"], r
    # every good clip is captioned, exactly as when it is captioned on its own
    alone = {r["path"]: r["caption"] for v in vids for r in captioner.caption([v], beam=2)}
    for v in vids:
        r = by_path[str(v)]
        assert r["caption"] and r["caption"] == alone[str(v)]
        assert r["frames"] == 8 and r["duration"] == pytest.approx(1.0)
        assert r["timings"]["total_s"] >= r["timings"]["model_s"] > 0


def test_windows_where_nothing_happens_say_so(captioner, tmp_path):
    """A 5 s clip with one 1 s event: the windows without it are captioned as the training data's
    empty clips are (synth.NOTHING), not with an invented event; the event's window is not."""
    m = synth.make_dataset(tmp_path, clips=2, long=True, long_frames=(40, 40), size=(32, 32), seed=31, images=0)
    for sample in load_manifest(m):
        ev = next(e for e in sample.meta["events"] if e["kind"] == "shape")
        (rec,) = captioner.caption([sample.video], window_seconds=1.0)
        assert len(rec["segments"]) == 5
        for seg in rec["segments"]:
            overlap = min(seg["end"], ev["end"]) - max(seg["start"], ev["start"])
            if overlap <= 0:
                assert seg["caption"] == synth.NOTHING, rec["segments"]
            elif overlap >= 0.5:
                assert seg["caption"] != synth.NOTHING, rec["segments"]


def test_manifest_input_keeps_ids_and_references(captioner, clips):
    recs = captioner.caption([clips["manifest"], clips["videos"][0]])
    samples = load_manifest(clips["manifest"])
    assert [r["id"] for r in recs] == [s.id for s in samples] + [f"{samples[0].id}#2"]
    assert recs[0]["references"] == list(samples[0].captions)
    assert "references" not in recs[-1]


def test_sliding_windows_have_time_stamps(captioner, clips):
    (rec,) = captioner.caption([clips["long"]], window_seconds=2.0)
    assert rec["duration"] == pytest.approx(5.0)
    assert [(s["start"], s["end"]) for s in rec["segments"]] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]
    assert all(s["caption"] for s in rec["segments"])
    assert rec["caption"] == "; ".join(s["caption"] for s in rec["segments"])
    (ov,) = captioner.caption([clips["long"]], window_seconds=2.0, window_stride=1.5)
    # overlapping windows stop at the first one that reaches the end of the clip
    assert [(s["start"], s["end"]) for s in ov["segments"]] == [(0.0, 2.0), (1.5, 3.5), (3.0, 5.0)]
    # the same window given as a manifest line with start / end gets the same caption
    m = clips["root"] / "window.jsonl"
    m.write_text(json.dumps({"id": "w", "video": str(clips["long"]), "start": 2.0, "end": 4.0}) + "\n")
    (w,) = captioner.caption([m])
    assert w["caption"] == rec["segments"][1]["caption"] and w["duration"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="window_seconds"):
        captioner.caption([clips["long"]], window_seconds=0)


def test_candidates_are_ranked_by_likelihood(captioner, clips):
    (rec,) = captioner.caption([clips["videos"][0]])
    cands = [rec["caption"], "a red circle appears with a high tone", "tone tone tone"]
    (r,) = captioner.caption([clips["videos"][0]], candidates=cands)
    # greedy decoding's own caption is far more likely than word salad
    assert len(r["choice_logprobs"]) == 3 and r["choice_logprobs"][0] > r["choice_logprobs"][2]
    assert r["choice"] == cands[max(range(3), key=r["choice_logprobs"].__getitem__)]


def test_candidates_share_the_clips_encoding(captioner, clips, monkeypatch):
    """Ranking candidates reads the encoding the caption was generated from: one encoder pass a
    batch (it was two), and the same caption as without candidates."""
    model = captioner.model
    (alone,) = captioner.caption([clips["videos"][0]])
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda b: calls.append(1) or encode(b))
    (r,) = captioner.caption([clips["videos"][0]], candidates=["a red circle appears with a high tone", "tone tone"])
    assert len(calls) == 1 and r["caption"] == alone["caption"] and len(r["choice_logprobs"]) == 2


def test_model_folder_errors_are_clear(tiny_run, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Captioner(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a saved model"):
        Captioner(tmp_path / "empty")
    # corrupt weights: one flipped byte
    bad = tmp_path / "flipped"
    shutil.copytree(tiny_run / "export", bad)
    w = bytearray((bad / "model.safetensors").read_bytes())
    w[len(w) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(ModelLoadError, match="checksum"):
        Captioner(bad)
    # corrupt config
    cfg = tmp_path / "badjson"
    shutil.copytree(tiny_run / "export", cfg)
    (cfg / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="corrupt JSON"):
        Captioner(cfg)
    # a run folder is accepted and resolves to its export; the run's frames are used
    c = Captioner(tiny_run)
    assert c.model_dir == tiny_run / "export" and c.preprocess.frames == 8


def test_caption_cli_jsonl_text_and_exit_status(tiny_run, clips, tmp_path, capsys):
    vids = clips["videos"]
    bad = _bad_files(clips["root"], vids[0])
    out = tmp_path / "caps.jsonl"
    rc = cli_main(["caption", str(vids[0]), str(bad["garbage"]), str(vids[1]), "--model", str(tiny_run / "export"),
                   "--beam", "2", "--batch", "2", "--out", str(out)])
    assert rc == 1  # some inputs failed
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [("error" in r) for r in lines] == [False, True, False]
    assert lines[1]["reason"] == "corrupt" and lines[0]["caption"] and "timings" in lines[0]
    assert "1 could not be captioned" in capsys.readouterr().err

    rc = cli_main(["caption", str(clips["long"]), "--model", str(tiny_run), "--window-seconds", "2"])
    text = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(text) == 3 and text[0].split("\t")[1] == "[0.00-2.00 s]"

    rc = cli_main(["caption", str(vids[0]), "--model", str(tmp_path / "missing-model")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "does not exist" in err and "Traceback" not in err


def test_a_video_only_pyav_reads_is_captioned_with_decord_configured(captioner, clips):
    """AV1 (decord 0.6.0 has no decoder for it): the clip and its duration probe both fall back
    to PyAV, whole-clip and sliding-window alike."""
    import av
    import numpy as np

    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV build has no SVT-AV1 encoder")
    plan = synth.plan_clip(np.random.default_rng(11), 40, 8)
    path = synth.write_clip(clips["root"] / "av1.mp4", plan, (32, 32), codec="libsvtav1")
    (rec,) = captioner.caption([path])
    assert "error" not in rec and rec["caption"], rec
    assert rec["duration"] == pytest.approx(5.0)
    (win,) = captioner.caption([path], window_seconds=2.0)
    assert "error" not in win and len(win["segments"]) == 3, win


def test_preprocess_follows_the_runs_decoders(tmp_path):
    """A run trained with PyAV audio and no video fallback is captioned the same way."""
    from mmsparse.infer.captioner import load_preprocess

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "data:\n  frames: 12\n  backend: decord\n  extra:\n    audio_backend: pyav\n    video_fallback: null\n"
        "    hop_seconds: 0.04\n")
    cfg = load_preprocess(run / "export").data_config()
    assert (cfg.num_frames, cfg.backend, cfg.audio_backend, cfg.video_fallback) == (12, "decord", "pyav", None)
    assert cfg.hop_seconds == 0.04


def test_an_input_the_model_cannot_take_gets_an_error_record(tiny_run, captioner, clips, tmp_path):
    """An audio-only line (a real WAV) for a model that requires video: an error record naming
    the missing modality, and the video line beside it is still captioned (library and CLI)."""
    import numpy as np
    import soundfile as sf

    assert captioner.required == ("video",)
    plan = synth.plan_clip(np.random.default_rng(7), 8, 8)
    wav = tmp_path / "tone.wav"
    sf.write(wav, synth.render_audio(plan, 16000), 16000)
    m = tmp_path / "mixed.jsonl"
    m.write_text(json.dumps({"id": "clip", "video": str(clips["videos"][0])}) + "\n"
                 + json.dumps({"id": "sound", "audio": str(wav)}) + "\n")
    good, bad = captioner.caption([m])
    (alone,) = captioner.caption([clips["videos"][0]])
    assert good["id"] == "clip" and good["caption"] == alone["caption"]
    assert bad["id"] == "sound" and bad["path"] == str(wav) and "caption" not in bad
    assert bad["reason"] == "missing_modality"
    assert str(wav) in bad["error"] and "requires video" in bad["error"] and "has audio" in bad["error"]

    out = tmp_path / "mixed_caps.jsonl"
    rc = cli_main(["caption", str(m), "--model", str(tiny_run / "export"), "--beam", "1", "--out", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert rc == 1 and [r["id"] for r in lines] == ["clip", "sound"]
    assert lines[0]["caption"] == alone["caption"] and lines[1]["reason"] == "missing_modality"


def test_windows_share_one_decode_of_the_soundtrack(captioner, clips, monkeypatch):
    """Window mode reads a video's audio once, and each window gets exactly the features that
    decoding it on its own (a start / end manifest line) gives."""
    from mmsparse.data import MediaDataset
    from mmsparse.data import audio as audio_mod
    from mmsparse.infer.captioner import _Item

    calls = []
    real = audio_mod.read_audio

    def counting(path, *args, **kw):
        calls.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(audio_mod, "read_audio", counting)
    (rec,) = captioner.caption([clips["long"]], window_seconds=1.0)
    assert len(rec["segments"]) == 5 and "error" not in rec
    assert len(calls) == 1, calls  # not once per window

    monkeypatch.setattr(audio_mod, "read_audio", real)
    cfg = captioner.preprocess.data_config()
    (sample,) = captioner.expand_inputs([clips["long"]])
    item = _Item(0, sample, str(sample.video))
    units = captioner._plan_units(item, 2.0, 1.5, cfg.backend)
    captioner._decode_units(item, units, cfg, windowed=True)
    for u in units:
        alone = captioner._fit(MediaDataset([u.sample], cfg)[0])
        assert u.data["audio"].shape == alone["audio"].shape
        assert torch.equal(u.data["audio"], alone["audio"]), (u.start, u.end)
        assert u.data["audio_start"] == alone["audio_start"]
        assert torch.equal(u.data["video"], alone["video"])


def test_caption_cli_image_frames_and_text_output(tiny_run, clips, tmp_path, capsys):
    """An image is captioned as a one-frame clip; --frames sets the frames per clip; without
    --out or window mode the output is `<id>\\t<caption>` text, one line per input."""
    import numpy as np

    img, _ = synth.write_image(tmp_path / "shape.png", np.random.default_rng(3), (32, 32))
    vids = clips["videos"]
    model = str(tiny_run / "export")

    out = tmp_path / "image.jsonl"
    rc = cli_main(["caption", str(img), str(vids[0]), "--model", model, "--beam", "1", "--out", str(out)])
    im, vid = [json.loads(x) for x in out.read_text().splitlines()]
    assert rc == 0 and "error" not in im and im["caption"]
    assert im["id"] == "shape" and im["path"] == str(img) and im["frames"] == 1 and "duration" not in im
    assert vid["frames"] == 8  # the run's data.frames
    capsys.readouterr()

    out4 = tmp_path / "frames4.jsonl"
    rc = cli_main(["caption", str(vids[0]), "--model", model, "--beam", "1", "--frames", "4", "--out", str(out4)])
    (four,) = [json.loads(x) for x in out4.read_text().splitlines()]
    assert rc == 0 and four["frames"] == 4 and four["caption"]
    rc = cli_main(["caption", str(vids[0]), "--model", model, "--frames", "1000"])
    assert rc == 2 and "max_frames" in capsys.readouterr().err  # over the model's limit: a usage error

    rc = cli_main(["caption", str(vids[0]), str(img), str(vids[1]), "--model", model, "--beam", "1"])
    text = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(text) == 3
    ids = [line.split("\t")[0] for line in text]
    assert ids == [Path(vids[0]).stem, "shape", Path(vids[1]).stem]
    assert all(len(line.split("\t")) == 2 for line in text)
    assert text[1].split("\t")[1] == im["caption"] and text[0].split("\t")[1] == vid["caption"]


def test_uint8_pixels_caption_like_float_pixels(tiny_run, captioner, clips):
    """Captioning decodes uint8 pixels for the model to normalise; float32 pixels from the loader
    give the same captions and candidate likelihoods (sliding windows included)."""
    from dataclasses import replace

    assert captioner.preprocess.data_config().pixel_dtype == "uint8"
    floats = Captioner(tiny_run / "export",
                       preprocess=replace(captioner.preprocess, extra={**captioner.preprocess.extra,
                                                                        "pixel_dtype": "float32"}))
    assert floats.preprocess.data_config().pixel_dtype == "float32"
    inputs = clips["videos"][:2]
    cands = ["a red circle appears with a high tone", "tone tone tone"]
    for kw in ({}, {"candidates": cands}, {"window_seconds": 2.0}):
        want = floats.caption(inputs + [clips["long"]], **kw)
        got = captioner.caption(inputs + [clips["long"]], **kw)
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert a["caption"] == b["caption"]
            if "choice_logprobs" in b:
                assert a["choice_logprobs"] == pytest.approx(b["choice_logprobs"], abs=1e-3)
