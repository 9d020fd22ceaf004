"""Beam search ranks hypotheses by sum of log-probs / length ** length_penalty (the <eos> counts
in the length): a decoder whose next-token distribution is fixed makes every hypothesis's score
known, so the winner for each penalty can be worked out and compared."""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.models import create_model
from mmsparse.models.text import BOS, EOS, PAD

A = 7        # the one likely word
P_A = 0.6    # p(A) at every step; p(<eos>) = 1 - P_A - (tiny mass on the rest)
MAX_LEN = 6


def _first(batch, n: int) -> dict:
    """The first n clips of a collated batch (per-clip tensors and lists; scalars kept)."""
    return {k: v[:n] if torch.is_tensor(v) and v.dim() or isinstance(v, list) else v for k, v in batch.items()}


def _fixed_distribution_model(tokenizer):
    """captioner_tiny whose decoder ignores its input: the final LayerNorm has weight 0 and bias
    e_0, so logits = tok_embed[:, 0] (the head is tied) at every step, for every clip."""
    torch.manual_seed(0)
    model = create_model("captioner_tiny", tokenizer=tokenizer).eval()
    dec = model.decoder
    logits = torch.full((dec.tok_embed.num_embeddings,), -40.0)
    logits[A], logits[EOS] = math.log(P_A), math.log(1 - P_A)
    with torch.no_grad():
        dec.norm.weight.zero_()
        dec.norm.bias.zero_()
        dec.norm.bias[0] = 1.0
        dec.tok_embed.weight[:, 0] = logits
    return model, torch.log_softmax(logits, -1)


def _expected_winner(logp, length_penalty: float) -> list[int]:
    """Every hypothesis worth ranking: A^n <eos> (n < MAX_LEN, length n + 1) and A^MAX_LEN
    (never ended, length MAX_LEN); the best by the documented formula."""
    la, le = logp[A].item(), logp[EOS].item()
    cands = {n: (n * la + le) / (n + 1) ** length_penalty for n in range(MAX_LEN)}
    cands[MAX_LEN] = MAX_LEN * la / MAX_LEN ** length_penalty
    return [A] * max(cands, key=cands.get)


# 0.6 and 0.7 straddle the flip from "<eos> at once" to "never end": the exponent is checked, not just its sign
@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 0.7, 2.0])
def test_length_penalty_picks_the_formula_winner(tokenizer, batch, length_penalty):
    clips = _first(batch, 2)
    model, logp = _fixed_distribution_model(tokenizer)
    assert logp[PAD] < -30 and logp[BOS] < -30
    out = model.generate_ids(clips, beam=MAX_LEN + 1, max_len=MAX_LEN, length_penalty=length_penalty)
    want = _expected_winner(logp, length_penalty)
    assert out == [want, want], length_penalty


def test_length_penalty_changes_the_winner(tokenizer, batch):
    """The case above is not degenerate: without a penalty the shortest hypothesis (<eos> at
    once, log 0.4 > 2 log 0.6 + log 0.4) wins; a penalty of 1 (mean log-prob) prefers the longest;
    greedy search takes A (0.6 > 0.4) at every step whatever the penalty."""
    clips = _first(batch, 1)
    model, _ = _fixed_distribution_model(tokenizer)
    kw = dict(beam=3, max_len=MAX_LEN)
    assert model.generate_ids(clips, length_penalty=0.0, **kw) == [[]]
    assert model.generate_ids(clips, length_penalty=1.0, **kw) == [[A] * MAX_LEN]
    assert model.generate_ids(clips, beam=1, max_len=MAX_LEN, length_penalty=0.0) == [[A] * MAX_LEN]

