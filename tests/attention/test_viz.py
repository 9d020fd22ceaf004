from __future__ import annotations

import pytest

from mmsparse.attention import Global, Local, Tiled
from mmsparse.attention.viz import parse_pattern
from mmsparse.cli import main


def test_parse_pattern_presets_and_expressions():
    assert parse_pattern("Local((3, 5, 5)) | Global(2)") == Local((3, 5, 5)) | Global(2)
    assert parse_pattern("sliding_tile()") == Tiled((4, 4, 8), radius=(1, 1, 1))
    assert parse_pattern("longformer") == Local(513) | Global(64)
    with pytest.raises(ValueError, match="unknown names"):
        parse_pattern("__import__('os')")
    with pytest.raises(ValueError, match="valid expression"):
        parse_pattern("Local((3,")


@pytest.mark.parametrize("args", [["Local((3, 5, 5))", "--grid", "6,12,12"], ["longformer(33, 4)", "--grid", "700"],
                                  ["Tiled((2, 4, 4), 1)", "--grid", "4,8,8", "--order", "2,4,4"]])
def test_viz_writes_a_png(tmp_path, args, capsys):
    out = tmp_path / "p.png"
    assert main(["viz", *args, "--block", "32", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert "density" in capsys.readouterr().out


def test_viz_reports_bad_input(tmp_path, capsys):
    assert main(["viz", "Local((9, 9, 9))", "--grid", "4,4,4", "--out", str(tmp_path / "x.png")]) == 2
    assert "larger than the grid" in capsys.readouterr().err
