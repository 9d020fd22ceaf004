import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from mmsparse.data.manifest import load_manifest, write_manifest


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_valid_lines_resolve_paths_and_captions(tmp_path):
    p = _write(tmp_path, [
        json.dumps({"id": "a", "video": "v/a.mp4", "caption": "one", "start": 1, "end": 2.5}),
        "",
        "# a comment",
        json.dumps({"id": "b", "image": "/abs/b.png", "caption": ["x", "y"], "extra": 7}),
        json.dumps({"id": "c", "audio": "c.wav"}),
    ])
    a, b, c = load_manifest(p)
    assert a.video == tmp_path.resolve() / "v/a.mp4" and a.captions == ("one",) and (a.start, a.end) == (1.0, 2.5)
    assert a.line == 1 and b.line == 4
    assert b.image == Path("/abs/b.png") and b.captions == ("x", "y") and b.caption == "x" and b.meta == {"extra": 7}
    assert c.captions == () and c.caption == "" and c.primary_path.name == "c.wav"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"video": "a.mp4"}', "'id' must be a non-empty string"),
    ('{"id": "a"}', "names no media"),
    ('{"id": "a", "video": 3}', "'video' must be a non-empty path string"),
    ('{"id": "a", "video": "a.mp4", "caption": 5}', "'caption' must be a string or a list"),
    ('{"id": "a", "video": "a.mp4", "caption": ["ok", 1]}', "'caption' must be a string or a list"),
    ('{"id": "a", "video": "a.mp4", "start": -1}', "'start' must be a number"),
    ('{"id": "a", "video": "a.mp4", "start": true}', "'start' must be a number"),
    ('{"id": "a", "video": "a.mp4", "start": 3, "end": 2}', "'end' (2) must be greater"),
    ('{"id": "a", "image": "a.png", "start": 1}', "need a 'video' or 'audio'"),
])
def test_errors_name_file_and_line(tmp_path, line, message):
    p = _write(tmp_path, [json.dumps({"id": "ok", "video": "x.mp4"}), line])
    with pytest.raises(ValueError) as err:
        load_manifest(p)
    assert f"{p}:2" in str(err.value) and message in str(err.value)


def test_duplicate_id_and_empty_manifest(tmp_path):
    p = _write(tmp_path, [json.dumps({"id": "a", "video": "x.mp4"}), json.dumps({"id": "a", "video": "y.mp4"})])
    with pytest.raises(ValueError, match=r"m\.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        load_manifest(p)
    with pytest.raises(ValueError, match="no samples"):
        load_manifest(_write(tmp_path, ["", "# nothing"]))
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "missing.jsonl")


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(_text, st.lists(_text, min_size=1, max_size=3),
                          st.one_of(st.none(), st.floats(0, 100))), min_size=1, max_size=5, unique_by=lambda r: r[0]))
def test_roundtrip(tmp_path_factory, rows):
    out = tmp_path_factory.mktemp("rt") / "m.jsonl"
    recs = [{"id": i, "video": f"v/{k}.mp4", "caption": caps} | ({"start": s} if s is not None else {})
            for k, (i, caps, s) in enumerate(rows)]
    write_manifest(out, recs)
    back = load_manifest(out)
    assert [s.id for s in back] == [r["id"] for r in recs]
    assert [list(s.captions) for s in back] == [r["caption"] for r in recs]
    assert [s.start for s in back] == [r.get("start") for r in recs]
