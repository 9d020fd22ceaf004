"""The long-clip benchmark v2 end to end at CPU size: task clips, training, scoring, probe,
resume after a kill, report with intervals; and its bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmsparse.data import longtasks as lt
from mmsparse.eval import longbench as lb
from mmsparse.eval import longdriver, longreport

TINY = dict(lb.SMOKE, steps=4, eval_every=2, clips=3, val_clips=1, probe_clips=3, batch=4, eval_batch=6,
            eval_lengths=(48, 64))


@pytest.mark.parametrize("task", lt.TASKS)
def test_task_clips_are_balanced_and_well_formed(task):
    spec = lt.TaskSpec(size=16, shape_px=8, distractors=(1, 2))
    cands = lt.candidates(task)
    plans = lt.balanced_plans(task, 64, 2 * len(cands), seed=3, spec=spec)
    counts = {c: sum(p.caption == c for p in plans) for c in cands}
    assert set(counts.values()) == {2}  # every answer equally often
    for p in plans:
        starts = sorted(e.frame for e in p.events)
        assert all(b - a >= spec.event_frames for a, b in zip(starts, starts[1:]))  # events never overlap
        coloured = [e for e in p.events if e.colour != lt.GREY]
        if task == "count":
            assert len(coloured) == lt.NUMBERS.index(p.caption.split()[1]) + 1
        if task == "order":
            first, second = sorted(coloured, key=lambda e: e.frame)
            assert p.caption == f"order {first.shape} then {second.shape}"
            assert second.frame - first.frame >= (64 // spec.event_frames // 4) * spec.event_frames
        if task in ("needle", "pair"):
            toned = [e for e in p.events if e.tone]
            assert len(toned) == 1 and toned[0].colour != lt.GREY
    batch = lt.render(plans[:2], spec, seed=0)
    assert batch["video"].shape == (2, 64, 3, 16, 16) and batch["audio"].shape[:2] == (2, spec.n_mels)
    # the event is in the pixels: its frames differ from the background
    e = plans[0].events[0]
    frames = lt.render_frames(plans[:1], spec, generator=torch.Generator().manual_seed(0))[0]
    patch = frames[e.frame, e.y:e.y + spec.shape_px, e.x:e.x + spec.shape_px].float()
    assert (patch - torch.tensor(lt.BACKGROUND)).abs().amax() > 50


def test_shapes_sit_on_the_alignment_grid_and_cover_its_cells():
    spec = lt.TaskSpec()  # 16-px shapes on multiples of 8 in 32-px frames: 3 x 3 places
    plans = lt.balanced_plans("count", 256, 48, seed=5, spec=spec)
    places = {(e.x, e.y) for p in plans for e in p.events}
    assert places == {(x, y) for x in (0, 8, 16) for y in (0, 8, 16)}
    free = lt.TaskSpec(align=1, shape_px=12)
    xs = {e.x for p in lt.balanced_plans("count", 256, 48, seed=5, spec=free) for e in p.events}
    assert xs == set(range(0, 32 - 12 + 1))
    with pytest.raises(ValueError, match="TaskSpec.align"):
        lt.TaskSpec(align=0)
    with pytest.raises(ValueError, match="TaskSpec.shape_px"):
        lt.TaskSpec(shape_px=40)


def test_frames_are_the_noise_with_each_shape_painted_in_its_colour():
    """render_frames paints with a select (no boolean indexing, which waits for the device):
    the frames equal background + noise with every event's template pixels set to its colour,
    and nothing else, for shapes of every kind, odd frame sizes and clips of several lengths."""
    for spec, frames in ((lt.TaskSpec(), 64), (lt.TaskSpec(size=24, shape_px=10, align=1, distractors=(1, 3)), 72)):
        plans = [lt.plan(t, frames, np.random.default_rng(i), spec) for i, t in enumerate(lt.TASKS * 2)]
        got = lt.render_frames(plans, spec, generator=torch.Generator().manual_seed(7))
        noise = torch.randn(len(plans), frames, spec.size, spec.size, 1, generator=torch.Generator().manual_seed(7))
        want = (torch.tensor(lt.BACKGROUND, dtype=torch.float32) + noise * spec.noise).clamp(0, 255)
        painted = torch.zeros(want.shape[:4], dtype=torch.bool)
        for i, p in enumerate(plans):
            for e in p.events:
                mask = lt._template_masks(spec)[e.shape]
                sl = (i, slice(e.frame, e.frame + spec.event_frames), slice(e.y, e.y + spec.shape_px),
                      slice(e.x, e.x + spec.shape_px))
                want[sl][:, mask] = torch.tensor(e.colour, dtype=torch.float32)
                painted[sl][:, mask] = True
        assert torch.equal(got, want.round().to(torch.uint8))
        assert painted.any() and not painted.all()  # the comparison covers painted and unpainted pixels


def test_tone_is_heard_only_during_its_event():
    spec = lt.TaskSpec()
    p = lt.plan("needle", 128, np.random.default_rng(0), spec)
    wave = lt.render_wave([p], spec, generator=torch.Generator().manual_seed(0))[0]
    e = next(e for e in p.events if e.tone)
    a = int(e.frame / spec.fps * spec.sample_rate)
    loud = wave[a + 100:a + spec.sample_rate - 100].abs().mean()
    quiet = torch.cat([wave[:max(1, a - 100)], wave[a + spec.sample_rate + 100:]]).abs().mean()
    assert loud > 20 * quiet


def test_audio_normalisation_puts_the_hiss_near_zero_and_the_tone_well_above():
    """lt.AUDIO_NORM (the benchmark model's) shifts the log-mel by the clips' noise floor: silent
    bands embed near 0 (with the shift of digital silence they sat at ~1.5 in every patch, and a
    model of the audio alone never learnt the tone), the tone's band near 2.5."""
    from mmsparse.encoders.patch import AUDIO_NORM as DIGITAL_SILENCE

    spec = lt.TaskSpec()
    p = lt.plan("needle", 64, np.random.default_rng(1), spec)
    mel = lt.render([p], spec, seed=0)["audio"][0]  # (M, Tm) log-mel
    e = next(e for e in p.events if e.tone)
    at = int(e.frame / spec.fps / spec.hop_seconds)
    shift, scale = lt.AUDIO_NORM
    quiet = torch.cat([mel[:, :max(1, at - 4)], mel[:, at + 24:]], 1)
    assert ((quiet - shift) / scale).median().abs() < 0.3
    assert ((mel[:, at + 2:at + 14] - shift) / scale).amax() > 2.0
    assert ((quiet - DIGITAL_SILENCE[0]) / DIGITAL_SILENCE[1]).median() > 1.0
    assert lb.BASE_MODEL["audio_norm"] == lt.AUDIO_NORM


def test_audio_noise_is_a_task_field_that_keeps_earlier_keys():
    """TaskSpec.audio_noise sets the hiss's amplitude; at its default the spec's key is the one
    runs made before the field existed were filed under (v5: e895aa2dd25a)."""
    v5 = lb.BenchSpec(steps=3000, eval_lengths=(256, 1024, 4096, 8192))
    assert v5.task.audio_noise == lt.AUDIO_NOISE and v5.key() == "e895aa2dd25a"
    loud = lb.BenchSpec(steps=3000, eval_lengths=(256, 1024, 4096, 8192), task=lt.TaskSpec(audio_noise=0.03))
    assert loud.key() != v5.key() and lb.BenchSpec.from_dict(loud.to_dict()).key() == loud.key()
    p = lt.plan("needle", 64, np.random.default_rng(0))
    quiet_wave, loud_wave = (lt.render_wave([p], s.task, generator=torch.Generator().manual_seed(0))
                             for s in (v5, loud))
    # the same draws at 10x the amplitude: the waves differ by the hiss alone, 0.027 std
    assert abs(float((loud_wave - quiet_wave).std()) / (0.03 - lt.AUDIO_NOISE) - 1) < 0.05
    with pytest.raises(ValueError, match="TaskSpec.audio_noise must be >= 0"):
        lt.TaskSpec(audio_noise=-0.1)


def test_bad_task_inputs_are_named():
    with pytest.raises(ValueError, match="unknown task 'story'.*needle"):
        lt.candidates("story")
    with pytest.raises(ValueError, match="frames=16 .* task 'count' needs at least"):
        lt.plan("count", 16, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown arm.*'sparse'"):
        lb.check_arms(["sparse"])
    spec = lb.BenchSpec(**TINY)
    with pytest.raises(ValueError, match="unknown budget 'time'"):
        lb.steps_for(spec, "tiled", "time", {})


def test_wilson_interval():
    lo, hi = longreport.wilson(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    assert longreport.wilson(0, 10)[0] == 0.0 and longreport.wilson(10, 10)[1] == 1.0
    for n in range(1, 1000):  # the interval holds its own estimate at every n (1.0 at k = n, not 1 - 1e-16)
        for k in (0, n // 3, n):
            lo, hi = longreport.wilson(k, n)
            assert lo <= k / n <= hi


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    spec = lb.BenchSpec(**{**TINY, "eval_lengths": (48,)})
    costs = {a: lb.flops_per_step(spec, a) for a in ("dense", "tiled_compress")}
    whole = json.loads(lb.run_one(spec, "tiled_compress", 0, "steps", tmp_path / "a", "cpu", costs,
                                  progress=False).read_text())
    calls = {"n": 0}
    real = lb.train_batch

    def dies_at_step_three(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(lb, "train_batch", dies_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        lb.run_one(spec, "tiled_compress", 0, "steps", tmp_path / "b", "cpu", costs, progress=False)
    assert (tmp_path / "b" / "tiled_compress-s0-steps.ckpt.pt").is_file()
    assert not (tmp_path / "b" / "tiled_compress-s0-steps.json").exists()  # nothing half-written to merge
    monkeypatch.setattr(lb, "train_batch", real)
    resumed = json.loads(lb.run_one(spec, "tiled_compress", 0, "steps", tmp_path / "b", "cpu", costs,
                                    progress=False).read_text())
    assert not (tmp_path / "b" / "tiled_compress-s0-steps.ckpt.pt").exists()
    lines = [json.loads(x) for x in (tmp_path / "b" / "tiled_compress-s0-steps.metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and all("val_choice" in x and "lr" in x for x in lines)
    for a, b in zip(whole["curve"], resumed["curve"]):
        assert a["step"] == b["step"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    assert [r["choice_correct"] for r in whole["rows"]] == [r["choice_correct"] for r in resumed["rows"]]


def test_driver_end_to_end_and_report(tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({k: v for k, v in lb.BenchSpec(**TINY).to_dict().items()}))
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--arms", "dense,tiled_compress", "--seeds", "0,1", "--budgets", "steps,flops",
            "--spec", str(spec_file), "--smoke", "--device", "cpu", "--label", "t",
            "--check-backends", "reference,sdpa"]
    assert longdriver.main(argv) == 0
    report = json.loads(next(out.glob("longclip-cpu-*-t.json")).read_text())
    assert [(a["arm"], a["budget"]) for a in report["arms"]] == [
        ("dense", "steps"), ("tiled_compress", "flops"), ("tiled_compress", "steps")]
    for a in report["arms"]:
        assert a["seeds"] == [0, 1]
        assert set(a["step_ms"]) == {"48", "64"}  # timed alone after the runs
        for task in lt.TASKS:
            for n in (48, 64):
                cell = a["cells"][f"{task}@{n}"]["choice"]
                assert cell["n"] == 2 * 3 and 0 <= cell["ci95"][0] <= cell["acc"] <= cell["ci95"][1] <= 1
                assert a["cells"][f"{task}@{n}"]["caption"]["n"] == 6
        assert set(a["probe"]) >= {"needle.colour@48", "count.count@64", "pair.shape@48"}
        assert a["attention_fraction_of_dense"]["48"] > 0
    flops = next(a for a in report["arms"] if a["budget"] == "flops")
    assert flops["capped"] or flops["train_flops"] >= 0.99 * report["arms"][0]["train_flops"]
    assert set(report["majority"]) == set(lt.TASKS)
    # the trained sparse models rescored under another backend give the same answers
    checks = report["backend_checks"]
    assert [c["run"] for c in checks] == ["tiled_compress-s0-flops", "tiled_compress-s0-steps",
                                          "tiled_compress-s1-flops", "tiled_compress-s1-steps"]
    for c in checks:
        assert c["sdpa_vs_reference"]["same_choice"] == 1.0
        assert c["sdpa_vs_reference"]["max_abs_ll_diff"] < 1e-3
    md = next(out.glob("longclip-cpu-*-t.md")).read_text()
    assert "sdpa_vs_reference" in md
    assert "| tiled_compress | flops |" in md and "[" in md
    row = next(x for x in md.split("## Cost and accuracy per attention FLOP")[1].splitlines() if x.startswith("| dense"))
    flops, acc, per = (c.split(" / ") for c in row.split(" | ")[2:5])
    for f, a, p in zip(flops, acc, per):  # accuracy per attention TFLOP = mean accuracy / TFLOPs
        # (accuracy printed to 2 decimals, the other two to 3 significant digits)
        assert abs(float(p.strip(" |")) * float(f) / 1e3 - float(a)) <= 0.0051 + 0.01 * float(a)
    assert next(out.glob("longclip-cpu-*-t.png")).stat().st_size > 1000
    capsys.readouterr()
    # rerun: every run is found finished, and the report is never overwritten
    with pytest.raises(SystemExit, match="never overwritten.*--label"):
        longdriver.main(argv)
    assert "6 runs, 6 already finished" in capsys.readouterr().out
    assert longdriver.main([a if a != "t" else "t2" for a in argv] + ["--report-only"]) == 0
    # the runs merged elsewhere from their folder alone (--from): the same cells, and the timing
    # and backend checks saved beside them
    elsewhere = tmp_path / "elsewhere"
    assert longdriver.main(["--out", str(elsewhere), "--spec", str(spec_file), "--smoke", "--device", "cpu",
                            "--label", "t3", "--report-only", "--from", str(out / "runs")]) == 0
    again = json.loads(next(elsewhere.glob("longclip-cpu-*-t3.json")).read_text())
    assert [a["cells"] for a in again["arms"]] == [a["cells"] for a in report["arms"]]
    assert again["arms"][0]["step_ms"] == report["arms"][0]["step_ms"] and again["backend_checks"] == checks
    # the versions are the runs', whoever merges them
    assert again["software"] == report["software"] == [lb.software()] and again["meta"]["torch"] == torch.__version__
    with pytest.raises(SystemExit, match="no runs to report"):
        longdriver.main(["--out", str(tmp_path / "empty"), "--smoke", "--report-only"])


def test_report_names_the_runs_versions_not_the_merging_process():
    here = {"torch": "2.9.1+cpu", "triton": None, "commit": "aaaaaaa"}
    gpu = {"torch": "2.11.0+cu130", "triton": "3.6.0", "commit": "bbbbbbb"}
    meta = longdriver._versions({"software": [gpu]}, here)
    assert meta == {**gpu, "report merged at commit": "aaaaaaa"}
    assert longdriver._versions({"software": [gpu]}, {**here, "commit": "bbbbbbb"}) == gpu
    two = longdriver._versions({"software": [gpu, {**gpu, "torch": "2.10.0"}]}, here)
    assert "2.11.0+cu130" in two["runs made with"] and "2.10.0" in two["runs made with"]
    legacy = longdriver._versions({"software": []}, here)
    assert legacy["torch"] == "2.9.1+cpu" and "triton" not in legacy and "do not record" in legacy["versions"]


def test_driver_rejects_bad_arguments(tmp_path):
    for argv, msg in ((["--arms", "dense,fast"], "--arms: unknown arm"), (["--budgets", "time"], "--budgets"),
                      (["--eval-lengths", "48,x"], "--eval-lengths must be"),
                      (["--eval-lengths", "8"], "length 8: frames=8"),
                      (["--check-backends", "reference"], "two or more backends"),
                      (["--check-backends", "reference,fast"], r"--check-backends: unknown \['fast'\]"),
                      (["--check-backends", "reference,triton"], r"\['triton'\] need a CUDA device")):
        with pytest.raises(SystemExit, match=msg):
            longdriver.main(["--out", str(tmp_path), "--smoke", "--device", "cpu", *argv])
    assert not (tmp_path / "runs").exists()  # refused before any run started


def test_cli_runs_the_driver(tmp_path):
    from mmsparse.cli import main

    with pytest.raises(SystemExit, match="--arms: unknown arm"):
        main(["bench", "longclip", "--out", str(tmp_path), "--smoke", "--device", "cpu", "--arms", "nope"])


def test_plateau_is_read_from_the_curve():
    curve = lambda losses: [{"step": 100 * (i + 1), "loss": x} for i, x in enumerate(losses)]  # noqa: E731
    assert longreport.plateau(curve([2.0, 1.0, 0.8, 0.6, 0.5])) is False
    assert longreport.plateau(curve([2.0, 1.0, 0.5, 0.5, 0.499])) is True
    assert longreport.plateau(curve([1.0, 0.9])) is None
    # near zero loss the absolute floor decides: halving 0.0024 is noise, halving 0.03 is not
    assert longreport.plateau(curve([0.9, 0.1, 0.01, 0.0024, 0.0012])) is True
    assert longreport.plateau(curve([0.9, 0.2, 0.1, 0.03, 0.015])) is False


def test_the_bounded_arm_trains_as_tiled_compress_and_keeps_its_pooled_keys_at_any_length():
    """tiled_compress_bounded is tiled_compress with compress_keys: at every training length its
    pooled block is tiled_compress's (the same model, step for step), and at 8,192 frames it
    pools no more keys than training saw."""
    from mmsparse.attention.compressed import pooled_block

    bounded, plain = lb.ARMS["tiled_compress_bounded"], lb.ARMS["tiled_compress"]
    assert {k: v for k, v in bounded.items() if k != "compress_keys"} == plain
    spec = lb.BenchSpec()
    model = lb.build_model(spec, "tiled_compress_bounded", 0, "cpu")
    assert {b.attn.compress_keys for b in model.blocks} == {bounded["compress_keys"]}
    assert lb.build_model(spec, "tiled_compress", 0, "cpu").blocks[0].attn.compress_keys == 0

    def positions(frames):
        plan = lt.plan("needle", frames, np.random.default_rng(0), spec.task)
        return model.embed(lt.render([plan], spec.task, seed=0)).layout.length

    block, keys = plain["compress_block"], bounded["compress_keys"]
    most = max(math.ceil(positions(n) / block) for n in spec.all_train_lengths())
    assert most <= keys
    assert all(pooled_block(positions(n), block, keys) == block for n in spec.all_train_lengths())
    n = positions(8192)
    assert math.ceil(n / block) > 7 * keys and math.ceil(n / pooled_block(n, block, keys)) <= keys


def test_sparse_lengths_train_only_the_sparse_arms_and_count_in_their_flops():
    spec = lb.BenchSpec(**{**TINY, "steps": 8, "sparse_lengths": (96,)})
    assert lb.BenchSpec(**TINY).key() != spec.key()
    # unset, the field leaves the key of specs written before it existed
    d = lb.BenchSpec(**TINY).to_dict()
    del d["sparse_lengths"]
    assert lb.BenchSpec.from_dict(d).key() == lb.BenchSpec(**TINY).key()
    assert lb.BenchSpec.from_dict(spec.to_dict()).key() == spec.key()
    last = range(4, 8)  # TINY's curriculum ends at half the steps
    assert {spec.lengths_at(i, 8, "dense") for i in last} == {48, 64}
    assert {spec.lengths_at(i, 8, "tiled_compress") for i in last} == {48, 64, 96}
    assert spec.all_train_lengths("dense") == (48, 64) and spec.all_train_lengths() == (48, 64, 96)
    cost = lb.flops_per_step(spec, "tiled_compress")
    assert "96" in cost["per_length"]
    plain = lb.schedule_flops(spec, cost, 8, "dense")  # the same model on dense's lengths
    assert lb.schedule_flops(spec, cost, 8, "tiled_compress") > plain
    args = longdriver.parse_args(["--out", "x", "--smoke", "--sparse-lengths", "96,128"])
    assert longdriver.make_spec(args).sparse_lengths == (96, 128)



def test_the_radius_zero_arm_attends_its_own_tile_of_video_only():
    """tiled_compress_r0 is tiled_compress without the video tiles' neighbours: its video tiles
    give each video token the 64 keys of its own tile (one block), and its layers attend fewer
    pairs than tiled_compress's on the same clip."""
    from mmsparse.attention import Tiled, build_layout

    r0, plain = lb.ARMS["tiled_compress_r0"], lb.ARMS["tiled_compress"]
    assert {k: v for k, v in r0.items() if k != "video_radius"} == plain and r0["video_radius"] == (0, 0, 0)
    spec = lb.BenchSpec()
    plan = lt.plan("needle", 256, np.random.default_rng(0), spec.task)
    batch = lt.render([plan], spec.task, seed=0)
    pairs = {}
    for arm in ("tiled_compress_r0", "tiled_compress"):
        model = lb.build_model(spec, arm, 0, "cpu")
        with torch.no_grad():
            stream = model.embed(batch).layout
        pairs[arm] = sum(lay.attended_pairs() for lay in model.layer_layouts(stream))
    assert pairs["tiled_compress_r0"] < 0.75 * pairs["tiled_compress"], pairs
    video = sum(s.numel for s in stream.segments if s.modality == "video")
    own = build_layout(Tiled(lb.BASE_MODEL["video_tile"], 0, modality="video"), stream, 64, 64)
    assert video % 64 == 0 and own.attended_pairs() == video * 64


def test_the_shifted_radius_zero_arm_joins_neighbouring_tiles_in_odd_layers():
    """tiled_shifted_compress_r0: even layers as tiled_compress_r0, odd layers with the tiles
    shifted by half a tile in time, so some video pairs across a tile boundary are attended in
    odd layers and none in even ones, at no more pairs than twice the unshifted layer's."""
    arm = lb.ARMS["tiled_shifted_compress_r0"]
    assert {**arm, "schedule": "tiled"} == lb.ARMS["tiled_compress_r0"] and arm["schedule"] == "tiled_shifted"
    spec = lb.BenchSpec()
    model = lb.build_model(spec, "tiled_shifted_compress_r0", 0, "cpu")
    plan = lt.plan("needle", 256, np.random.default_rng(0), spec.task)
    with torch.no_grad():
        stream = model.embed(lt.render([plan], spec.task, seed=0)).layout
    even, odd = model.layer_layouts(stream)[:2]
    video = next(s for s in stream.segments if s.modality == "video")
    t0 = video.offset  # the first tile's tokens and the second tile's, in stream order
    dense = lambda lay: lay.dense_mask()[t0:t0 + 128, t0:t0 + 128]
    cross = torch.zeros(128, 128, dtype=torch.bool)
    cross[:64, 64:] = cross[64:, :64] = True
    assert not (dense(even) & cross).any() and (dense(odd) & cross).any()
    assert odd.attended_pairs() <= 2 * even.attended_pairs()


def test_the_half_tile_arm_sees_its_neighbours_at_half_the_video_pairs():
    """tiled_t2_compress: tiles of 32 video tokens (half a tiled_compress tile) with the tiles
    before and after, so each video token attends 96 video keys (3 x 32) away from the clip's
    ends, against tiled_compress's 192 (3 x 64)."""
    from mmsparse.attention import Tiled, build_layout

    arm, plain = lb.ARMS["tiled_t2_compress"], lb.ARMS["tiled_compress"]
    assert {k: v for k, v in arm.items() if k != "video_tile"} == plain and arm["video_tile"] == (2, 4, 4)
    spec = lb.BenchSpec()
    model = lb.build_model(spec, "tiled_t2_compress", 0, "cpu")
    plan = lt.plan("needle", 256, np.random.default_rng(0), spec.task)
    with torch.no_grad():
        stream = model.embed(lt.render([plan], spec.task, seed=0)).layout
    video = next(s for s in stream.segments if s.modality == "video")
    pairs = {}
    for tile in ((2, 4, 4), lb.BASE_MODEL["video_tile"]):
        lay = build_layout(Tiled(tile, lb.BASE_MODEL["video_radius"], modality="video"), stream, 64, 64)
        pairs[tile] = lay.attended_pairs()
        rows = lay.dense_mask()[video.offset:video.offset + video.numel].sum(1)
        assert int(rows.max()) == 3 * tile[0] * tile[1] * tile[2]
    assert pairs[(2, 4, 4)] < 0.55 * pairs[(4, 4, 4)], pairs


def test_the_every_kth_layer_arms_keep_the_neighbours_in_those_layers_only():
    """tiled_compress_every2 / _every4: tiled_compress with video_radius_every 2 / 4; their
    radius-1 layers attend as tiled_compress's layer, the others as tiled_compress_r0's."""
    spec = lb.BenchSpec()
    plan = lt.plan("needle", 256, np.random.default_rng(0), spec.task)
    batch = lt.render([plan], spec.task, seed=0)
    pairs = {}
    for arm in ("tiled_compress", "tiled_compress_r0", "tiled_compress_every2", "tiled_compress_every4"):
        model = lb.build_model(spec, arm, 0, "cpu")
        with torch.no_grad():
            stream = model.embed(batch).layout
        pairs[arm] = [lay.attended_pairs() for lay in model.layer_layouts(stream)]
    full, r0 = pairs["tiled_compress"], pairs["tiled_compress_r0"]
    assert len(full) == 4 and all(f > z for f, z in zip(full, r0))
    for arm, k in (("tiled_compress_every2", 2), ("tiled_compress_every4", 4)):
        assert {key: v for key, v in lb.ARMS[arm].items() if key != "video_radius_every"} == lb.ARMS["tiled_compress"]
        assert pairs[arm] == [f if i % k == 0 else z for i, (f, z) in enumerate(zip(full, r0))], arm


def test_the_shifted_two_second_tiles_hold_every_event_whole_in_some_layer():
    """tiled_shifted_t8_compress: radius-0 tiles of 8 tubelet steps (two blocks), odd layers
    shifted by 4 steps. A video token attends at most 8 steps' tokens, in every layer
    (tiled_compress: 12); any 4 consecutive steps (a one-second event) lie inside the window of
    some video token in an even or an odd layer; fewer pairs than tiled_compress."""
    spec = lb.BenchSpec()
    plan = lt.plan("needle", 256, np.random.default_rng(0), spec.task)
    batch = lt.render([plan], spec.task, seed=0)
    model = lb.build_model(spec, "tiled_shifted_t8_compress", 0, "cpu")
    with torch.no_grad():
        stream = model.embed(batch).layout
    video = next(s for s in stream.segments if s.modality == "video")
    steps, per_step = video.shape[0], video.shape[1] * video.shape[2]
    assert steps >= 24 and per_step == 16
    # the time step of each of the segment's stream positions (stored in tile order)
    where = video.to_raster(torch.arange(video.numel)[None, :, None].float())[0, :, 0].long()
    step = torch.empty(video.numel, dtype=torch.long)
    step[where] = torch.arange(video.numel) // per_step
    lays = model.layer_layouts(stream)
    windows = []  # the steps a video token attends, one set a token, even and odd layers
    for lay in lays[:2]:
        m = lay.dense_mask()[video.offset:video.end, video.offset:video.end]
        assert int(m.sum(1).max()) == 8 * per_step  # two seconds of video keys, no more
        windows += [set(step[m[i]].tolist()) for i in range(video.numel)]
    assert lays[2].attended_pairs() == lays[0].attended_pairs() and lays[1].attended_pairs() != lays[0].attended_pairs()
    for start in range(steps - 3):  # every event of 4 consecutive steps
        assert any(set(range(start, start + 4)) <= w for w in windows), start
    full = lb.build_model(spec, "tiled_compress", 0, "cpu").layer_layouts(stream)
    assert sum(lay.attended_pairs() for lay in lays) < sum(lay.attended_pairs() for lay in full)
