"""Files the training writes: the umask's mode (not mkstemp's or safetensors' 0600), and an
export replaced without a moment where no whole export exists."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from mmsparse.fileio import atomic_write_text, replace_dir
from mmsparse.models import CaptionTokenizer, VideoCaptioner, create_model
from mmsparse.train import checkpoint as ckpt


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(p) -> int:
    return p.stat().st_mode & 0o777


def test_atomic_write_text_follows_the_umask(tmp_path, umask_027):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert _mode(tmp_path / "a.txt") == 0o640
    os.umask(0o022)
    atomic_write_text(tmp_path / "a.txt", "y")
    assert _mode(tmp_path / "a.txt") == 0o644 and (tmp_path / "a.txt").read_text() == "y"


def _tiny_model() -> VideoCaptioner:
    tok = CaptionTokenizer.train(["a red square moves left", "a blue circle beeps"], vocab_size=64)
    torch.manual_seed(0)
    return create_model("captioner_tiny", tokenizer=tok)


def test_export_has_the_umask_mode_and_replaces_the_old_one_whole(tmp_path, monkeypatch):
    os.umask(old := os.umask(0o022))
    model = _tiny_model()
    out = tmp_path / "export"
    ckpt.export_pretrained(None, model, out)
    assert _mode(out / "model.safetensors") == 0o666 & ~old and _mode(out / "config.json") == 0o666 & ~old
    first = (out / "model.safetensors").read_bytes()

    # killed while the old export is being deleted: `export` must already be the whole new one
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):
        victim = next(p for p in sorted(os.scandir(path), key=lambda e: e.name) if p.is_file())
        os.unlink(victim.path)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.export_pretrained(None, model, out)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    loaded = VideoCaptioner.from_pretrained(out)  # every file present, checksums right
    assert (out / "model.safetensors").read_bytes() != first
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))

    # the next export clears what the killed one left beside it
    ckpt.export_pretrained(None, model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_replace_dir_swaps_whole_folders(tmp_path):
    new, target = tmp_path / "new", tmp_path / "target"
    new.mkdir(), target.mkdir()
    (new / "n").write_text("new")
    (target / "o").write_text("old")
    replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["n"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
