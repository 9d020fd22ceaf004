"""Shared fixtures: 8 real synthetic clips (H.264 + AAC, 32x32, 16 frames) decoded by mmsparse.data."""

from __future__ import annotations

import pytest
import torch

from mmsparse.data import DataConfig, make_loader, manifest_captions
from mmsparse.data.synth import make_dataset
from mmsparse.models import CaptionTokenizer, create_model


@pytest.fixture(scope="session")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth"), clips=8, frames=16, seed=0, size=(32, 32), images=4)


@pytest.fixture(scope="session")
def batch(manifest):
    cfg = DataConfig(num_frames=8, train=False, flip=False)
    return next(iter(make_loader(manifest, cfg, batch_size=8)))


@pytest.fixture(scope="session")
def tokenizer(manifest):
    return CaptionTokenizer.train(manifest_captions(manifest), vocab_size=512)


@pytest.fixture
def tiny(tokenizer):
    torch.manual_seed(0)
    return create_model("captioner_tiny", tokenizer=tokenizer).eval()
