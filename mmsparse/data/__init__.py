"""mmsparse.data: from a manifest to a modality-keyed batch of tensors.

Pipeline: ``manifest.jsonl`` -> ``MediaDataset`` (decode with decord or PyAV, sample frames,
log-mel audio, torchvision v2 transforms, failure handling) -> ``collate`` -> Batch.

Batch layout (a dict; a modality's keys are present when any sample of the batch has it)::

    B batch, T frames, C = 3 channels, H x W frame / image size, M mel bins (128), Tm audio frames

    "video"             float32 (B, T, C, H, W)  normalised frames, zero-padded past each clip's end
                        or uint8                 raw pixels, zero-padded (see "Pixels" below)
    "video_mask"        bool    (B, T)           True on real frames, False on padding
    "video_times"       float64 (B, T)           seconds of each sampled frame in its file (0 on padding)
    "audio"             float32 (B, M, Tm)       log-mel filterbank (25 ms window, 10 ms hop, 16 kHz mono)
    "audio_mask"        bool    (B, Tm)          True on real feature frames
    "audio_start"       float64 (B,)             seconds of audio frame 0 (= the clip's first video time)
    "audio_hop_seconds" float                    audio frame j of sample b is centred on
                                                 audio_start[b] + j * audio_hop_seconds
    "image"             float32 (B, C, H, W)     with "image_mask" bool (B,) for samples that have one
                        or uint8                 (zeros for samples without one)
    "pixel_norm"        (mean, std)              tuples of C floats; present when video or image is uint8
    "caption"           list[str]  (B)           the training target (first reference)
    "captions"          list[list[str]] (B)      all references, for evaluation
    "id"                list[str]  (B)

Masks are True where data is real; an audio or video token's time is recoverable from
``video_times`` and ``audio_start`` / ``audio_hop_seconds``, which is what audio-visual
alignment (``AVSync``) needs.

Pixels (``DataConfig.pixel_dtype``): ``float32`` frames are converted and normalised on the
loader's CPU. ``uint8`` frames leave the loader as decoded, resized, cropped and flipped pixels p
(4x fewer bytes through shared memory and to the GPU, no float work per pixel in the worker);
the model turns them into the float32 frames on its own device with the batch's ``pixel_norm``:

    x = (p.float() * (1 / 255) - mean) / std          per channel; x = 0 where the mask is False

which is the float32 path's arithmetic operation for operation (``mmsparse.encoders
.normalize_pixels``), so both paths give the same tokens. The uint8 padding (past a clip's end,
a missing image) is zero pixels, which the model sets to 0 after normalising, as in the float32
path. ``pixel_norm`` is ``(0,) * C, (1,) * C`` with ``normalize=False``. Default ``auto``:
uint8 when ``train`` (the training loop is the loader-bound consumer), float32 otherwise.

Entry points: ``make_loader(manifest, config, batch_size, ...)`` (a DataLoader that survives
decode workers killed by their decoder, see ``loader``), ``synth.make_dataset`` (the
default data of every recipe), ``convert`` (MSR-VTT, ActivityNet Captions, YouCook2),
``mmsparse data {synth,convert,check}``.
"""

from __future__ import annotations

from .collate import collate
from .dataset import DataConfig, MediaDataset, read_image
from .errors import REASONS, CrashGuard, FailureStats, MediaError, TooManyBadSamples
from .loader import MediaLoader, make_loader
from .manifest import Sample, load_manifest, manifest_captions, write_manifest
from .sampler import ShardedSampler

__all__ = [
    "CrashGuard", "DataConfig", "FailureStats", "MediaDataset", "MediaError", "MediaLoader", "REASONS", "Sample",
    "ShardedSampler", "TooManyBadSamples", "collate", "load_manifest", "make_loader", "manifest_captions", "read_image", "write_manifest",
]
