"""The long-clip benchmark on CPU at toy lengths: clip generation and metadata, parsing, the
attention-FLOP count (exact for a dense model), multiple choice over the 24 event captions,
the per-model report (JSON, markdown, PNG) through `mmsparse eval --benchmark longclip:...`;
parallel clip generation, sharded scoring, honest scores of untrained and diverged models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmsparse.cli import main as cli_main
from mmsparse.data import load_manifest
from mmsparse.eval import longclip
from mmsparse.models import VideoCaptioner, create_model


def test_event_vocabulary_and_parsing():
    cands = longclip.event_captions()
    assert len(cands) == 24 == len(set(cands))
    assert longclip.parse_event("a Blue square appears with a low tone") == {"colour": "blue", "shape": "square",
                                                                              "tone": "low"}
    assert longclip.parse_event("tone tone") == {"colour": None, "shape": None, "tone": None}
    assert [longclip.position_bin(p) for p in (0.0, 0.33, 0.34, 0.66, 0.67, 1.0)] == [
        "early", "early", "middle", "middle", "late", "late"]


def test_benchmark_clips_and_metadata(tmp_path):
    m = longclip.make_benchmark(tmp_path, lengths=(16, 40), clips_per_length=2, size=(32, 32))
    samples = load_manifest(m)
    assert [s.meta["length"] for s in samples] == [16, 16, 40, 40]
    for s in samples:
        ev = next(e for e in s.meta["events"] if e["kind"] == "shape")
        assert s.meta["frames"] == s.meta["length"] and 0 <= s.meta["position"] <= 1
        assert ev["start_frame"] == round(s.meta["position"] * (s.meta["length"] - 8))
        assert s.caption in longclip.event_captions() and s.video.is_file()
    stamp = m.stat().st_mtime_ns
    assert longclip.make_benchmark(tmp_path, lengths=(16, 40), clips_per_length=2, size=(32, 32)) == m
    assert m.stat().st_mtime_ns == stamp  # same spec: reused, not rewritten


@pytest.fixture(scope="module")
def dense_model(tiny_run, tmp_path_factory):
    """An untrained dense-attention twin of the tiny model (same tokenizer)."""
    d = tmp_path_factory.mktemp("dense") / "export"
    tok = VideoCaptioner.from_pretrained(tiny_run / "export").tokenizer
    create_model("captioner_tiny", tokenizer=tok, schedule="dense").save_pretrained(d)
    shutil.copy(tiny_run / "config.yaml", d.parent / "config.yaml")  # same preprocessing
    return d


def test_attention_flops_exact_for_dense(dense_model, tiny_run, tmp_path):
    # 64 frames: a stream long enough (~900 tokens, ~29 blocks of 32) that the tiled windows skip blocks
    m = longclip.make_benchmark(tmp_path, lengths=(64,), clips_per_length=1, size=(32, 32))
    dense = longclip.score_model(dense_model, m, choice=False, frames=64)
    cfg = VideoCaptioner.from_pretrained(dense_model).cfg
    n = dense["tokens_per_clip"]
    assert dense["attention_gflops_per_clip"] == pytest.approx(4 * cfg.embed_dim * n * n * cfg.depth / 1e9)
    sparse = longclip.score_model(tiny_run / "export", m, choice=False, frames=64)
    assert sparse["tokens_per_clip"] == n
    assert 0 < sparse["attention_gflops_per_clip"] < dense["attention_gflops_per_clip"]


def test_longclip_cli_report(tiny_run, dense_model, tmp_path, capsys):
    out = tmp_path / "lc"
    rc = cli_main(["eval", "--model", f"tiled={tiny_run / 'export'}", "--model", f"dense={dense_model}",
                   "--benchmark", "longclip:16,48", "--clips-per-length", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    # every slow step says what it does: writing the clips, then a bar of clips per model
    assert "writing the long-clip benchmark: 3 clips of each of [16, 48] frames" in err
    assert "longclip tiled: 100%" in err and "longclip dense: 100%" in err and "6/6" in err, err[-2000:]
    data = json.loads((out / "longclip.json").read_text())
    assert set(data["models"]) == {"tiled", "dense"} and data["chance_choice"] == pytest.approx(1 / 24)
    for name, r in data["models"].items():
        s = r["summary"]
        assert s["n"] == 6 and s["errors"] == 0
        assert set(s["choice_correct_by_length"]) == {"16", "48"}
        assert set(s["caption_correct_by_position"]) == {"early", "middle", "late"}
        for c in r["clips"]:
            assert c["choice"] in longclip.event_captions()
            assert c["choice_correct"] == (c["choice"] == c["truth"])
            assert c["caption_correct"] == (longclip.parse_event(c["caption"]) == longclip.parse_event(c["truth"]))
        assert 0 <= s["choice_correct"] <= 1
    md = (out / "longclip.md").read_text()
    assert "| tiled | tiled |" in md and "| dense | dense |" in md and "acc per attn GFLOP" in md
    assert (out / "longclip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_longclip_recipes_differ_only_in_the_pattern():
    from mmsparse.train.config import load_config, to_dict

    cfgs = {n: load_config(f"longclip_{n}") for n in ("local", "local_global", "local_axial", "dense",
                                                       "tiled_shifted")}
    pats = {n: (c.model.overrides["schedule"], c.model.overrides["n_global"]) for n, c in cfgs.items()}
    assert pats == {"local": ("local", 0), "local_global": ("local", 8), "local_axial": ("local_axial", 0),
                    "dense": ("dense", 0), "tiled_shifted": ("tiled_shifted", 0)}
    strip = lambda c: {k: v for k, v in to_dict(c).items() if k not in ("run", "model")}  # noqa: E731
    assert all(strip(c) == strip(cfgs["local"]) for c in cfgs.values())
    assert cfgs["local"].data.synth.long and tuple(cfgs["local"].data.synth.long_frames) == (256, 2048)


def test_clips_do_not_depend_on_the_worker_count(tmp_path):
    n = longclip.PART_CLIPS + 1  # two generation parts
    one = load_manifest(longclip.make_benchmark(tmp_path / "a", lengths=(16,), clips_per_length=n, workers=1))
    two = load_manifest(longclip.make_benchmark(tmp_path / "b", lengths=(16,), clips_per_length=n, workers=2))
    key = lambda s: (s.id, s.caption, s.meta["position"], s.video.stat().st_size)  # noqa: E731
    assert [key(s) for s in one] == [key(s) for s in two] and len({s.id for s in one}) == n
    train = load_manifest(longclip.make_train_set(tmp_path / "t", clips=n, long_frames=(16, 40), workers=2))
    assert len({s.id for s in train}) == n and all(16 <= s.meta["frames"] <= 40 for s in train)
    assert all(s.video.is_file() and s.caption in longclip.event_captions() for s in train)
    # the parts are drawn with their own seeds: no clip repeats across parts
    assert len({(s.caption, s.meta["frames"], s.meta["events"][0]["start_frame"]) for s in train}) == n


@pytest.fixture(scope="module")
def bench16(tmp_path_factory):
    return longclip.make_benchmark(tmp_path_factory.mktemp("bench16"), lengths=(16, 32), clips_per_length=4)


def test_shards_merge_into_the_whole(tiny_run, bench16):
    whole = longclip.score_model(tiny_run / "export", bench16, frames=16)
    parts = [longclip.score_model(tiny_run / "export", bench16, frames=16, shard=(k, 3)) for k in range(3)]
    assert sorted(len(p["clips"]) for p in parts) == [2, 3, 3]
    merged = longclip.merge_scores(parts)
    dump = lambda r: sorted(json.dumps(c, sort_keys=True) for c in r["clips"])  # noqa: E731
    assert dump(merged) == dump(whole)
    assert merged["attention_gflops_per_clip"] == pytest.approx(whole["attention_gflops_per_clip"])
    assert merged["tokens_per_clip"] == pytest.approx(whole["tokens_per_clip"])
    assert longclip.summarize(merged)["choice_correct"] == longclip.summarize(whole)["choice_correct"]
    with pytest.raises(ValueError, match="shard"):
        longclip.score_model(tiny_run / "export", bench16, shard=(3, 3))


def test_a_model_that_never_learned_scores_low(dense_model, bench16, tmp_path):
    """Untrained: its captions name no event and its choices are no better than a constant answer.
    Diverged (NaN weights): every multiple choice counts as wrong, never as a lucky pick."""
    untrained = longclip.score_model(dense_model, bench16, frames=16)
    s = longclip.summarize(untrained)
    const = longclip.constant_answer_accuracy({"m": untrained})
    assert s["n"] == 8 and s["caption_correct"] == 0.0 and s["nonfinite"] == 0
    assert s["choice_correct"] <= max(const, 0.25), (s["choice_correct"], const)

    nan_dir = tmp_path / "nan" / "export"
    m = VideoCaptioner.from_pretrained(dense_model)
    with torch.no_grad():
        for p in m.decoder.parameters():
            p.fill_(float("nan"))
    m.save_pretrained(nan_dir)
    shutil.copy(dense_model.parent / "config.yaml", nan_dir.parent / "config.yaml")
    diverged = longclip.summarize(longclip.score_model(nan_dir, bench16, frames=16))
    assert diverged["nonfinite"] == diverged["n"] == 8
    assert diverged["choice_correct"] == 0.0 and diverged["caption_correct"] == 0.0


def test_report_names_failures_machine_and_constant_answer(tiny_run, bench16, tmp_path):
    res = longclip.score_model(tiny_run / "export", bench16, frames=16)
    res["train"] = {"steps": 12, "stopped_by": "max_minutes", "last_loss": 1.5}
    meta = {"device": "NVIDIA Test GPU", "torch": "9.9", "triton": "8.8", "runs": {"local": {}}}
    js, md, png = longclip.report({"tiled": res}, tmp_path, stem="longclip-x-2026-01-01", meta=meta,
                                  failed={"dense": "training exited 3: error: out of memory"})
    assert [p.name for p in (js, md, png)] == [f"longclip-x-2026-01-01.{e}" for e in ("json", "md", "png")]
    data = json.loads(js.read_text())
    assert data["meta"] == meta and data["failed"] == {"dense": "training exited 3: error: out of memory"}
    truths = [c["truth"] for c in res["clips"]]
    assert data["constant_answer"] == max(truths.count(t) for t in truths) / len(truths)
    text = md.read_text()
    assert "device: NVIDIA Test GPU; torch: 9.9; triton: 8.8" in text
    assert "| tiled | tiled | 12 (time) | 1.500 | 16 |" in text
    assert "| dense | no model: training exited 3: error: out of memory |" in text
    summ = longclip.summarize(res)
    for a in longclip.ATTRIBUTES:  # each attribute on its own: which modality the model uses
        assert summ[f"{a}_correct"] == sum(c[f"{a}_correct"] for c in res["clips"]) / len(res["clips"])
    cells = " / ".join(f"{summ[f'{a}_correct']:.2f}" for a in longclip.ATTRIBUTES)
    assert f"| {summ['attributes_correct']:.2f} | {cells} |" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_clips_carry_no_frame_code_band(tmp_path):
    """The frame-index band (a quarter of a 32x32 frame, new every frame) is left out of the
    long-clip clips, training and benchmark alike: only the background and the needle remain."""
    import numpy as np

    from mmsparse.data import synth
    from mmsparse.data.decode import read_frames

    band = synth.frame_code_height((32, 32))
    for m in (longclip.make_benchmark(tmp_path / "b", lengths=(16,), clips_per_length=2),
              longclip.make_train_set(tmp_path / "t", clips=2, long_frames=(16, 16))):
        s = load_manifest(m)[0]
        frames, _ = read_frames(s.video, np.arange(16))
        top = frames[:, :band].astype(np.int16)
        assert np.abs(top - np.array(synth.BACKGROUND)).max() <= 12  # codec noise only, no black/white blocks
