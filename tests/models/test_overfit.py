"""A whole run as a test: the tiny captioner memorises 8 real synthetic clips on the CPU, then
greedy and beam search both reproduce every caption."""

from __future__ import annotations

import math

import pytest
import torch

from mmsparse.models import CaptionTask, create_model

LOSS_BOUND = 0.05
MAX_STEPS = 400


@pytest.fixture
def flush_denormals():
    # near convergence Adam's second moments underflow to denormals, ~10x slower on x86 CPUs
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_tiny_model_overfits_and_captions(batch, tokenizer, flush_denormals):
    torch.manual_seed(0)
    # sdpa: the same sparse function as the reference backend (test_model proves it), faster on CPU
    model = create_model("captioner_tiny", tokenizer=tokenizer, backend="sdpa")
    task = CaptionTask(model)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 0.5 * (1 + math.cos(math.pi * s / MAX_STEPS))))
    first = None
    for step in range(MAX_STEPS):
        loss, metrics = task.training_forward(batch)
        first = first if first is not None else loss.item()
        if loss.item() < LOSS_BOUND / 2 and metrics["token_acc"].item() == 1.0:
            break  # judged on the weights that caption below
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    assert first > 4.0
    assert loss.item() < LOSS_BOUND, f"loss {loss.item():.4f} after {step + 1} steps"
    refs = batch["caption"]
    greedy = model.generate(batch, beam=1, max_len=24)
    assert greedy == refs, [(g, r) for g, r in zip(greedy, refs) if g != r]
    beam = model.generate(batch, beam=3, max_len=24, length_penalty=1.0)
    assert beam == refs, [(g, r) for g, r in zip(beam, refs) if g != r]
    # the cache changes nothing on a trained model either
    assert model.generate_ids(batch, beam=3, max_len=24, use_cache=False) == \
        model.generate_ids(batch, beam=3, max_len=24)
