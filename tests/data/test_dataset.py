import json
import os

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten

from mmsparse.data import DataConfig, MediaDataset, ShardedSampler, collate, make_loader, synth
from mmsparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _unnorm(x: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) normalised float -> (..., H, W, C) uint8-range float."""
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * s + m) * 255).movedim(-3, -1).numpy()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_keep_their_layout(synth_manifest):
    cfg = DataConfig(num_frames=4, crop=(32, 32), train=True, seed=2)
    plain = next(iter(make_loader(synth_manifest, cfg, batch_size=2)))
    pinned = next(iter(make_loader(synth_manifest, cfg, batch_size=2, pin_memory=True, num_workers=1)))
    assert pinned.keys() == plain.keys()
    for k, v in plain.items():
        a, spec_a = tree_flatten(v)
        b, spec_b = tree_flatten(pinned[k])
        assert spec_a == spec_b, k
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor):
                assert y.is_pinned() and torch.equal(x, y), k
            else:
                assert x == y, k


def test_batch_layout(synth_manifest, spec):
    cfg = DataConfig(num_frames=6, crop=(48, 48), short_side=56)
    b = next(iter(make_loader(synth_manifest, cfg, batch_size=3)))
    assert b["video"].shape == (3, 6, 3, 48, 48) and b["video"].dtype == torch.float32
    assert b["video_mask"].shape == (3, 6) and b["video_mask"].all()
    assert b["video_times"].shape == (3, 6)
    assert b["audio"].shape[:2] == (3, 128) and b["audio_mask"].shape == (3, b["audio"].shape[2])
    assert b["audio_hop_seconds"] == 0.01 and b["audio_start"].shape == (3,)
    assert len(b["caption"]) == len(b["id"]) == len(b["captions"]) == 3
    assert isinstance(b["captions"][0], list) and b["caption"][0] == b["captions"][0][0]
    # eval sampling: segment centres, and the audio window starts at the first frame
    expect = (np.arange(6) + 0.5) * spec.frames / 6
    np.testing.assert_allclose(b["video_times"][0].numpy(), np.floor(expect) / spec.fps)
    np.testing.assert_allclose(b["audio_start"].numpy(), b["video_times"][:, 0].numpy())
    assert abs(b["audio"].shape[2] * 0.01 - (b["video_times"][0, -1] - b["video_times"][0, 0] + 1 / spec.fps)) < 0.03


@pytest.mark.parametrize("pixel_dtype", ["float32", "uint8"])
def test_frames_are_the_sampled_ones(synth_manifest, spec, pixel_dtype):
    ds = MediaDataset(synth_manifest, DataConfig(num_frames=5, normalize=False, train=True, flip=False,
                                                 pixel_dtype=pixel_dtype))
    item = ds[1]
    idx = np.round(item["video_times"].numpy() * spec.fps).astype(int)
    video = item["video"] if pixel_dtype == "uint8" else (item["video"] * 255).round().to(torch.uint8)
    assert video.dtype == torch.uint8
    assert [synth.decode_frame_index(f) for f in video.numpy()] == idx.tolist()


def test_padding_masks_for_uneven_clips(tmp_path, synth_manifest, synth_records, spec):
    root = synth_manifest.parent
    recs = [{"id": "full", "video": str(root / synth_records[0]["video"]), "caption": "a"},
            {"id": "part", "video": str(root / synth_records[1]["video"]), "caption": "b", "start": 0, "end": 0.5}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = MediaDataset(m, DataConfig(num_frames=8, min_frames=2))
    b = collate([ds[0], ds[1]])
    assert b["video"].shape[:2] == (2, 8)
    assert b["video_mask"].sum(1).tolist() == [8, 4]  # 0.5 s at 8 fps = 4 frames
    assert (b["video"][1, 4:] == 0).all() and (b["video_times"][1, 4:] == 0).all()
    assert b["audio_mask"][1].sum() < b["audio_mask"][0].sum() and not b["audio_mask"][1, -1]


def test_same_random_crop_and_flip_for_every_frame(synth_manifest):
    # float frames: the window search below subtracts pixel values
    cfg = DataConfig(num_frames=8, crop=(40, 40), train=True, normalize=False, seed=1, pixel_dtype="float32")
    ds = MediaDataset(synth_manifest, cfg)
    plain = MediaDataset(synth_manifest, DataConfig(num_frames=8, normalize=False, train=True, seed=1, flip=False,
                                                    pixel_dtype="float32"))
    flips, boxes = set(), set()
    for epoch in range(2):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(4):
            a, full = ds[i]["video"], plain[i]["video"]  # (T, 3, 40, 40), (T, 3, 64, 64): same frames
            found = []
            for flip in (False, True):
                src = full.flip(-1) if flip else full
                win = np.lib.stride_tricks.sliding_window_view(src[0, 0].numpy(), (40, 40))  # (25, 25, 40, 40)
                for y, x in zip(*np.nonzero(np.abs(win - a[0, 0].numpy()).max((2, 3)) < 1e-6)):
                    if torch.equal(src[:, :, y:y + 40, x:x + 40], a):  # every frame, one box, one flip
                        found.append((flip, int(y), int(x)))
            assert found, f"sample {i}: no single crop box / flip explains all frames"
            flips.add(found[0][0])
            boxes.add(found[0][1:])
    assert flips == {False, True} and len(boxes) > 2  # the parameters are random per sample


@pytest.mark.parametrize("pixel_dtype", ["float32", "uint8"])
def test_deterministic_across_worker_counts(synth_manifest, pixel_dtype):
    cfg = DataConfig(num_frames=4, crop=(32, 32), train=True, seed=7, pixel_dtype=pixel_dtype)

    def run(workers):
        loader = make_loader(synth_manifest, cfg, batch_size=2, num_workers=workers)
        return [(b["id"], b["video"], b["video_times"]) for b in loader]

    a, b = run(0), run(2)
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, va, ta), (_, vb, tb) in zip(a, b):
        assert torch.equal(va, vb) and torch.equal(ta, tb)
    other = make_loader(synth_manifest, DataConfig(num_frames=4, crop=(32, 32), train=True, seed=8), batch_size=4)
    assert not torch.equal(next(iter(other))["video"], torch.cat([a[0][1], a[1][1]])[:4])


def test_auto_decode_threads_share_out_the_cpus(monkeypatch):
    from mmsparse.data.dataset import MAX_AUTO_DECODE_THREADS, auto_decode_threads

    assert auto_decode_threads(8, cpus=16, processes=1) == 2  # the GPU host's 8 workers
    assert auto_decode_threads(8, cpus=32, processes=2) == 2  # two training processes on 32 cores
    assert auto_decode_threads(16, cpus=16, processes=1) == 1
    assert auto_decode_threads(2, cpus=2, processes=1) == 1
    assert auto_decode_threads(0, cpus=2, processes=1) == 2  # no workers: the process decodes itself
    assert auto_decode_threads(1, cpus=64, processes=1) == MAX_AUTO_DECODE_THREADS
    assert auto_decode_threads(4, cpus=2, processes=1) == 1  # never below one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_decode_threads(2, cpus=16) == 2


def test_decode_threads_config(synth_manifest):
    with pytest.raises(ValueError, match="decode_threads"):
        DataConfig(decode_threads=-1)
    assert MediaDataset(synth_manifest, DataConfig(decode_threads=3)).decode_threads == 3
    loader = make_loader(synth_manifest, DataConfig(decode_threads=3), num_workers=2)
    assert loader.dataset.decode_threads == 3  # a count given is kept
    from mmsparse.data.dataset import auto_decode_threads

    loader = make_loader(synth_manifest, DataConfig(decode_threads=0), num_workers=2)
    assert loader.dataset.decode_threads == auto_decode_threads(2)
    assert MediaDataset(synth_manifest, DataConfig()).decode_threads == 1  # the default


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decode_threads_do_not_change_pixels(synth_manifest, backend):
    """Frame threads and the scaler's slice threads are bit-exact: a clip decoded with one
    thread equals the same clip decoded with three."""
    def clip(threads):
        cfg = DataConfig(num_frames=6, short_side=24, crop=(24, 24), backend=backend, audio_backend="pyav",
                         decode_threads=threads, pixel_dtype="uint8", load_audio=False)
        return MediaDataset(synth_manifest, cfg)[1]["video"]

    assert torch.equal(clip(1), clip(3))


def test_epoch_changes_offsets(synth_manifest):
    ds = MediaDataset(synth_manifest, DataConfig(num_frames=4, train=True, seed=0))
    t0 = [ds[i]["video_times"] for i in range(4)]
    ds.set_epoch(1)
    t1 = [ds[i]["video_times"] for i in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(t0, t1))


def test_images_and_image_as_video(synth_manifest, spec):
    images = synth_manifest.parent / "images.jsonl"
    ds = MediaDataset(images, DataConfig(crop=(32, 32), normalize=False))
    b = collate([ds[0], ds[1]])
    assert b["image"].shape == (2, 3, 32, 32) and b["image_mask"].all() and "video" not in b
    one = MediaDataset(images, DataConfig(image_as_video=True, normalize=False))[0]
    assert one["video"].shape == (1, 3, *spec.size) and one["video_times"].tolist() == [0.0]
    rec = json.loads(images.read_text().splitlines()[0])
    colour = np.array(synth.COLOURS[rec["caption"].split()[1]]) / 255
    pix = one["video"][0].movedim(0, -1).reshape(-1, 3).numpy()
    assert (np.abs(pix - colour).max(1) < 0.02).sum() > 20


def test_mixed_video_and_image_batch(synth_manifest):
    v = MediaDataset(synth_manifest, DataConfig(num_frames=3, load_audio=False))[0]
    i = MediaDataset(synth_manifest.parent / "images.jsonl", DataConfig())[0]
    b = collate([v, i])
    assert b["video_mask"].tolist() == [[True] * 3, [False] * 3]
    assert b["image_mask"].tolist() == [False, True] and "audio" not in b


def test_fps_sampling_and_pyav_backend_give_same_batch(synth_manifest):
    a = MediaDataset(synth_manifest, DataConfig(mode="fps", target_fps=4, num_frames=5, backend="pyav",
                                                audio_backend="pyav"))[0]
    b = MediaDataset(synth_manifest, DataConfig(mode="fps", target_fps=4, num_frames=5))[0]
    np.testing.assert_allclose(a["video_times"].numpy(), [0, 0.25, 0.5, 0.75, 1.0])
    assert torch.equal(a["video_times"], b["video_times"])
    assert (a["video"] - b["video"]).abs().mean() < 0.05 and (a["audio"] - b["audio"]).abs().mean() < 0.1


def test_collate_errors():
    with pytest.raises(ValueError, match="at least one sample"):
        collate([])
    a = {"id": "a", "video": torch.zeros(2, 3, 8, 8), "video_times": torch.zeros(2)}
    b = {"id": "b", "video": torch.zeros(2, 3, 8, 9), "video_times": torch.zeros(2)}
    with pytest.raises(ValueError, match="differ in \\(C, H, W\\).*crop"):
        collate([a, b])


def test_config_and_sample_errors(synth_manifest):
    with pytest.raises(ValueError, match="max_bad_fraction"):
        DataConfig(max_bad_fraction=2)
    ds = MediaDataset(synth_manifest.parent / "images.jsonl", DataConfig(load_image=False))
    with pytest.raises(ValueError, match="img-0000.*line 1.*no modality"):
        ds[0]


def test_sharded_loader_covers_dataset(synth_manifest):
    cfg = DataConfig(num_frames=2, load_audio=False)
    ids = [i for r in range(2) for b in make_loader(synth_manifest, cfg, batch_size=1, rank=r, num_replicas=2)
           for i in b["id"]]
    assert sorted(ids) == sorted(s.id for s in MediaDataset(synth_manifest, cfg).samples)
    assert isinstance(make_loader(synth_manifest, cfg).sampler, ShardedSampler)


def _separate_wav(path, spec, seed: int = 7):
    """A real synthetic soundtrack (a tone of its own plan) as a standalone 16 kHz WAV."""
    import soundfile as sf

    plan = synth.plan_clip(np.random.default_rng(seed), spec.frames, spec.fps)
    sf.write(path, synth.render_audio(plan, 16000), 16000)
    return path


def test_audio_only_manifest_line(tmp_path, spec):
    from mmsparse.data.audio import log_mel, read_audio

    wav = _separate_wav(tmp_path / "tone.wav", spec)
    recs = [{"id": "window", "audio": "tone.wav", "caption": "a tone", "start": 0.5, "end": 2.0},
            {"id": "whole", "audio": "tone.wav", "caption": "a tone"}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = MediaDataset(m, DataConfig(num_frames=4, max_audio_seconds=1.0))
    win, whole = ds[0], ds[1]
    assert "video" not in win and "video" not in whole
    # [0.5, 2.0) s at 16 kHz = 24000 samples -> 24000 // 160 + 1 mel frames, starting at 0.5 s
    assert win["audio"].shape == (128, 151) and win["audio_start"] == 0.5
    assert torch.equal(win["audio"], log_mel(read_audio(wav, 16000, 0.5, 2.0)))
    # no end: the file from 0 s, cut to max_audio_seconds
    assert whole["audio"].shape == (128, 101) and whole["audio_start"] == 0.0
    assert torch.equal(whole["audio"], log_mel(read_audio(wav, 16000, 0.0, None)[:16000]))
    b = collate([win, whole])
    assert "video" not in b and b["audio"].shape == (2, 128, 151)
    assert b["audio_mask"].sum(1).tolist() == [151, 101]
    np.testing.assert_allclose(b["audio_start"].numpy(), [0.5, 0.0])


def test_video_with_separate_audio_file(tmp_path, synth_manifest, synth_records, spec):
    from mmsparse.data.audio import log_mel, read_audio

    wav = _separate_wav(tmp_path / "tone.wav", spec)
    video = synth_manifest.parent / synth_records[0]["video"]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "v", "video": str(video), "audio": "tone.wav", "caption": "c"}) + "\n")
    cfg = DataConfig(num_frames=6)
    item = MediaDataset(m, cfg)[0]
    times = item["video_times"].numpy()
    t0, t1 = float(times[0]), float(times[-1]) + 1 / spec.fps
    assert item["video"].shape[:2] == (6, 3)
    # the audio window is the video's (first frame to one frame past the last), read from the WAV
    assert item["audio_start"] == t0
    want = log_mel(read_audio(wav, cfg.sample_rate, t0, t1))
    assert item["audio"].shape == want.shape == (128, round((t1 - t0) * 16000) // 160 + 1)
    assert torch.equal(item["audio"], want)
    # ... and not the video's own soundtrack over the same window (a different tone)
    own = log_mel(read_audio(video, cfg.sample_rate, t0, t1))
    n = min(own.shape[1], want.shape[1])
    assert (own[:, :n] - want[:, :n]).abs().mean() > 1.0


def test_cgroup_cpu_limit_parses_cpu_max():
    from mmsparse.data.dataset import cgroup_cpu_limit, usable_cpus

    assert cgroup_cpu_limit("400000 100000\n") == 4.0
    assert cgroup_cpu_limit("150000 100000") == 1.5
    assert cgroup_cpu_limit("max 100000") is None
    assert cgroup_cpu_limit("") is None and cgroup_cpu_limit("garbage") is None
    assert cgroup_cpu_limit("0 100000") is None
    n = usable_cpus()
    assert 1 <= n <= (os.cpu_count() or 1)


def test_usable_cpus_capped_by_cgroup_quota(monkeypatch):
    """A quota of 1.5 CPUs on a wider affinity mask gives 2 (rounded up), never more than the mask."""
    from pathlib import Path as _P

    from mmsparse.data import dataset

    real = _P.read_text

    def fake(self, *a, **k):
        return "150000 100000\n" if str(self) == "/sys/fs/cgroup/cpu.max" else real(self, *a, **k)

    monkeypatch.setattr(_P, "read_text", fake)
    monkeypatch.setattr(dataset.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert dataset.usable_cpus() == 2
    monkeypatch.setattr(dataset.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert dataset.usable_cpus() == 1
