"""uint8 pixels (DataConfig.pixel_dtype): the same frames as the float32 path once normalised,
collated with their padding masks and pixel_norm, a quarter of the bytes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from mmsparse.data import DataConfig, MediaDataset, collate, make_loader
from mmsparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mmsparse.encoders import normalize_pixels


def _pair(manifest, **kw) -> tuple[MediaDataset, MediaDataset]:
    """The same config twice, float32 and uint8 pixels."""
    return (MediaDataset(manifest, DataConfig(pixel_dtype="float32", **kw)),
            MediaDataset(manifest, DataConfig(pixel_dtype="uint8", **kw)))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return float((a - b).abs().max())


def test_pixel_dtype_default_and_errors():
    assert DataConfig(train=True).pixel_dtype_resolved == "uint8"
    assert DataConfig(train=False).pixel_dtype_resolved == "float32"
    assert DataConfig(train=True, pixel_dtype="float32").pixel_dtype_resolved == "float32"
    with pytest.raises(ValueError, match="pixel_dtype must be one of"):
        DataConfig(pixel_dtype="float16")


@pytest.mark.parametrize("normalize", [True, False])
def test_uint8_frames_normalise_to_the_float_frames(synth_manifest, normalize):
    """Same seed, so the same clip offsets, crop boxes and flips; 2 epochs x 4 clips."""
    kw = dict(num_frames=6, crop=(40, 48), train=True, seed=2, normalize=normalize)
    f32, u8 = _pair(synth_manifest, **kw)
    unflipped = MediaDataset(synth_manifest, DataConfig(pixel_dtype="uint8", **{**kw, "flip": False}))
    flips = 0
    for epoch in range(2):
        for ds in (f32, u8, unflipped):
            ds.set_epoch(epoch)
        for i in range(len(f32)):
            a, b = f32[i], u8[i]
            assert b["video"].dtype == torch.uint8 and b["video"].shape == a["video"].shape == (6, 3, 40, 48)
            assert torch.equal(a["video_times"], b["video_times"]) and torch.equal(a["audio"], b["audio"])
            assert "pixel_norm" not in a
            mean, std = b["pixel_norm"]
            assert (mean, std) == ((IMAGENET_MEAN, IMAGENET_STD) if normalize else ((0.0,) * 3, (1.0,) * 3))
            assert _max_diff(normalize_pixels(b["video"], b["pixel_norm"]), a["video"]) <= 1e-6
            # the crop box is drawn before the flip, so without flipping the same box comes out
            flips += int(not torch.equal(b["video"], unflipped[i]["video"]))
    assert 0 < flips < 2 * len(f32)  # both ways occur


def test_uint8_images_resized_and_cropped_like_float(synth_manifest):
    f32, u8 = _pair(synth_manifest.parent / "images.jsonl", short_side=40, crop=(32, 32), train=True, seed=5)
    for i in range(len(f32)):
        a, b = f32[i], u8[i]
        assert b["image"].dtype == torch.uint8 and b["image"].shape == a["image"].shape == (3, 32, 32)
        assert _max_diff(normalize_pixels(b["image"], b["pixel_norm"]), a["image"]) <= 1e-6


def test_collate_uint8_keeps_padding_masks(tmp_path, synth_manifest, synth_records):
    """Uneven clips and a sample without video: the uint8 batch's padding is zero pixels, its
    masks are the float batch's, and normalising with the masks gives the float batch exactly."""
    root = synth_manifest.parent
    img = json.loads((root / "images.jsonl").read_text().splitlines()[0])["image"]
    recs = [{"id": "full", "video": str(root / synth_records[0]["video"]), "caption": "a"},
            {"id": "part", "video": str(root / synth_records[1]["video"]), "caption": "b", "start": 0, "end": 0.5,
             "image": str(root / img)},
            {"id": "img", "image": str(root / img), "caption": "c"}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    f32, u8 = _pair(m, num_frames=8, min_frames=2, crop=(32, 32))
    a, b = collate([f32[i] for i in range(3)]), collate([u8[i] for i in range(3)])
    assert b["video"].dtype == b["image"].dtype == torch.uint8 and b["video"].shape == a["video"].shape == (3, 8, 3, 32, 32)
    assert b["video_mask"].sum(1).tolist() == a["video_mask"].sum(1).tolist() == [8, 4, 0]
    assert b["image_mask"].tolist() == a["image_mask"].tolist() == [False, True, True]
    assert (b["video"][1, 4:] == 0).all() and (b["video"][2] == 0).all() and (b["image"][0] == 0).all()
    assert b["pixel_norm"] == (IMAGENET_MEAN, IMAGENET_STD) and "pixel_norm" not in a
    assert _max_diff(normalize_pixels(b["video"], b["pixel_norm"], b["video_mask"]), a["video"]) <= 1e-6
    assert _max_diff(normalize_pixels(b["image"], b["pixel_norm"], b["image_mask"]), a["image"]) <= 1e-6
    for k in ("video_times", "audio", "audio_mask", "audio_start"):
        assert torch.equal(a[k], b[k]), k


def test_uint8_is_a_quarter_of_the_bytes(synth_manifest):
    f32, u8 = _pair(synth_manifest, num_frames=8, load_audio=False)
    a, b = collate([f32[i] for i in range(4)]), collate([u8[i] for i in range(4)])
    per_clip = [x["video"].untyped_storage().nbytes() / 4 for x in (a, b)]
    assert per_clip[1] == 8 * 3 * 64 * 64 and per_clip[0] == 4 * per_clip[1]
    # uint8 video is stored as the decoders give it, (B, T, H, W, C); float32 stays contiguous
    assert a["video"].is_contiguous() and b["video"].permute(0, 1, 3, 4, 2).is_contiguous()
    assert normalize_pixels(b["video"], b["pixel_norm"]).is_contiguous()


def _collate_reporting_shm(samples):
    batch = collate(samples)
    return batch, {k: batch[k].is_shared() for k in ("video", "video_mask", "video_times", "audio")}


@pytest.mark.parametrize("pixel_dtype", ["float32", "uint8"])
def test_collate_allocates_in_shared_memory_in_a_worker(synth_manifest, pixel_dtype):
    """The batch is built in shared memory inside the worker (no copy into it on the way out)."""
    ds = MediaDataset(synth_manifest, DataConfig(num_frames=4, pixel_dtype=pixel_dtype))
    (batch, shared), = list(DataLoader(ds, batch_size=4, num_workers=1, collate_fn=_collate_reporting_shm))
    assert shared["video"] and shared["video_times"] and shared["audio"]
    assert batch["video"].dtype == getattr(torch, pixel_dtype)
    assert collate([ds[0]])["video"].is_shared() is False  # main process: ordinary memory


def test_uint8_loader_with_workers_equals_float_loader(synth_manifest):
    kw = dict(num_frames=4, crop=(32, 32), train=True, seed=7)
    f32 = list(make_loader(synth_manifest, DataConfig(pixel_dtype="float32", **kw), batch_size=2, num_workers=2))
    u8 = list(make_loader(synth_manifest, DataConfig(**kw), batch_size=2, num_workers=2))  # auto: uint8 (train)
    assert len(f32) == len(u8) == 2
    for a, b in zip(f32, u8):
        assert a["id"] == b["id"] and b["video"].dtype == torch.uint8
        assert _max_diff(normalize_pixels(b["video"], b["pixel_norm"], b["video_mask"]), a["video"]) <= 1e-6


def test_collate_rejects_mixed_dtypes_and_missing_norm():
    f = {"id": "f", "video": torch.zeros(2, 3, 8, 8), "video_times": torch.zeros(2, dtype=torch.float64)}
    u = {"id": "u", "video": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "video_times": torch.zeros(2, dtype=torch.float64),
         "pixel_norm": (IMAGENET_MEAN, IMAGENET_STD)}
    with pytest.raises(ValueError, match="differ in dtype"):
        collate([f, u])
    with pytest.raises(ValueError, match="without a pixel_norm"):
        collate([{k: v for k, v in u.items() if k != "pixel_norm"}])
    with pytest.raises(ValueError, match="different pixel_norm"):
        collate([u, {**u, "pixel_norm": ((0.0,) * 3, (1.0,) * 3)}])


@pytest.mark.parametrize("normalize", [True, False])
def test_float_path_is_torchvisions_to_dtype_and_normalize(normalize):
    """The loader's float32 conversion (one pass, normalize_pixels' arithmetic) gives torchvision's
    ToDtype(scale=True) + Normalize bit for bit, on channels-last clips and on images."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from mmsparse.data.transforms import TransformConfig, apply_clip, apply_image, build_transform

    g = torch.Generator().manual_seed(5)
    clip = torch.randint(0, 256, (5, 37, 41, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    image = torch.randint(0, 256, (3, 29, 33), dtype=torch.uint8, generator=g)
    cfg = TransformConfig(crop=(32, 24), normalize=normalize, dtype="float32")
    ref = v2.Compose([v2.CenterCrop((32, 24)), v2.ToDtype(torch.float32, scale=True)]
                     + ([v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))] if normalize else []))
    got_clip = apply_clip(build_transform(cfg), clip)
    got_image = apply_image(build_transform(cfg), image)
    assert got_clip.is_contiguous() and got_clip.dtype == torch.float32
    assert torch.equal(got_clip, ref(tv_tensors.Video(clip)).as_subclass(torch.Tensor))
    assert torch.equal(got_image, ref(tv_tensors.Image(image)).as_subclass(torch.Tensor))
