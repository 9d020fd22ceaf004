"""Fixtures: small synthetic datasets written once per session, and helpers to break files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmsparse.data import synth

from types import SimpleNamespace

CLIPS, FRAMES, SIZE, FPS = 4, 24, (64, 64), 8


@pytest.fixture(scope="session")
def spec() -> SimpleNamespace:
    """Sizes of ``synth_manifest``: clips, frames, size (H, W), fps."""
    return SimpleNamespace(clips=CLIPS, frames=FRAMES, size=SIZE, fps=FPS)


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory) -> Path:
    """4 clips x 24 frames, 64x64, 8 fps, H.264 + AAC, plus 4 PNG images (images.jsonl)."""
    return synth.make_dataset(tmp_path_factory.mktemp("synth"), clips=CLIPS, frames=FRAMES, seed=3, size=SIZE, fps=FPS)


@pytest.fixture(scope="session")
def synth_records(synth_manifest) -> list[dict]:
    return [json.loads(line) for line in synth_manifest.read_text().splitlines()]


@pytest.fixture(scope="session")
def long_manifest(tmp_path_factory) -> Path:
    """One needle clip of 512..640 frames (a short range keeps the test fast)."""
    return synth.make_dataset(tmp_path_factory.mktemp("long"), clips=1, seed=5, size=SIZE, fps=FPS,
                              long=True, long_frames=(512, 640))


@pytest.fixture(scope="session")
def rect_manifest(tmp_path_factory) -> Path:
    """Non-square 48x80 clips of 40 frames, no images."""
    return synth.make_dataset(tmp_path_factory.mktemp("rect"), clips=2, frames=40, seed=4, size=(48, 80),
                              fps=10, images=0)
