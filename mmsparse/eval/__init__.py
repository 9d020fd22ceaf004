"""Evaluation: caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D) and benchmark runners."""

from .metrics import caption_metrics, java_available, tokenize

__all__ = ["caption_metrics", "java_available", "tokenize"]
