"""uint8 video / image pixels are normalised by the encoders to the float path's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.transforms import v2

from mmsparse.data import DataConfig, MediaDataset, collate, synth
from mmsparse.encoders import ImageEmbed, MultimodalTokenizer, TubeletEmbed, normalize_pixels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torchvision(pixels: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """What mmsparse.data's float32 path does to uint8 pixels."""
    return v2.Normalize(list(mean), list(std))(v2.ToDtype(torch.float32, scale=True)(pixels))


@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 5, 3, 16, 24), (4, 1, 9, 7)])
def test_normalize_pixels_matches_torchvision(shape):
    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    c = shape[-3]
    norm = (MEAN[:c], STD[:c])
    out = normalize_pixels(px, norm)
    assert out.dtype == torch.float32 and out.shape == px.shape
    assert float((out - _torchvision(px, *norm)).abs().max()) <= 1e-6
    # strided input (decoded frames are (T, H, W, C) permuted): same numbers
    strided = px.movedim(-3, -1).contiguous().movedim(-1, -3)
    assert float((normalize_pixels(strided, norm) - out).abs().max()) <= 1e-6


def test_normalize_pixels_mask_zeroes_padding():
    px = torch.full((2, 3, 3, 4, 4), 200, dtype=torch.uint8)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = normalize_pixels(px, (MEAN, STD), mask)
    assert (out[1, 1:] == 0).all() and not out[1, 1:].signbit().any()  # +0.0, as the float path pads
    assert (out[0] != 0).all() and (out[1, 0] != 0).all()


@pytest.mark.parametrize("bad, match", [
    (dict(pixels=torch.zeros(1, 3, 4, 4), norm=(MEAN, STD)), "must be uint8"),
    (dict(pixels=torch.zeros(1, 3, 4, 4, dtype=torch.uint8), norm=None), "need norm=\\(mean, std\\)"),
    (dict(pixels=torch.zeros(1, 3, 4, 4, dtype=torch.uint8), norm=(MEAN[:2], STD[:2])), "C=3"),
    (dict(pixels=torch.zeros(1, 3, 4, 4, dtype=torch.uint8), norm=(MEAN, (1.0, 0.0, 1.0))), "non-zero"),
    (dict(pixels=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), norm=(MEAN, STD), mask=torch.ones(3, dtype=torch.bool)),
     "mask must be \\(2,\\)"),
])
def test_normalize_pixels_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_pixels(**bad)


def test_embeds_take_uint8_and_float_alike():
    torch.manual_seed(0)
    video = torch.randint(0, 256, (2, 5, 3, 16, 16), dtype=torch.uint8)  # T = 5: the tubelet pads T
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    tub = TubeletEmbed((2, 8, 8), 3, 16)
    ref = _torchvision(video) * mask[:, :, None, None, None]
    with torch.no_grad():
        (a, ga), (b, gb) = tub(ref), tub(video, norm=(MEAN, STD), mask=mask)
    assert ga == gb == (3, 2, 2) and float((a - b).abs().max()) <= 1e-6
    img = ImageEmbed(8, 3, 16)
    with torch.no_grad():
        (a, _), (b, _) = img(_torchvision(video[:, 0])), img(video[:, 0], norm=(MEAN, STD))
    assert float((a - b).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="video must be float frames or uint8 pixels, got dtype torch.int64"):
        tub(video.long())
    with pytest.raises(ValueError, match="need norm"):
        tub(video)


@pytest.fixture(scope="module")
def mixed_manifest(tmp_path_factory):
    """3 samples: a whole clip, a half clip with an image, an image alone (uneven T, missing parts)."""
    root = tmp_path_factory.mktemp("pixels")
    man = synth.make_dataset(root, clips=2, frames=16, seed=1, size=(32, 48), fps=8, images=1)
    vids = [json.loads(ln)["video"] for ln in man.read_text().splitlines()]
    img = json.loads((root / "images.jsonl").read_text().splitlines()[0])["image"]
    recs = [{"id": "a", "video": vids[0], "caption": "a"},
            {"id": "b", "video": vids[1], "image": img, "caption": "b", "start": 0, "end": 1.0},
            {"id": "c", "image": img, "caption": "c"}]
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokenizer_gives_the_same_tokens_for_both_paths(mixed_manifest, dtype):
    """The data pipeline's uint8 and float32 batches (same seed, crops, flips) -> the same
    TokenStream; in bf16 the float batch is cast as the training loop casts it."""
    kw = dict(num_frames=16, min_frames=2, crop=(32, 32), train=True, seed=4)
    batches = [collate([ds[i] for i in range(3)]) for ds in
               (MediaDataset(mixed_manifest, DataConfig(pixel_dtype=p, **kw)) for p in ("float32", "uint8"))]
    f32, u8 = batches
    assert u8["video"].dtype == u8["image"].dtype == torch.uint8 and f32["video"].dtype == torch.float32
    assert u8["video_mask"].sum(1).tolist() == [16, 8, 0]
    if dtype != torch.float32:
        f32 = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else v)
               for k, v in f32.items()}
    torch.manual_seed(0)
    tok = MultimodalTokenizer(16, tubelet=(2, 8, 8), image_patch=8, audio_patch=16, audio_stride=16,
                              n_global=2, align=8).to(dtype)
    with torch.no_grad():
        a, b = tok(f32), tok(u8)
    assert a.layout == b.layout and torch.equal(a.pad_mask, b.pad_mask)
    assert a.tokens.dtype == b.tokens.dtype == dtype
    assert float((a.tokens.float() - b.tokens.float()).abs().max()) <= 1e-6


def test_tokenizer_needs_pixel_norm_for_uint8():
    tok = MultimodalTokenizer(8, modalities=("video",), tubelet=(2, 8, 8))
    with pytest.raises(ValueError, match="uint8 pixels but the batch has no 'pixel_norm'"):
        tok({"video": torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_on_the_device_matches_the_cpu():
    px = torch.randint(0, 256, (2, 8, 3, 32, 32), dtype=torch.uint8)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    cpu = normalize_pixels(px, (MEAN, STD), mask)
    gpu = normalize_pixels(px.cuda(), (MEAN, STD), mask.cuda())
    assert gpu.device.type == "cuda" and float((gpu.cpu() - cpu).abs().max()) <= 1e-6
