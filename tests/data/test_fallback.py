"""Video fallback: a real AV1 file that decord 0.6.0 cannot open and PyAV decodes.

decord's wheel bundles an FFmpeg without an AV1 decoder; it fails in ``av_find_best_stream``
("cannot find video stream", AVERROR_DECODER_NOT_FOUND). PyAV's FFmpeg has dav1d. Nothing is
mocked: the primary fails on the file itself.
"""

import json
import logging

import numpy as np
import pytest
import torch

from mmsparse import cli
from mmsparse.data import DataConfig, MediaDataset, MediaError, make_loader, synth
from mmsparse.data.decode import read_frames, resolve_fallback, sample_indices, with_fallback

FRAMES, FPS, SIZE = 24, 8, (64, 64)


@pytest.fixture(scope="module")
def av1(tmp_path_factory):
    """(folder, AV1 + AAC clip path, its plan)."""
    av = pytest.importorskip("av")
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV build has no SVT-AV1 encoder")
    root = tmp_path_factory.mktemp("av1")
    plan = synth.plan_clip(np.random.default_rng(7), FRAMES, FPS)
    return root, synth.write_clip(root / "av1.mp4", plan, SIZE, codec="libsvtav1"), plan


def _manifest(root, name, records):
    p = root / name
    p.write_text("".join(json.dumps(dict(r, caption=r.get("caption", "x"))) + "\n" for r in records))
    return p


def _good(synth_manifest, synth_records, k=0):
    r = synth_records[k]
    return {"id": r["id"], "video": str(synth_manifest.parent / r["video"]), "caption": r["caption"]}


def test_decord_rejects_the_av1_file_and_pyav_reads_it_exactly(av1):
    _, path, plan = av1
    with pytest.raises(MediaError) as err:
        read_frames(path, [0], backend="decord")
    assert err.value.reason == "corrupt" and "cannot find video stream" in err.value.detail
    idx = np.array([23, 0, 11, 11, 5])
    frames, times = read_frames(path, idx, backend="pyav")
    assert [synth.decode_frame_index(f) for f in frames] == idx.tolist()
    np.testing.assert_allclose(times, idx / FPS, atol=1e-6)
    truth = synth.render_frames(plan, SIZE)[idx]
    assert np.abs(frames.astype(np.int16) - truth).mean() < 3.0


def test_resolve_fallback():
    assert resolve_fallback("decord") == "pyav" and resolve_fallback("pyav") == "decord"
    assert resolve_fallback("pyav", "decord") == "decord" and resolve_fallback("decord", None) is None
    for backend, fallback in [("decord", "decord"), ("decord", "ffmpeg"), ("torchvision", "auto")]:
        with pytest.raises(ValueError):
            resolve_fallback(backend, fallback)
    with pytest.raises(ValueError, match="video fallback"):
        DataConfig(video_fallback="ffmpeg")  # a bad name fails at config time, not in a worker


def test_with_fallback_on_the_file(av1, tmp_path):
    _, path, _ = av1
    idx = [3, 17]
    out, used, first = with_fallback(lambda b: read_frames(path, idx, backend=b), path, "decord")
    assert used == "pyav" and first.reason == "corrupt"
    np.testing.assert_array_equal(out[0], read_frames(path, idx, backend="pyav")[0])
    with pytest.raises(MediaError, match="corrupt"):
        with_fallback(lambda b: read_frames(path, idx, backend=b), path, "decord", None)
    with pytest.raises(MediaError) as err:  # missing: no decoder ran, so no second try
        with_fallback(lambda b: read_frames(tmp_path / "gone.mp4", idx, backend=b), tmp_path / "gone.mp4", "decord")
    assert err.value.reason == "missing" and "pyav" not in err.value.detail


@pytest.mark.parametrize("train", [False, True])
def test_dataset_fallback_equals_pyav_and_is_counted(av1, train, caplog):
    root, path, _ = av1
    m = _manifest(root, f"m-{train}.jsonl", [{"id": "av1", "video": str(path)}])
    kw = dict(num_frames=6, load_audio=True, train=train, seed=3, normalize=False, flip=False, pixel_dtype="float32")
    ds = MediaDataset(m, DataConfig(backend="decord", **kw))
    with caplog.at_level(logging.WARNING, logger="mmsparse.data"):
        item = ds[0]
    assert item["id"] == "av1" and item["video"].shape == (6, 3, *SIZE)
    assert ds.stats.fallbacks == 1 and ds.stats.bad == 0 and ds.stats.counts == {}
    assert ds.stats.recent_fallbacks[0][:2] == (str(path), "pyav")
    assert "cannot find video stream" in ds.stats.recent_fallbacks[0][2]
    summary = ds.stats.summary()
    assert "fallback=1" in summary and f"{path}: fallback to pyav (corrupt: " in summary
    assert any("fallback" in r.getMessage() and "av1.mp4" in r.getMessage() for r in caplog.records)

    # what PyAV alone gives: the same sample through a pyav-only dataset, and the raw decode
    direct = MediaDataset(m, DataConfig(backend="pyav", video_fallback=None, **kw))[0]
    torch.testing.assert_close(item["video"], direct["video"], rtol=0, atol=0)
    torch.testing.assert_close(item["video_times"], direct["video_times"])
    torch.testing.assert_close(item["audio"], direct["audio"])
    rng = np.random.default_rng([3, 0, 0]) if train else None
    idx = sample_indices(FRAMES, FPS, mode="count", num_frames=6, rng=rng)
    raw, times = read_frames(path, idx, backend="pyav")
    np.testing.assert_array_equal(item["video_times"].numpy(), times)
    as_uint8 = (item["video"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)
    np.testing.assert_array_equal(as_uint8, raw)
    assert [synth.decode_frame_index(f) for f in raw] == idx.tolist()


def test_strict_raises_only_when_every_backend_fails(av1, synth_manifest, synth_records):
    root, path, _ = av1
    m = _manifest(root, "m-strict.jsonl", [{"id": "av1", "video": str(path)}])
    assert MediaDataset(m, DataConfig(backend="decord", num_frames=4, strict=True))[0]["id"] == "av1"
    with pytest.raises(MediaError) as err:
        MediaDataset(m, DataConfig(backend="decord", num_frames=4, strict=True, video_fallback=None))[0]
    assert err.value.reason == "corrupt" and "pyav" not in err.value.detail

    # a file neither backend reads: the primary's reason, both errors named
    good = (synth_manifest.parent / synth_records[0]["video"]).read_bytes()
    (root / "wiped.mp4").write_bytes(bytes(64) + good[64:])
    m2 = _manifest(root, "m-both.jsonl", [{"id": "wiped", "video": str(root / "wiped.mp4")}])
    with pytest.raises(MediaError) as err:
        MediaDataset(m2, DataConfig(backend="decord", num_frames=4, strict=True))[0]
    assert err.value.reason == "corrupt"
    assert err.value.detail.startswith("decord: ") and "; pyav: corrupt" in err.value.detail


def test_no_fallback_counts_the_file_as_bad(av1, synth_manifest, synth_records):
    root, path, _ = av1
    m = _manifest(root, "m-off.jsonl", [{"id": "av1", "video": str(path)}, _good(synth_manifest, synth_records)])
    ds = MediaDataset(m, DataConfig(backend="decord", num_frames=4, video_fallback=None, max_bad_fraction=1.0))
    assert ds[0]["id"].startswith("clip-")  # skipped, another sample drawn
    assert set(ds.stats.counts) == {"corrupt"} and ds.stats.fallbacks == 0  # a redraw may hit it again


def test_loader_workers_share_fallback_counts(av1, synth_manifest, synth_records):
    root, path, _ = av1
    recs = [{"id": f"av1-{k}", "video": str(path)} for k in range(3)]
    recs += [_good(synth_manifest, synth_records, k) for k in range(3)]
    ds = MediaDataset(_manifest(root, "m-loader.jsonl", recs), DataConfig(backend="decord", num_frames=4, load_audio=False))
    ids = [i for b in make_loader(ds, batch_size=2, num_workers=2) for i in b["id"]]
    assert sorted(ids) == sorted(r["id"] for r in recs)  # every sample loaded, none replaced
    assert ds.stats.fallbacks == 3 and ds.stats.bad == 0 and ds.stats.attempts == 6


def test_cli_check_lists_fallbacks(av1, synth_manifest, synth_records, capsys):
    root, path, _ = av1
    m = _manifest(root, "m-cli.jsonl", [{"id": "av1", "video": str(path)}, _good(synth_manifest, synth_records)])
    assert cli.main(["data", "check", str(m), "--backend", "decord"]) == 0
    out = capsys.readouterr()
    assert f"{path}\tfallback\tpyav read it; decord: corrupt" in out.out and "0 of 2 samples failed" in out.err
    assert cli.main(["data", "check", str(m), "--backend", "decord", "--fallback", "none"]) == 1
    assert f"{path}\tcorrupt" in capsys.readouterr().out
