"""Evaluation: caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D), the evaluation harness
(``harness.evaluate``: caption a benchmark, score it against a most-frequent-caption baseline,
JSON + markdown report with efficiency figures) and the long-clip benchmark (``longclip``)."""

from .metrics import caption_metrics, java_available, tokenize

__all__ = ["baseline_scores", "caption_metrics", "evaluate", "java_available", "most_frequent_caption", "tokenize"]


def __getattr__(name):  # the harness imports the inference stack; load it on first use
    if name in ("evaluate", "most_frequent_caption", "baseline_scores"):
        from . import harness

        return getattr(harness, name)
    raise AttributeError(name)
