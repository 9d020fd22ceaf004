"""Caption metrics over multiple references, with pycocoevalcap's scorers.

BLEU-1..4, ROUGE-L and CIDEr-D are pycocoevalcap's own scorers (the COCO caption evaluation
code); only its tokenizer, which needs Java, is replaced by `tokenize`, a Python version of
the same rules (lower case, split off punctuation, drop the PTB punctuation tokens). METEOR
runs pycocoevalcap's Java METEOR 1.5 where a `java` executable is present; without Java it
is reported as None, never estimated.
"""

from __future__ import annotations

import logging
import re
import shutil

log = logging.getLogger(__name__)

# tokens that coco-caption's PTBTokenizer removes after tokenising
_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_SPLIT = re.compile(r"\.\.\.|--|``|''|[.,!?:;()\[\]{}\"`]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|'|[^\s.,!?:;()\[\]{}\"`']+")


def tokenize(text: str) -> str:
    """PTB-style tokenisation as coco-caption applies it: lower-cased tokens joined by spaces."""
    tokens = _SPLIT.findall(text.lower())
    return " ".join(t for t in tokens if t not in _PUNCT)


def java_available() -> bool:
    return shutil.which("java") is not None


def meteor_status(meteor: bool | None = None) -> tuple[bool, str]:
    """Whether METEOR is scored for the ``meteor`` argument of `caption_metrics`, and why:
    ``"scored"`` (asked for, or Java found), ``"disabled"`` (``meteor=False``, e.g. ``--no-meteor``)
    or ``"no_java"`` (left to auto-detection and no ``java`` executable on PATH)."""
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
