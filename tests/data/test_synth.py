import json

import av
import numpy as np
import pytest

from mmsparse import cli
from mmsparse.data import synth
from mmsparse.data.decode import read_frames

CLIPS, FRAMES, SIZE, FPS = 4, 24, (64, 64), 8  # as in conftest.spec


def test_files_are_h264_with_aac_and_png(synth_manifest, synth_records, spec):
    assert (spec.clips, spec.frames, spec.size, spec.fps) == (CLIPS, FRAMES, SIZE, FPS)
    root = synth_manifest.parent
    assert len(synth_records) == CLIPS
    for rec in synth_records:
        with av.open(str(root / rec["video"])) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
            assert (v.codec_context.height, v.codec_context.width) == SIZE and v.frames == FRAMES
            assert float(v.average_rate) == FPS and a.rate == 16000 and a.channels == 1
    images = [json.loads(x) for x in (root / "images.jsonl").read_text().splitlines()]
    assert len(images) == CLIPS
    assert all((root / r["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for r in images)


def test_captions_follow_events_and_vocabulary(synth_records):
    vocab = set(synth.vocabulary())
    for rec in synth_records:
        shape, tone = rec["events"]
        assert set(rec["caption"].split()) <= vocab
        first = "shape" if shape["start"] < tone["start"] else "tone"
        words = rec["caption"].split()
        assert (words[1] in synth.COLOURS) == (first == "shape")
        assert f"{shape['colour']} {shape['shape']} moves {shape['motion']}" in rec["caption"]
        assert f"{tone['pitch']} tone plays" in rec["caption"]
        assert 0 <= shape["start_frame"] < shape["end_frame"] <= FRAMES


def test_shape_visible_exactly_in_its_frames(synth_manifest, synth_records):
    rec = synth_records[0]
    ev = rec["events"][0]
    frames, _ = read_frames(synth_manifest.parent / rec["video"], np.arange(FRAMES))
    band = synth.frame_code_height(SIZE)
    colour = np.array(synth.COLOURS[ev["colour"]], np.float32)
    body = frames[:, band:].astype(np.float32)
    hits = (np.abs(body - colour).max(-1) < 40).sum((1, 2))  # pixels of the shape's colour per frame
    inside = np.zeros(FRAMES, bool)
    inside[ev["start_frame"]:ev["end_frame"]] = True
    assert (hits[inside] > 20).all() and (hits[~inside] < 3).all()


def test_deterministic_per_seed(tmp_path, synth_records):
    a = synth.make_dataset(tmp_path / "a", clips=2, frames=12, seed=11, images=1)
    b = synth.make_dataset(tmp_path / "b", clips=2, frames=12, seed=11, images=1)
    c = synth.make_dataset(tmp_path / "c", clips=2, frames=12, seed=12, images=1)
    assert a.read_text() == b.read_text() != c.read_text()
    fa, _ = read_frames(a.parent / "videos/clip-0001.mp4", range(12))
    fb, _ = read_frames(b.parent / "videos/clip-0001.mp4", range(12))
    assert np.array_equal(fa, fb)
    assert (a.parent / "images/img-0000.png").read_bytes() == (b.parent / "images/img-0000.png").read_bytes()


def test_long_mode_single_needle(long_manifest):
    (rec,) = [json.loads(x) for x in long_manifest.read_text().splitlines()]
    assert 512 <= rec["frames"] <= 640 and rec["id"] == "long-0000"
    shape, tone = rec["events"]
    assert shape["motion"] is None and shape["end_frame"] - shape["start_frame"] == FPS
    assert tone["start"] == pytest.approx(shape["start"]) and tone["end"] == pytest.approx(shape["end"])
    assert rec["caption"] == f"a {shape['colour']} {shape['shape']} appears with a {tone['pitch']} tone"
    assert not (long_manifest.parent / "images.jsonl").exists()


def test_cli_synth(tmp_path, capsys):
    rc = cli.main(["data", "synth", "--out", str(tmp_path), "--clips", "1", "--frames", "8", "--seed", "2",
                   "--size", "32", "48", "--images", "0"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "manifest.jsonl")
    frames, _ = read_frames(tmp_path / "videos/clip-0000.mp4", [7])
    assert frames.shape == (1, 32, 48, 3) and synth.decode_frame_index(frames[0]) == 7


@pytest.mark.parametrize("kw, msg", [({"size": (15, 64)}, "size must be even"), ({"frames": 2}, "frames >= 4"),
                                     ({"long": True, "long_frames": (4, 10)}, "long_frames")])
def test_bad_arguments(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        synth.make_dataset(tmp_path, clips=1, **kw)


def _generate(out: str, barrier=None) -> None:
    from mmsparse.data import synth as s

    if barrier is not None:
        barrier.wait(60)  # start together, so the processes write the same clips at once
    s.make_dataset(out, clips=6, frames=48, size=(64, 64), images=0, seed=5)


def test_concurrent_generation_into_one_folder_is_safe(tmp_path):
    """Ranks of a distributed run may generate the same synthetic set side by side: no process
    may ever see another's partial file, and the result is the single-process one."""
    import multiprocessing as mp

    from mmsparse.data import load_manifest
    from mmsparse.data.decode import read_frames

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_generate, args=(str(tmp_path / "shared"), barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    _generate(str(tmp_path / "alone"))
    shared = (tmp_path / "shared" / "manifest.jsonl").read_text()
    assert shared == (tmp_path / "alone" / "manifest.jsonl").read_text()
    assert not list((tmp_path / "shared").rglob("*.part")) and not list((tmp_path / "shared").rglob("*.tmp"))
    for sample in load_manifest(tmp_path / "shared" / "manifest.jsonl"):
        frames, _times = read_frames(sample.video, [0, 47])
        assert frames.shape[0] == 2


def test_processes_give_the_same_dataset(tmp_path):
    """Same manifests, captions, events and decoded pixels, to the bit: the video is lossless, so
    whatever the encoder decides in a busy process, it decodes to the same frames."""
    one = synth.make_dataset(tmp_path / "one", clips=3, frames=16, size=(32, 32), images=0, seed=9)
    many = synth.make_dataset(tmp_path / "many", clips=3, frames=16, size=(32, 32), images=0, seed=9, processes=3)
    assert one.read_text() == many.read_text()
    for k in range(3):
        a, _ = read_frames(one.parent / f"videos/clip-{k:04d}.mp4", range(16))
        b, _ = read_frames(many.parent / f"videos/clip-{k:04d}.mp4", range(16))
        assert a.shape == b.shape == (16, 32, 32, 3)
        assert [synth.decode_frame_index(f) for f in a] == list(range(16))
        assert np.array_equal(a, b)


def test_video_decodes_to_exactly_the_rendered_frames(tmp_path):
    """The encoded stream is lossless: its decoded YUV planes are the rendered frames' own (the
    conversion to yuv420p is the only loss), so no encoder choice can change a training input."""
    plan = synth.plan_clip(np.random.default_rng(1), 12, FPS)
    path = synth.write_clip(tmp_path / "c.mp4", plan, size=(32, 48), audio=False)
    rendered = synth.render_frames(plan, (32, 48))
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]
    assert len(decoded) == 12
    for img, dec in zip(rendered, decoded):
        want = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p").to_ndarray()
        assert np.array_equal(dec, want)


def test_clips_where_nothing_happens(tmp_path):
    """empty_fraction of the short clips show the background in silence, captioned NOTHING; the
    other clips are the ones drawn without it."""
    m = synth.make_dataset(tmp_path / "e", clips=16, frames=8, size=(32, 32), images=0, seed=0, empty_fraction=0.25)
    full = synth.make_dataset(tmp_path / "f", clips=16, frames=8, size=(32, 32), images=0, seed=0)
    recs = [json.loads(x) for x in m.read_text().splitlines()]
    ref = [json.loads(x) for x in full.read_text().splitlines()]
    empty = [r for r in recs if r["caption"] == synth.NOTHING]
    assert 1 <= len(empty) <= 8 and all(r["events"] == [] for r in empty)
    assert all(r == q for r, q in zip(recs, ref) if r["caption"] != synth.NOTHING)
    assert set(synth.NOTHING.split()) <= set(synth.vocabulary())
    assert all(r["caption"] != synth.NOTHING for r in ref)  # off unless asked for
    frames, _ = read_frames(m.parent / empty[0]["video"], range(8))
    band = synth.frame_code_height((32, 32))
    assert np.abs(frames[:, band:].astype(int) - np.array(synth.BACKGROUND)).max() <= 8  # nothing drawn
    with av.open(str(m.parent / empty[0]["video"])) as c:
        wave = np.concatenate([f.to_ndarray().ravel() for f in c.decode(audio=0)])
    assert np.abs(wave).max() < 1e-3  # silence
    with pytest.raises(ValueError, match="empty_fraction"):
        synth.make_dataset(tmp_path / "bad", clips=1, frames=8, empty_fraction=1.5)


def test_long_lengths_doubling(tmp_path):
    """``doubling`` draws long clips of lo, 2 lo, 4 lo ... <= hi frames only (a few frame spacings)."""
    m = synth.make_dataset(tmp_path, clips=6, long=True, long_frames=(16, 40), long_lengths="doubling",
                           size=(16, 16), audio=False)
    frames = [json.loads(x)["frames"] for x in m.read_text().splitlines()]
    assert set(frames) <= {16, 32} and len(set(frames)) == 2
    with pytest.raises(ValueError, match="long_lengths"):
        synth.make_dataset(tmp_path / "bad", clips=1, long=True, long_frames=(16, 40), long_lengths="powers")
