"""A damaged audio track is an error with a reason, never padded silence (``mmsparse.data.audio``).

Three damaged tracks, each made from a good file by PyAV alone: AAC packets cut to a third of
their bytes, AAC packets zeroed (both from the 11th packet, 0.6 s into a 3 s track), and an
Opus track in Matroska cut in half (a track shorter than its header says). Both audio backends
report them, the dataset skips them and counts them by reason, ``mmsparse data check`` lists
each once, and strict mode raises the MediaError itself from DataLoader workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmsparse import cli
from mmsparse.data import DataConfig, MediaDataset, MediaError, make_loader
from mmsparse.data.audio import AUDIO_BACKENDS, read_audio
from tests.data.media import rewrite_audio, write_tone

DAMAGED = {"cut_packets.mp4": "corrupt_audio", "zeroed_packets.mp4": "corrupt_audio", "short_track.mka": "truncated"}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, synth_manifest, synth_records):
    """(folder, good clip with audio, good tone, {name: damaged path})."""
    root = tmp_path_factory.mktemp("damaged_audio")
    good = synth_manifest.parent / synth_records[0]["video"]
    files = {  # audio packets from the 11th on: a third of their bytes, or all zeros
        "cut_packets.mp4": rewrite_audio(good, root / "cut_packets.mp4",
                                         lambda k, b: b[: len(b) // 3] if k >= 10 else b),
        "zeroed_packets.mp4": rewrite_audio(good, root / "zeroed_packets.mp4",
                                            lambda k, b: bytes(len(b)) if k >= 10 else b),
    }
    tone = write_tone(root / "tone.mka", seconds=3.0)
    data = tone.read_bytes()
    (root / "short_track.mka").write_bytes(data[: len(data) // 2])  # the header still says 3 s
    files["short_track.mka"] = root / "short_track.mka"
    return root, good, tone, files


def _manifest(root: Path, name: str, records: list[dict]) -> Path:
    p = root / name
    p.write_text("".join(json.dumps(dict(r, caption="x")) + "\n" for r in records))
    return p


def _line(name: str, path: Path) -> dict:
    return {"id": name, "video": str(path)} if path.suffix == ".mp4" else {"id": name, "audio": str(path)}


@pytest.mark.parametrize("backend", AUDIO_BACKENDS)
def test_damaged_tracks_raise_with_a_reason(damaged, backend):
    _, good, tone, files = damaged
    assert len(read_audio(good, backend=backend)) == pytest.approx(3.0 * 16000, abs=0.05 * 16000)
    assert len(read_audio(tone, backend=backend)) == pytest.approx(3.0 * 16000, abs=0.05 * 16000)
    for name, path in files.items():
        with pytest.raises(MediaError) as err:
            read_audio(path, backend=backend)
        assert (err.value.reason, err.value.path) == (DAMAGED[name], str(path)), err.value
        with pytest.raises(MediaError):  # a window reaching into the damage
            read_audio(path, 16000, 0.0, 2.5, backend=backend)
    # a window that ends before the damage is intact, and reads as it is
    w = read_audio(files["short_track.mka"], 16000, 0.0, 1.0, backend=backend)
    assert len(w) == 16000 and np.abs(w[-1600:]).max() > 0.1  # the tone, not padding


def test_dataset_skips_and_counts_damaged_audio(damaged, synth_manifest, synth_records):
    root, good, tone, files = damaged
    recs = [_line(n, p) for n, p in files.items()] + [{"id": "tone", "audio": str(tone)}]
    cfg = DataConfig(num_frames=4, max_bad_fraction=1.0, max_retries=50, load_audio=True)
    ds = MediaDataset(_manifest(root, "m-ds.jsonl", recs), cfg)
    for i in range(3):
        item = ds[i]
        assert item["id"] == "tone"  # each damaged sample replaced by the only good one
    assert set(ds.stats.counts) == {"corrupt_audio", "truncated"}
    assert ds.stats.counts["corrupt_audio"] >= 2 and ds.stats.counts["truncated"] >= 1


def test_strict_mode_raises_media_error_from_workers(damaged):
    root, _, _, files = damaged
    m = _manifest(root, "m-strict.jsonl", [_line("z", files["zeroed_packets.mp4"])])
    ds = MediaDataset(m, DataConfig(num_frames=4, strict=True))
    with pytest.raises(MediaError) as err:
        list(make_loader(ds, batch_size=1, num_workers=1))
    e = err.value
    assert type(e) is MediaError and (e.path, e.reason) == (str(files["zeroed_packets.mp4"]), "corrupt_audio")
    assert "avcodec_send_packet" in e.detail and "Traceback" not in str(e)


def test_media_error_from_worker_text():
    e = MediaError("/data/a: b.mp4", "truncated", "moov (box) cut")
    text = ("Caught MediaError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nmmsparse.data.errors.MediaError: ' + str(e) + "\n")
    back = MediaError(text)
    assert (back.path, back.reason, back.detail) == (e.path, e.reason, e.detail)
    with pytest.raises(ValueError, match="needs \\(path, reason"):
        MediaError("no reason here")


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_data_check_lists_each_damaged_file_once(damaged, backend, capfd):
    root, good, tone, files = damaged
    recs = [_line(n, p) for n, p in files.items()]
    recs += [{"id": "good", "video": str(good)}, {"id": "t", "audio": str(tone)}]
    m = _manifest(root, f"m-check-{backend}.jsonl", recs)
    assert cli.main(["data", "check", str(m), "--backend", backend, "--audio-backend", backend]) == 1
    out, err = capfd.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert sorted((p, r) for p, r, _ in lines) == sorted((str(p), DAMAGED[n]) for n, p in files.items())
    assert "3 of 5 samples failed" in err
    assert "skipping" not in err and ".cc:" not in err and ".cc:" not in out  # no log lines, no C++ lines


def test_library_log_is_captured_and_the_terminal_restored(capfd):
    """What a C library writes to fd 2 during ``quiet`` becomes the error's reason; the
    terminal gets it back afterwards, also when a decode is abandoned inside a capture."""
    import os
    import threading

    from mmsparse.data.decode import LibraryError, call_with_timeout, quiet

    def fail():
        os.write(2, b"[08:46:50] /github/workspace/src/audio/audio_reader.cc:189: ERROR Fail to send packet.\n")
        raise RuntimeError("decode failed")

    with pytest.raises(LibraryError, match=r"^decode failed; log: ERROR Fail to send packet\.$"):
        quiet(fail)
    assert quiet(lambda: os.write(2, b"noise\n") and 7) == 7
    release = threading.Event()
    with pytest.raises(MediaError, match="timeout"):
        call_with_timeout(lambda: quiet(lambda: release.wait(10)), 0.2, "hung.mp4")
    os.write(2, b"after\n")
    release.set()
    out, err = capfd.readouterr()
    assert "Fail to send" not in err and "noise" not in err and err.endswith("after\n")
