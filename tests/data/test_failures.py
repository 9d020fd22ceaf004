"""Every failure reason, with files broken on purpose, through MediaDataset and the loader."""

import json
import logging
import os
import signal

import numpy as np
import pytest

from mmsparse.data import DataConfig, MediaDataset, MediaError, TooManyBadSamples, make_loader, synth
from tests.data.hangs import release_hung_decodes


@pytest.fixture(scope="module")
def broken(tmp_path_factory, synth_manifest, synth_records):
    """A folder of good clips and broken ones; returns (root, {reason: record})."""
    root = tmp_path_factory.mktemp("broken")
    good = (synth_manifest.parent / synth_records[0]["video"]).read_bytes()
    (root / "empty.mp4").write_bytes(b"")
    (root / "trunc.mp4").write_bytes(good[: len(good) * 2 // 3])
    bad = bytearray(good)
    bad[:64] = bytes(64)  # header wiped: no container can be found
    (root / "corrupt.mp4").write_bytes(bytes(bad))
    (root / "dir.mp4").mkdir()
    synth.write_clip(root / "noaudio.mp4", synth.plan_clip(np.random.default_rng(0), 16, 8), audio=False)
    os.mkfifo(root / "hang.mp4")
    recs = {
        "missing": {"video": "gone.mp4"}, "empty": {"video": "empty.mp4"}, "truncated": {"video": "trunc.mp4"},
        "corrupt": {"video": "corrupt.mp4"}, "unreadable": {"video": "dir.mp4"},
        "no_audio": {"video": "noaudio.mp4"}, "timeout": {"video": "hang.mp4"},
        "too_short": {"video": str(synth_manifest.parent / synth_records[1]["video"]), "start": 0.0, "end": 0.25},
    }
    for k, r in recs.items():
        r.update(id=f"bad-{k}", caption="x")
    yield root, recs
    release_hung_decodes(root / "hang.mp4")


def _manifest(root, name, records):
    p = root / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def _copies(rec, n):
    return [dict(rec, id=f"{rec['id']}-{k}") for k in range(n)]


def _goods(synth_manifest, synth_records):
    return [{"id": r["id"], "video": str(synth_manifest.parent / r["video"]), "caption": r["caption"]}
            for r in synth_records]


CFG = dict(num_frames=4, require_audio=True, decode_timeout=1.0)


@pytest.mark.parametrize("reason", ["missing", "empty", "truncated", "corrupt", "unreadable", "no_audio",
                                    "too_short", "timeout"])
def test_each_reason_strict_raises_lenient_skips(broken, synth_manifest, synth_records, reason, caplog):
    root, recs = broken
    try:
        _each_reason(root, recs, synth_manifest, synth_records, reason, caplog)
    finally:  # no abandoned decode thread may outlive the test (tests/data/hangs.py)
        release_hung_decodes(root / "hang.mp4")


def _each_reason(root, recs, synth_manifest, synth_records, reason, caplog):
    m = _manifest(root, f"m-{reason}.jsonl", [recs[reason]] + _goods(synth_manifest, synth_records))
    with pytest.raises(MediaError) as err:
        MediaDataset(m, DataConfig(strict=True, **CFG))[0]
    assert err.value.reason == reason
    assert recs[reason]["video"].split("/")[-1] in str(err.value)

    ds = MediaDataset(m, DataConfig(max_bad_fraction=1.0, **CFG))
    with caplog.at_level(logging.WARNING, logger="mmsparse.data"):
        item = ds[0]
    assert item["id"].startswith("clip-") and item["video"].shape[0] == 4  # another sample came instead
    assert ds.stats.counts.get(reason, 0) >= 1 and set(ds.stats.counts) == {reason}
    assert any(reason in r.getMessage() and recs[reason]["video"].split("/")[-1] in r.getMessage()
               for r in caplog.records)
    assert reason in ds.stats.summary()


def test_missing_audio_allowed_when_not_required(broken):
    root, recs = broken
    m = _manifest(root, "m-opt.jsonl", [recs["no_audio"]])
    item = MediaDataset(m, DataConfig(num_frames=4))[0]
    assert "video" in item and "audio" not in item


def test_bad_fraction_bound_stops_with_summary(broken, synth_manifest, synth_records):
    root, recs = broken
    bad = [recs[k] for k in ("corrupt", "empty", "missing")]
    m = _manifest(root, "m-bound.jsonl", bad + _goods(synth_manifest, synth_records)[:1])
    ds = MediaDataset(m, DataConfig(num_frames=4, max_bad_fraction=0.3, min_attempts=4, max_retries=50))
    with pytest.raises(TooManyBadSamples) as err:
        for i in range(len(ds)):
            ds[i]
    msg = str(err.value)
    assert "passed the bound 30.0%" in msg and "by reason:" in msg
    assert any(name in msg for name in ("corrupt.mp4", "empty.mp4", "gone.mp4"))


def test_loader_workers_share_counts(broken, synth_manifest, synth_records):
    root, recs = broken
    goods = _goods(synth_manifest, synth_records)
    m = _manifest(root, "m-loader.jsonl", goods + _copies(recs["corrupt"], 2) + _copies(recs["truncated"], 2))
    ds = MediaDataset(m, DataConfig(num_frames=4, max_bad_fraction=1.0, max_retries=50))
    ids = [i for b in make_loader(ds, batch_size=2, num_workers=2) for i in b["id"]]
    assert len(ids) == 8 and all(i.startswith("clip-") for i in ids)
    counts = ds.stats.counts  # the main process sees what the workers counted
    assert counts["corrupt"] >= 2 and counts["truncated"] + counts.get("crashed", 0) >= 2
    if "crashed" not in counts:  # decord can segfault on the truncated file; a restart decodes some twice
        assert ds.stats.attempts == 8 + ds.stats.bad


def test_loader_stops_when_workers_pass_the_bound(broken, synth_manifest, synth_records):
    root, recs = broken
    m = _manifest(root, "m-loader-bound.jsonl", _goods(synth_manifest, synth_records)[:1] + _copies(recs["corrupt"], 7))
    ds = MediaDataset(m, DataConfig(num_frames=4, max_bad_fraction=0.5, min_attempts=4))
    with pytest.raises(TooManyBadSamples, match="corrupt"):
        for _ in make_loader(ds, batch_size=2, num_workers=2):
            pass


class _CrashingDataset(MediaDataset):
    """Kills its worker with a real SIGSEGV while decoding the sample ``boom`` with ``crash_on``
    backends: what decord does on some damaged files, on demand."""

    crash_on = ("decord",)

    def _decode_video(self, s, backend, seed):
        if s.id == "boom" and backend in self.crash_on:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super()._decode_video(s, backend, seed)


class _AlwaysCrashing(_CrashingDataset):
    crash_on = ("decord", "pyav")


def _crash_manifest(root, synth_manifest, synth_records):
    goods = _goods(synth_manifest, synth_records)
    return _manifest(root, "m-crash.jsonl", goods[:3] + [dict(goods[3], id="boom")] + goods[4:])


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_crash_is_survived_and_decoded_with_pyav(broken, synth_manifest, synth_records, workers, caplog):
    root, _ = broken
    m = _crash_manifest(root, synth_manifest, synth_records)
    cfg = DataConfig(backend="decord", num_frames=4, load_audio=True, max_bad_fraction=1.0)
    ds = _CrashingDataset(m, cfg)
    with caplog.at_level(logging.WARNING, logger="mmsparse.data"):
        batches = list(make_loader(ds, batch_size=2, num_workers=workers))
    ids = [i for b in batches for i in b["id"]]
    assert ids == [r["id"] for r in map(json.loads, m.read_text().splitlines())]  # every sample, in order
    assert ds.stats.counts == {"crashed": 1} and ds.stats.fallbacks == 1
    assert any("crashed" in r.getMessage() and "PyAV" in r.getMessage() for r in caplog.records)
    # the rescued sample is PyAV's decode of the file, the others are what a crash-free run gives
    plain = [b for b in make_loader(MediaDataset(m, cfg), batch_size=2, num_workers=0)]
    k = ids.index("boom")
    pyav = MediaDataset(m, DataConfig(num_frames=4, backend="pyav", audio_backend="pyav"))[k]
    for got, want in zip(batches, plain):
        for j, sid in enumerate(got["id"]):
            ref = pyav["video"] if sid == "boom" else want["video"][j]
            assert (got["video"][j] - ref).abs().max() < 2 / 255 / 0.2  # decoders round differently
            if sid != "boom":
                assert (got["video"][j] == want["video"][j]).all() and (got["audio"][j] == want["audio"][j]).all()


def test_worker_crashing_twice_skips_the_sample(broken, synth_manifest, synth_records):
    root, _ = broken
    m = _crash_manifest(root, synth_manifest, synth_records)
    ds = _AlwaysCrashing(m, DataConfig(backend="decord", num_frames=4, max_bad_fraction=1.0))
    ids = [i for b in make_loader(ds, batch_size=2, num_workers=2) for i in b["id"]]
    assert len(ids) == len(ds) and "boom" not in ids  # a replacement was drawn in its place
    assert ds.stats.counts == {"crashed": 3}  # two crashes, then one skip without decoding
    assert f"{synth_records[3]['video'].split('/')[-1]}: crashed" in ds.stats.summary()


def test_worker_crash_in_strict_mode_stops_with_the_path(broken, synth_manifest, synth_records):
    root, _ = broken
    m = _crash_manifest(root, synth_manifest, synth_records)
    ds = _CrashingDataset(m, DataConfig(backend="decord", num_frames=4, strict=True))
    with pytest.raises(TooManyBadSamples, match="crashed") as err:
        list(make_loader(ds, batch_size=2, num_workers=2))
    assert synth_records[3]["video"].split("/")[-1] in str(err.value)


class _DiesAfterDecoding(MediaDataset):
    """Kills its worker with SIGSEGV after sample 2 is done (outside any decode), the first
    ``times`` times only (a file counts the deaths across worker processes)."""

    times = 1
    count_file = None

    def __getitem__(self, index):
        item = super().__getitem__(index)
        if index == 2:
            died = int(self.count_file.read_text() or 0)
            if died < self.times:
                self.count_file.write_text(str(died + 1))
                os.kill(os.getpid(), signal.SIGSEGV)
        return item


def test_worker_death_outside_a_decode_restarts_then_gives_up(broken, synth_manifest, synth_records, tmp_path,
                                                              caplog):
    root, _ = broken
    m = _manifest(root, "m-blind.jsonl", _goods(synth_manifest, synth_records))
    ds = _DiesAfterDecoding(m, DataConfig(num_frames=4))
    ds.count_file = tmp_path / "deaths"
    ds.count_file.write_text("0")
    with caplog.at_level(logging.WARNING, logger="mmsparse.data"):
        ids = [i for b in make_loader(ds, batch_size=2, num_workers=2) for i in b["id"]]
    assert ids == [r["id"] for r in map(json.loads, m.read_text().splitlines())]  # nothing lost, in order
    assert not ds.stats.counts  # no sample is blamed
    assert any("outside any decode" in r.getMessage() for r in caplog.records)

    ds = _DiesAfterDecoding(m, DataConfig(num_frames=4))
    ds.times, ds.count_file = 10, tmp_path / "deaths-again"
    ds.count_file.write_text("0")
    with pytest.raises(RuntimeError, match="died 3 times outside any decode"):
        list(make_loader(ds, batch_size=2, num_workers=2))
