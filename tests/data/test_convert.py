"""Converters on small annotation files written in each dataset's exact published layout."""

import json

import pytest

from mmsparse import cli
from mmsparse.data import load_manifest
from mmsparse.data.convert import ConvertReport, activitynet, convert, msrvtt, youcook2

MSRVTT = {
    "info": {"contributor": "Microsoft MSM group", "year": "2016", "version": "1.0"},
    "videos": [
        {"category": 9, "url": "https://www.youtube.com/watch?v=9lZi22qLlEo", "video_id": "video0",
         "start time": 137.72, "end time": 149.44, "split": "train", "id": 0},
        {"category": 16, "url": "https://www.youtube.com/watch?v=w4JM08PDEng", "video_id": "video1",
         "start time": 184.33, "end time": 206.89, "split": "validate", "id": 1},
        {"category": 3, "url": "https://www.youtube.com/watch?v=x", "video_id": "video2",
         "start time": 1.0, "end time": 9.0, "split": "train", "id": 2},
    ],
    "sentences": [
        {"caption": "a car is shown", "video_id": "video0", "sen_id": 1},
        {"caption": "a man drives a vehicle through the countryside", "video_id": "video0", "sen_id": 0},
        {"caption": "a cartoon of people talking", "video_id": "video1", "sen_id": 2},
    ],
}
ACTIVITYNET = {
    "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 90.0]],
                      "sentences": ["A young woman is seen standing in a room and leads into her dancing.",
                                    " The girl dances around the room while the camera captures her movements.",
                                    " She continues dancing around the room and ends by laying on the floor."]},
    "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 15.74], [70.0, 75.0]],
                      "sentences": ["A man is seen speaking to the camera.", "An event past the end."]},
}
YOUCOOK2 = {"database": {
    "GLd3aX16zBg": {"duration": 241.62, "subset": "training", "recipe_type": "113",
                    "annotations": [{"segment": [90, 102], "id": 0, "sentence": "spread margarine on two slices of white bread"},
                                    {"segment": [114, 127], "id": 1, "sentence": "place a slice of cheese on the bread"}],
                    "video_url": "https://www.youtube.com/watch?v=GLd3aX16zBg"},
    "xHr8X2Wpmno": {"duration": 184.0, "subset": "validation", "recipe_type": "101",
                    "annotations": [{"segment": [15, 45], "id": 0, "sentence": "grill the tomatoes in a pan"}],
                    "video_url": "https://www.youtube.com/watch?v=xHr8X2Wpmno"},
}}


def _dump(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_msrvtt(tmp_path):
    ann = _dump(tmp_path, "train_val_videodatainfo.json", MSRVTT)
    recs = msrvtt(ann)
    assert [r["id"] for r in recs] == ["video0", "video1"]  # video2 has no sentences
    assert recs[0]["caption"] == ["a man drives a vehicle through the countryside", "a car is shown"]
    assert recs[0]["video"] == "videos/video0.mp4" and "start" not in recs[0]
    assert [r["id"] for r in msrvtt(ann, split="validate", video_pattern="{split}/{id}.mp4")] == ["video1"]
    assert msrvtt(ann, split="validate", video_pattern="{split}/{id}.mp4")[0]["video"] == "validate/video1.mp4"


def test_activitynet_events_and_clamping(tmp_path):
    ann = _dump(tmp_path, "val_1.json", ACTIVITYNET)
    rep = ConvertReport()
    recs = activitynet(ann, report=rep)
    assert [r["id"] for r in recs] == ["v_QOlSCBRmfWY_0", "v_QOlSCBRmfWY_1", "v_QOlSCBRmfWY_2", "v_ehGHCYKzyZ8_0"]
    assert recs[2]["end"] == 82.73 and recs[2]["start"] == 56.26  # clamped to the duration
    assert recs[1]["caption"].startswith("The girl")  # stripped
    assert recs[0]["video"] == "videos/v_QOlSCBRmfWY.mp4"
    assert rep.records == 4 and rep.skipped == ["v_ehGHCYKzyZ8[1]: empty segment [70.0, 75.0]"]


def test_youcook2_layout_and_subset(tmp_path):
    ann = _dump(tmp_path, "youcookii_annotations_trainval.json", YOUCOOK2)
    recs = youcook2(ann, video_pattern="raw_videos/{split}/{recipe_type}/{id}.mp4", split="training")
    assert [(r["id"], r["start"], r["end"]) for r in recs] == [("GLd3aX16zBg_0", 90.0, 102.0), ("GLd3aX16zBg_1", 114.0, 127.0)]
    assert recs[0]["video"] == "raw_videos/training/113/GLd3aX16zBg.mp4"
    assert len(youcook2(ann)) == 3


def test_written_manifests_validate(tmp_path):
    for fmt, obj in [("msrvtt", MSRVTT), ("activitynet", ACTIVITYNET), ("youcook2", YOUCOOK2)]:
        out = tmp_path / f"{fmt}.jsonl"
        convert(fmt, _dump(tmp_path, f"{fmt}.json", obj), out)
        samples = load_manifest(out)
        assert samples and all(s.video.parent == tmp_path / "videos" for s in samples)


@pytest.mark.parametrize("fmt, obj, msg", [
    ("msrvtt", {"videos": []}, "missing key 'sentences'"),
    ("msrvtt", {"videos": [{"id": 0}], "sentences": []}, r"videos\[0\]: missing key 'video_id'"),
    ("activitynet", {"v_a": {"duration": 5, "timestamps": [[0, 1]], "sentences": []}}, "1 timestamps but 0 sentences"),
    ("activitynet", {"v_a": {"duration": 5, "timestamps": [[0]], "sentences": ["x"]}}, r"v_a: timestamps\[0\]: a segment"),
    ("youcook2", {"database": {"a": {"annotations": [{"segment": [0, 1]}]}}}, r"database\.a\.annotations\[0\]: missing key 'sentence'"),
    ("youcook2", [], "missing key 'database'"),
])
def test_malformed_annotations_name_the_entry(tmp_path, fmt, obj, msg):
    ann = _dump(tmp_path, "ann.json", obj)
    with pytest.raises(ValueError, match=msg) as err:
        convert(fmt, ann, tmp_path / "out.jsonl")
    assert str(ann) in str(err.value)


def test_cli_convert(tmp_path, capsys):
    ann = _dump(tmp_path, "val_1.json", ACTIVITYNET)
    out = tmp_path / "m.jsonl"
    assert cli.main(["data", "convert", "activitynet", "--ann", str(ann), "--out", str(out)]) == 0
    assert "4 records, 1 skipped" in capsys.readouterr().out and len(load_manifest(out)) == 4
    (tmp_path / "bad.json").write_text("{oops")
    assert cli.main(["data", "convert", "msrvtt", "--ann", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_check_reports_bad_files(tmp_path, synth_manifest, synth_records, capsys):
    recs = [{"id": "ok", "video": str(synth_manifest.parent / synth_records[0]["video"])},
            {"id": "bad", "video": "missing.mp4"}]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert cli.main(["data", "check", str(m)]) == 1
    out = capsys.readouterr()
    assert f"{tmp_path / 'missing.mp4'}\tmissing" in out.out and "1 of 2 samples failed" in out.err
